// A GpuModel request's state to and from the host's RequestState (request_state.h): the
// hand-off between workers and the prefix store see one state format whatever the backend.
//
// Device layouts (gpu_model_impl.h): a slot's window is a ring of sliding_window rows, row
// position % sliding_window; its compressors' open-window rows sit at position % rate, and the
// last closed window's Ca (CSA) in the overlap rows; compressed entries and indexer keys are in
// pool pages of kBlockTokens / rate rows, listed in the request's block table.

#include "gpu_model_impl.h"

namespace dserve::model {

namespace {

size_t float_bytes(int64_t count) {
  return static_cast<size_t>(count) * sizeof(float);
}

// What a state at `position` must hold in one layer, checked before anything is uploaded.
Status check_layer_shapes(const ModelConfig& config, const LayerState& layer, int64_t l,
                          int64_t position) {
  const std::string where = "layer " + std::to_string(l);
  if (layer.kind != config.layer_types[static_cast<size_t>(l)] ||
      layer.head_dim != config.head_dim) {
    return invalid_argument(where + ": the state is not of this model's layer kinds and widths");
  }
  const int64_t keep = std::min(position, config.sliding_window - 1);
  if (layer.window_tokens() != keep ||
      static_cast<int64_t>(layer.window.size()) != keep * config.head_dim) {
    return invalid_argument(where + ": a window of " + std::to_string(layer.window_tokens()) +
                            " rows, expected " + std::to_string(keep));
  }
  const int64_t rate = config.compress_rate(layer.kind);
  const int64_t entries = rate > 0 ? position / rate : 0;
  if (layer.compressed.rows() != entries ||
      (layer.index_keys.attached() && layer.index_keys.rows() != entries)) {
    return invalid_argument(where + ": " + std::to_string(layer.compressed.rows()) +
                            " compressed entries, expected " + std::to_string(entries));
  }
  for (const CompressorState* c : {&layer.kv_compressor, &layer.index_compressor}) {
    if (c->width == 0) continue;
    const bool overlap = c->series == 2 && c->entries > 0;
    if (c->entries != entries || c->pending_tokens() != position % c->rate ||
        c->pending_gate.size() != c->pending_kv.size() || c->has_overlap() != overlap ||
        (overlap && (static_cast<int64_t>(c->overlap_kv.size()) != c->rate * c->width ||
                     c->overlap_gate.size() != c->overlap_kv.size()))) {
      return invalid_argument(where + ": a compressor state that does not match position " +
                              std::to_string(position));
    }
  }
  return Status::ok();
}

}  // namespace

Result<RequestState> GpuModel::export_state(const GpuRequestState& state,
                                            const KvPagePools& pools) const {
  const Impl& m = *impl_;
  DSERVE_CHECK_MSG(state.impl_ != nullptr && state.impl_->owner == impl_.get(),
                   "the GPU request state was made by another GpuModel");
  const GpuRequestState::Impl& s = *state.impl_;
  const ModelConfig& c = m.config;
  const int64_t position = s.position;
  const int64_t window = c.sliding_window;
  const int64_t hd = c.head_dim;
  const auto slot = static_cast<size_t>(s.slot);
  RequestState out(c, pools);
  std::vector<float> scratch;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto li = static_cast<size_t>(l);
    LayerState& host = out.layers()[li];
    const LayerSlabs& slab = m.slabs[li];
    const LayerDev& d = m.layers[li];

    // The window: the last sliding_window - 1 positions, oldest first.
    scratch.resize(static_cast<size_t>(window * hd));
    DSERVE_RETURN_IF_ERROR(slab.windows.copy_to_host(scratch.data(), float_bytes(window * hd),
                                                     slot * float_bytes(window * hd)));
    const int64_t keep = std::min(position, window - 1);
    host.window.resize(static_cast<size_t>(keep * hd));
    for (int64_t k = 0; k < keep; ++k) {
      const int64_t pos = position - keep + k;
      std::copy_n(scratch.data() + (pos % window) * hd, hd, host.window.data() + k * hd);
    }

    // Compressed entries and indexer keys, page by page.
    const int64_t rate = c.compress_rate(d.kind);
    const int64_t entries = rate > 0 ? position / rate : 0;
    const LayerPages& pages = s.layers[li];
    for (auto [list, pool, rows] :
         {std::tuple{&pages.compressed, m.compressed_pools[li].get(), &host.compressed},
          std::tuple{&pages.index_keys, m.index_pools[li].get(), &host.index_keys}}) {
      if (pool == nullptr) continue;
      const int64_t per = pool->rows_per_page;
      scratch.resize(static_cast<size_t>(per * pool->width));
      for (int64_t first = 0, p = 0; first < entries; first += per, ++p) {
        const int64_t count = std::min(per, entries - first);
        const auto page = static_cast<size_t>(list->pages[static_cast<size_t>(p)]);
        DSERVE_RETURN_IF_ERROR(pool->slab.copy_to_host(scratch.data(),
                                                       float_bytes(count * pool->width),
                                                       page * float_bytes(per * pool->width)));
        rows->append_decoded(scratch.data(), count);  // the device keeps decoded values
      }
    }

    // The compressors' open window and overlap.
    for (auto [dev, buffers, cs] :
         {std::tuple{&d.compressor, &slab.kv_compressor, &host.kv_compressor},
          std::tuple{&d.index_compressor, &slab.index_compressor, &host.index_compressor}}) {
      if (!dev->has_value()) continue;
      const CompressorDev& cd = **dev;
      DSERVE_CHECK(cs->width == cd.width && cs->series == cd.series && cs->rate == cd.rate);
      const int64_t row = cd.series * cd.width;
      const int64_t pending = position % cd.rate;
      cs->entries = position / cd.rate;
      for (auto [from, to] : {std::pair{&buffers->pending_kv, &cs->pending_kv},
                              std::pair{&buffers->pending_gate, &cs->pending_gate}}) {
        to->resize(static_cast<size_t>(pending * row));
        DSERVE_RETURN_IF_ERROR(from->copy_to_host(to->data(), float_bytes(pending * row),
                                                  slot * float_bytes(cd.rate * row)));
      }
      if (cd.series == 2 && cs->entries > 0) {
        for (auto [from, to] : {std::pair{&buffers->overlap_kv, &cs->overlap_kv},
                                std::pair{&buffers->overlap_gate, &cs->overlap_gate}}) {
          to->resize(static_cast<size_t>(cd.rate * cd.width));
          DSERVE_RETURN_IF_ERROR(from->copy_to_host(to->data(), float_bytes(cd.rate * cd.width),
                                                    slot * float_bytes(cd.rate * cd.width)));
        }
      }
    }
  }
  out.advance(position);
  return out;
}

Result<GpuRequestState> GpuModel::import_state(const RequestState& host) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t position = host.position();
  if (static_cast<int64_t>(host.layers().size()) != c.num_layers) {
    return invalid_argument("import_state: a state of " + std::to_string(host.layers().size()) +
                            " layers, this model has " + std::to_string(c.num_layers));
  }
  if (position > m.options.max_positions) {
    return out_of_range("import_state: a state at position " + std::to_string(position) +
                        ", past this GpuModel's max_positions " +
                        std::to_string(m.options.max_positions));
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    DSERVE_RETURN_IF_ERROR(check_layer_shapes(c, host.layers()[static_cast<size_t>(l)], l, position)
                               .with_context("import_state"));
  }
  DSERVE_ASSIGN_OR_RETURN(GpuRequestState state, new_state());
  GpuRequestState::Impl& s = *state.impl_;
  const std::vector<int32_t> placeholder(static_cast<size_t>(position), 0);
  const Impl::Segment whole{&s, placeholder};
  DSERVE_RETURN_IF_ERROR(m.reserve_pages(std::span(&whole, 1)));

  const int64_t window = c.sliding_window;
  const int64_t hd = c.head_dim;
  const auto slot = static_cast<size_t>(s.slot);
  std::vector<float> scratch;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto li = static_cast<size_t>(l);
    const LayerState& layer = host.layers()[li];
    LayerSlabs& slab = m.slabs[li];
    const LayerDev& d = m.layers[li];

    scratch.assign(static_cast<size_t>(window * hd), 0.0f);
    const int64_t keep = layer.window_tokens();
    for (int64_t k = 0; k < keep; ++k) {
      const int64_t pos = position - keep + k;
      std::copy_n(layer.window.data() + k * hd, hd, scratch.data() + (pos % window) * hd);
    }
    DSERVE_RETURN_IF_ERROR(slab.windows.copy_from_host(scratch.data(), float_bytes(window * hd),
                                                       slot * float_bytes(window * hd)));

    const LayerPages& pages = s.layers[li];
    for (auto [list, pool, rows] :
         {std::tuple{&pages.compressed, m.compressed_pools[li].get(), &layer.compressed},
          std::tuple{&pages.index_keys, m.index_pools[li].get(), &layer.index_keys}}) {
      if (pool == nullptr) continue;
      const int64_t per = pool->rows_per_page;
      const int64_t width = pool->width;
      DSERVE_CHECK(rows->width() == width);
      scratch.resize(static_cast<size_t>(per * width));
      for (int64_t first = 0, p = 0; first < rows->rows(); first += per, ++p) {
        const int64_t count = std::min(per, rows->rows() - first);
        rows->read_rows(first, count, scratch.data());
        const auto page = static_cast<size_t>(list->pages[static_cast<size_t>(p)]);
        DSERVE_RETURN_IF_ERROR(pool->slab.copy_from_host(scratch.data(), float_bytes(count * width),
                                                         page * float_bytes(per * width)));
      }
    }

    for (auto [dev, buffers, cs] :
         {std::tuple{&d.compressor, &slab.kv_compressor, &layer.kv_compressor},
          std::tuple{&d.index_compressor, &slab.index_compressor, &layer.index_compressor}}) {
      if (!dev->has_value()) continue;
      const CompressorDev& cd = **dev;
      if (cs->width != cd.width || cs->series != cd.series || cs->rate != cd.rate) {
        return invalid_argument("import_state: layer " + std::to_string(l) +
                                ": a compressor of another shape than this model's");
      }
      const int64_t row = cd.series * cd.width;
      for (auto [from, to] : {std::pair{&cs->pending_kv, &buffers->pending_kv},
                              std::pair{&cs->pending_gate, &buffers->pending_gate}}) {
        DSERVE_RETURN_IF_ERROR(to->copy_from_host(from->data(), from->size() * sizeof(float),
                                                  slot * float_bytes(cd.rate * row)));
      }
      if (cs->has_overlap()) {
        for (auto [from, to] : {std::pair{&cs->overlap_kv, &buffers->overlap_kv},
                                std::pair{&cs->overlap_gate, &buffers->overlap_gate}}) {
          DSERVE_RETURN_IF_ERROR(to->copy_from_host(from->data(), from->size() * sizeof(float),
                                                    slot * float_bytes(cd.rate * cd.width)));
        }
      }
    }
  }
  s.position = position;
  return state;
}

}  // namespace dserve::model
