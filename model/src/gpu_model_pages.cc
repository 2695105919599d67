// GpuModel's request slots and the pages of their compressed entries and indexer keys.

#include "gpu_model_impl.h"

namespace dserve::model {

void GpuModel::Impl::release(GpuRequestState::Impl& state) {
  for (size_t l = 0; l < state.layers.size(); ++l) {
    for (auto [list, pool] : {std::pair{&state.layers[l].compressed, compressed_pools[l].get()},
                              std::pair{&state.layers[l].index_keys, index_pools[l].get()}}) {
      if (pool != nullptr)
        pool->free.insert(pool->free.end(), list->pages.begin(), list->pages.end());
    }
  }
  free_slots.push_back(state.slot);
}

Result<GpuRequestState> GpuModel::new_state() {
  Impl& m = *impl_;
  if (m.free_slots.empty()) {
    return resource_exhausted("every one of the GpuModel's " +
                              std::to_string(m.options.max_requests) +
                              " request slots is taken (GpuModelOptions.max_requests)");
  }
  GpuRequestState state;
  state.impl_ = std::make_unique<GpuRequestState::Impl>();
  state.impl_->owner = &m;
  state.impl_->slot = m.free_slots.back();
  m.free_slots.pop_back();
  state.impl_->layers.resize(static_cast<size_t>(m.config.num_layers));
  return state;
}

// Takes the pages every segment's lists need to hold the rows of its positions after the batch,
// and uploads the new block-table entries. On failure gives back everything it took this call
// and reports which pool ran out; the states are as before.
Status GpuModel::Impl::reserve_pages(std::span<const Segment> segments) {
  std::vector<std::pair<PageList*, size_t>> taken;  // list, its size before this call
  std::vector<DevicePagePool*> taken_from;
  Status failure = Status::ok();
  for (const Segment& seg : segments) {
    const int64_t end_pos = seg.state->position + static_cast<int64_t>(seg.tokens.size());
    for (int64_t l = 0; l < config.num_layers && failure.is_ok(); ++l) {
      const int64_t rate = config.compress_rate(layers[static_cast<size_t>(l)].kind);
      LayerPages& lp = seg.state->layers[static_cast<size_t>(l)];
      for (auto [list, pool] :
           {std::pair{&lp.compressed, compressed_pools[static_cast<size_t>(l)].get()},
            std::pair{&lp.index_keys, index_pools[static_cast<size_t>(l)].get()}}) {
        if (pool == nullptr) continue;
        DSERVE_CHECK(rate > 0);  // only compressed layers have pools, and their rates are > 0
        const auto pages = static_cast<size_t>(ceil_div(end_pos / rate, pool->rows_per_page));
        if (list->pages.size() >= pages) continue;
        taken.emplace_back(list, list->pages.size());
        taken_from.push_back(pool);
        while (list->pages.size() < pages) {
          if (pool->free.empty()) {
            failure = resource_exhausted(
                "GPU page pool of layer " + std::to_string(l) + " is full (max_requests " +
                std::to_string(options.max_requests) + " at max_positions " +
                std::to_string(options.max_positions) + ")");
            break;
          }
          list->pages.push_back(pool->free.back());
          pool->free.pop_back();
        }
        if (!failure.is_ok()) break;
      }
    }
    if (!failure.is_ok()) break;
  }
  if (!failure.is_ok()) {
    for (size_t i = taken.size(); i-- > 0;) {
      auto [list, before] = taken[i];
      DevicePagePool* pool = taken_from[i];
      for (size_t k = before; k < list->pages.size(); ++k)
        pool->free.push_back(list->pages[k]);
      list->pages.resize(before);
    }
    return failure;
  }
  // The new entries of each slot's block-table row.
  for (const Segment& seg : segments) {
    for (int64_t l = 0; l < config.num_layers; ++l) {
      LayerPages& lp = seg.state->layers[static_cast<size_t>(l)];
      LayerSlabs& slab = slabs[static_cast<size_t>(l)];
      for (auto [list, table] : {std::pair{&lp.compressed, &slab.compressed},
                                 std::pair{&lp.index_keys, &slab.index_keys}}) {
        if (list->uploaded == list->pages.size()) continue;
        const size_t offset =
            (static_cast<size_t>(seg.state->slot) * static_cast<size_t>(table->stride) +
             list->uploaded) *
            sizeof(int32_t);
        DSERVE_RETURN_IF_ERROR(table->tables.copy_from_host(
            list->pages.data() + list->uploaded,
            (list->pages.size() - list->uploaded) * sizeof(int32_t), offset));
        list->uploaded = list->pages.size();
      }
    }
  }
  return Status::ok();
}

size_t GpuModel::kv_bytes(const GpuRequestState& state, int64_t layer) const {
  const Impl& m = *impl_;
  DSERVE_CHECK(state.impl_ != nullptr && state.impl_->owner == impl_.get());
  DSERVE_CHECK(layer >= 0 && layer < m.config.num_layers);
  const auto l = static_cast<size_t>(layer);
  const LayerPages& pages = state.impl_->layers[l];
  size_t bytes = 0;
  for (auto [list, pool] : {std::pair{&pages.compressed, m.compressed_pools[l].get()},
                            std::pair{&pages.index_keys, m.index_pools[l].get()}}) {
    if (pool != nullptr) {
      bytes += list->pages.size() * static_cast<size_t>(pool->rows_per_page * pool->width) *
               sizeof(float);
    }
  }
  return bytes;
}

Status GpuModel::assume_context(GpuRequestState& state, int64_t tokens) {
  Impl& m = *impl_;
  if (!m.random_state) {
    return invalid_argument(
        "assume_context: only a model made by create_random has generated "
        "request state to assume");
  }
  GpuRequestState::Impl& s = m.state_of(state);
  if (s.position != 0 || tokens < 0 || tokens > m.options.max_positions) {
    return invalid_argument("assume_context: a fresh state and 0 <= tokens <= max_positions (" +
                            std::to_string(m.options.max_positions) + "), got position " +
                            std::to_string(s.position) + " and tokens " + std::to_string(tokens));
  }
  const std::vector<int32_t> placeholder(static_cast<size_t>(tokens), 0);
  const Impl::Segment whole{&s, placeholder};
  DSERVE_RETURN_IF_ERROR(m.reserve_pages(std::span(&whole, 1)));
  s.position = tokens;
  return Status::ok();
}

}  // namespace dserve::model
