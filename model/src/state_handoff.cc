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

// Runs of consecutive spans, each covered by one digest: the small part alone (it is parsed
// before any page is read), then greedily as many spans as fit in kHandoffRunBytes (at least
// one).
struct Run {
  size_t first = 0;
  size_t end = 0;
  uint64_t bytes = 0;
};
std::vector<Run> runs_of(const std::vector<HandoffSpan>& spans) {
  // Larger runs for a very large state: at most about kHandoffMaxRuns of them.
  const uint64_t total = spans.back().offset + spans.back().bytes;
  const uint64_t limit =
      std::max(kHandoffRunBytes, (total + kHandoffMaxRuns - 1) / kHandoffMaxRuns);
  std::vector<Run> runs{{0, 1, spans.front().bytes}};
  for (size_t i = 1; i < spans.size();) {
    Run run{i, i, 0};
    while (run.end < spans.size() && (run.end == i || run.bytes + spans[run.end].bytes <= limit)) {
      run.bytes += spans[run.end].bytes;
      ++run.end;
    }
    runs.push_back(run);
    i = run.end;
  }
  return runs;
}

// A run's digest: XXH3-64 of its spans' digests, as little-endian u64s (block.h: this host's).
uint64_t fold(const std::vector<uint64_t>& sums) {
  return kvstore::span_checksum(sums.data(), sums.size() * sizeof(uint64_t));
}

Status check_span_digests(const std::vector<HandoffSpan>& spans,
                          std::span<const kvstore::SpanDigest> digests) {
  if (digests.size() != spans.size()) {
    return data_loss("hand-off: " + std::to_string(digests.size()) + " digests for " +
                     std::to_string(spans.size()) + " spans");
  }
  for (size_t i = 0; i < spans.size(); ++i) {
    if (digests[i].remote_offset != spans[i].offset || digests[i].bytes != spans[i].bytes) {
      return data_loss("hand-off: digest " + std::to_string(i) + " does not cover span " +
                       std::to_string(i));
    }
  }
  return Status::ok();
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

Result<std::vector<kvstore::SpanDigest>> handoff_run_digests(
    const ModelConfig& config, int64_t position,
    std::span<const kvstore::SpanDigest> span_digests) {
  const auto spans = handoff_spans(config, position);
  DSERVE_RETURN_IF_ERROR(check_span_digests(spans, span_digests));
  std::vector<kvstore::SpanDigest> runs;
  for (const Run& run : runs_of(spans)) {
    std::vector<uint64_t> sums;
    for (size_t i = run.first; i < run.end; ++i)
      sums.push_back(span_digests[i].xxh3);
    runs.push_back({spans[run.first].offset, run.bytes, fold(sums)});
  }
  return runs;
}

Result<RequestHandle> receive_handoff(Engine& engine, std::span<const std::byte> region,
                                      int64_t position,
                                      std::span<const kvstore::SpanDigest> digests) {
  const ModelConfig& config = engine.config();
  const auto spans = handoff_spans(config, position);
  const auto runs = runs_of(spans);
  if (digests.size() != runs.size()) {
    return data_loss("hand-off: " + std::to_string(digests.size()) + " digests for " +
                     std::to_string(runs.size()) + " runs of its " + std::to_string(spans.size()) +
                     " spans");
  }
  if (spans.back().offset + spans.back().bytes > region.size()) {
    return data_loss("hand-off of " + std::to_string(spans.back().offset + spans.back().bytes) +
                     " bytes does not fit the region of " + std::to_string(region.size()));
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    const uint64_t offset = spans[runs[r].first].offset;
    if (digests[r].remote_offset != offset || digests[r].bytes != runs[r].bytes) {
      return data_loss("hand-off digest " + std::to_string(r) + " covers [" +
                       std::to_string(digests[r].remote_offset) + ", +" +
                       std::to_string(digests[r].bytes) + "), its run is [" +
                       std::to_string(offset) + ", +" + std::to_string(runs[r].bytes) + ")");
    }
  }
  // The small part (a run of its own): copied, checked, then read.
  std::vector<uint8_t> small(spans.front().bytes);
  std::memcpy(small.data(), region.data(), small.size());
  if (fold({kvstore::span_checksum(small.data(), small.size())}) != digests.front().xxh3) {
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
  // Where each page span goes: its rows, its pool, how many of its rows are the state's.
  struct Target {
    kvstore::PagedRows* rows;
    kvstore::PagePool* pool;
    int64_t in_page;
    std::string name;
  };
  std::vector<Target> targets;
  for (size_t l = 0; l < state.layers().size(); ++l) {
    LayerState& layer = state.layers()[l];
    const int64_t rate = config.compress_rate(layer.kind);
    const int64_t total = rate > 0 ? position / rate : 0;
    size_t pool_in_layer = 0;
    for (kvstore::PagedRows* rows : {&layer.compressed, &layer.index_keys}) {
      const auto& pools =
          pool_in_layer == 0 ? engine.page_pools().compressed : engine.page_pools().index_keys;
      if (rows->attached()) {
        const int64_t per = rows->rows_per_page();
        for (int64_t page = 0; page < pages_for(total, per); ++page) {
          targets.push_back({rows, pools[l].get(), std::min(per, total - page * per),
                             span_name(l, pool_in_layer, page)});
        }
      }
      ++pool_in_layer;
    }
  }
  DSERVE_CHECK(targets.size() + 1 == spans.size());
  // Each run: its spans copied into pages of this engine's pools and hashed there; appended
  // once the run's digest matched.
  for (size_t r = 1; r < runs.size(); ++r) {
    std::vector<kvstore::PageRef> pages;
    std::vector<uint64_t> sums;
    for (size_t i = runs[r].first; i < runs[r].end; ++i) {
      const Target& t = targets[i - 1];
      kvstore::PageRef copy = t.pool->allocate_for_overwrite();
      DSERVE_CHECK(static_cast<uint64_t>(copy->size_bytes()) == spans[i].bytes);
      std::memcpy(copy->data(), region.data() + spans[i].offset, spans[i].bytes);
      sums.push_back(kvstore::span_checksum(copy->data(), spans[i].bytes));
      pages.push_back(std::move(copy));
    }
    if (fold(sums) != digests[r].xxh3) {
      return data_loss("hand-off: " + targets[runs[r].first - 1].name + " to " +
                       targets[runs[r].end - 2].name + " do not match their digest");
    }
    for (size_t i = runs[r].first; i < runs[r].end; ++i) {
      const Target& t = targets[i - 1];
      kvstore::PageRef& page = pages[i - runs[r].first];
      if (t.in_page == t.pool->rows_per_page()) {
        t.rows->append_page(std::move(page));
      } else {
        t.rows->append_encoded(page->data(), t.in_page);
      }
    }
  }
  return engine.import_state(std::move(state));
}

}  // namespace dserve::model
