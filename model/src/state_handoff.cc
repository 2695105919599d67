#include "dserve/model/state_handoff.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "dserve/core/check.h"
#include "dserve/model/state_packing.h"

namespace dserve::model {
namespace {

constexpr uint64_t kSmallPartAlignment = 64;

uint64_t small_part_span(const ModelConfig& config, int64_t position) {
  const uint64_t n = packed_state_without_rows_bytes(config, position);
  return (n + kSmallPartAlignment - 1) / kSmallPartAlignment * kSmallPartAlignment;
}

// The paged pools of one layer in hand-off order, with the rows each holds at `position`.
struct LayerPools {
  const kvstore::PagePool* pool;
  int64_t rows;
};
std::vector<std::vector<LayerPools>> paged_pools(const ModelConfig& config,
                                                 const KvPagePools& pools, int64_t position) {
  std::vector<std::vector<LayerPools>> out(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const auto i = static_cast<size_t>(l);
    const int64_t rate = config.compress_rate(config.layer_types[i]);
    const int64_t entries = rate > 0 ? position / rate : 0;
    for (const auto* list : {&pools.compressed, &pools.index_keys}) {
      if (const auto& pool = (*list)[i]) out[i].push_back({pool.get(), entries});
    }
  }
  return out;
}

int64_t pages_for(int64_t rows, int64_t per_page) {
  return (rows + per_page - 1) / per_page;
}

std::string span_name(size_t layer, size_t pool_in_layer, int64_t page) {
  return "layer " + std::to_string(layer) + " " +
         (pool_in_layer == 0 ? "compressed entries" : "indexer keys") + " page " +
         std::to_string(page);
}

}  // namespace

std::vector<HandoffSpan> handoff_spans(const ModelConfig& config, int64_t position) {
  DSERVE_CHECK_MSG(position >= 0, "handoff_spans of a negative position");
  const KvPagePools pools = KvPagePools::create(config);
  std::vector<HandoffSpan> spans{{0, small_part_span(config, position)}};
  uint64_t at = spans.front().bytes;
  for (const auto& layer : paged_pools(config, pools, position)) {
    for (const LayerPools& p : layer) {
      for (int64_t page = 0; page < pages_for(p.rows, p.pool->rows_per_page()); ++page) {
        spans.push_back({at, p.pool->page_bytes()});
        at += p.pool->page_bytes();
      }
    }
  }
  return spans;
}

uint64_t handoff_bytes(const ModelConfig& config, int64_t position) {
  const auto spans = handoff_spans(config, position);
  return spans.back().offset + spans.back().bytes;
}

Result<HandoffSource> handoff_source(const Engine& engine, const EngineRequest& request) {
  const ModelConfig& config = engine.config();
  HandoffSource source;
  const RequestState* state = engine.host_state(request);
  if (state == nullptr) {
    DSERVE_ASSIGN_OR_RETURN(source.exported, engine.export_state(request));
    state = &source.exported;
  }
  const auto spans = handoff_spans(config, state->position());
  source.small_part = pack_state_without_rows(config, *state);
  source.small_part.resize(spans.front().bytes, 0);
  source.ops.push_back({source.small_part.data(), spans.front().bytes, 0});
  for (const LayerState& layer : state->layers()) {
    for (const kvstore::PagedRows* rows : {&layer.compressed, &layer.index_keys}) {
      if (!rows->attached()) continue;
      for (const kvstore::PageRef& page : rows->pages()) {
        const HandoffSpan& span = spans[source.ops.size()];
        DSERVE_CHECK_MSG(static_cast<uint64_t>(page->size_bytes()) == span.bytes,
                         "a page of the state does not have its hand-off span's size");
        source.ops.push_back({page->data(), span.bytes, span.offset});
      }
    }
  }
  DSERVE_CHECK_MSG(source.ops.size() == spans.size(),
                   "the state's pages are not the hand-off spans of its position");
  source.bytes = spans.back().offset + spans.back().bytes;
  return source;
}

Result<RequestHandle> receive_handoff(Engine& engine, std::span<const std::byte> region,
                                      int64_t position,
                                      std::span<const kvstore::SpanDigest> digests) {
  const ModelConfig& config = engine.config();
  const auto spans = handoff_spans(config, position);
  if (digests.size() != spans.size()) {
    return data_loss("hand-off: " + std::to_string(digests.size()) + " digests for " +
                     std::to_string(spans.size()) + " spans (the small part and every page)");
  }
  if (spans.back().offset + spans.back().bytes > region.size()) {
    return data_loss("hand-off of " + std::to_string(spans.back().offset + spans.back().bytes) +
                     " bytes does not fit the region of " + std::to_string(region.size()));
  }
  for (size_t i = 0; i < spans.size(); ++i) {
    if (digests[i].remote_offset != spans[i].offset || digests[i].bytes != spans[i].bytes) {
      return data_loss("hand-off digest " + std::to_string(i) + " covers [" +
                       std::to_string(digests[i].remote_offset) + ", +" +
                       std::to_string(digests[i].bytes) + "), its span is [" +
                       std::to_string(spans[i].offset) + ", +" + std::to_string(spans[i].bytes) +
                       ")");
    }
  }
  // The small part: copied, checked, then read.
  std::vector<uint8_t> small(spans.front().bytes);
  std::memcpy(small.data(), region.data(), small.size());
  if (kvstore::span_checksum(small.data(), small.size()) != digests.front().xxh3) {
    return data_loss(
        "hand-off: the small part (windows, compressor state) does not match its "
        "digest");
  }
  DSERVE_ASSIGN_OR_RETURN(
      RequestState state,
      unpack_state_without_rows(
          config, engine.page_pools(),
          std::span(small).first(packed_state_without_rows_bytes(config, position))));
  if (state.position() != position) {
    return data_loss("hand-off state at position " + std::to_string(state.position()) +
                     ", expected " + std::to_string(position));
  }
  // Each page: copied into a page of this engine's pools, checked there, then appended.
  size_t next = 1;
  for (size_t l = 0; l < state.layers().size(); ++l) {
    LayerState& layer = state.layers()[l];
    size_t pool_in_layer = 0;
    for (kvstore::PagedRows* rows : {&layer.compressed, &layer.index_keys}) {
      if (!rows->attached()) {
        ++pool_in_layer;
        continue;
      }
      const int64_t rate = config.compress_rate(layer.kind);
      const int64_t total = rate > 0 ? position / rate : 0;
      const int64_t per = rows->rows_per_page();
      for (int64_t page = 0; page < pages_for(total, per); ++page) {
        const HandoffSpan& span = spans[next];
        const auto& pools =
            pool_in_layer == 0 ? engine.page_pools().compressed : engine.page_pools().index_keys;
        kvstore::PageRef copy = pools[l]->allocate_for_overwrite();
        DSERVE_CHECK(static_cast<uint64_t>(copy->size_bytes()) == span.bytes);
        std::memcpy(copy->data(), region.data() + span.offset, span.bytes);
        if (kvstore::span_checksum(copy->data(), span.bytes) != digests[next].xxh3) {
          return data_loss("hand-off: " + span_name(l, pool_in_layer, page) +
                           " does not match its digest");
        }
        const int64_t in_page = std::min(per, total - page * per);
        if (in_page == per) {
          rows->append_page(std::move(copy));
        } else {
          rows->append_encoded(copy->data(), in_page);
        }
        ++next;
      }
      ++pool_in_layer;
    }
  }
  DSERVE_CHECK(next == spans.size());
  return engine.import_state(std::move(state));
}

}  // namespace dserve::model
