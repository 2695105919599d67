#include "dserve/model/kv_blocks.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "dserve/core/check.h"

namespace dserve::model {
namespace {

constexpr int64_t kBlock = kvstore::kBlockTokens;

// Copies `count` floats between a snapshot page and a state vector, advancing the cursor.
struct Cursor {
  float* at;
  void save(const std::vector<float>& v) {
    std::memcpy(at, v.data(), v.size() * sizeof(float));
    at += v.size();
  }
  void load(std::vector<float>& v, int64_t count) {
    v.assign(at, at + count);
    at += count;
  }
};

}  // namespace

Result<KvBlockLayout> kv_block_layout(const ModelConfig& config, const KvPagePools& pools) {
  if (config.sliding_window - 1 > kBlock) {
    return invalid_argument("sliding_window " + std::to_string(config.sliding_window) +
                            " is longer than a 128-token block plus one: block-end snapshots "
                            "need the window inside one block");
  }
  KvBlockLayout layout;
  std::vector<kvstore::Segment> snapshot;
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const AttentionKind kind = config.layer_types[static_cast<size_t>(l)];
    snapshot.push_back({config.sliding_window - 1, config.head_dim, config.rope_head_dim});
    if (kind == AttentionKind::kSliding) continue;
    const int64_t rate = config.compress_rate(kind);
    if (rate <= 0 || kBlock % rate != 0) {
      return invalid_argument("layer " + std::to_string(l) + ": compress rate " +
                              std::to_string(rate) + " does not divide the 128-token block");
    }
    const int64_t per_block = kBlock / rate;
    const auto entry =
        kvstore::RowFormat::entry(config.kv_dtype, config.head_dim, config.rope_head_dim);
    layout.compressed.segments.push_back(
        {per_block, config.head_dim, config.rope_head_dim, entry.encoding});
    layout.compressed_pools.push_back(pools.compressed[static_cast<size_t>(l)]);
    if (kind == AttentionKind::kCompressed) {
      const auto key = kvstore::RowFormat::index_key(config.kv_dtype, config.index_head_dim);
      layout.index_keys.segments.push_back(
          {per_block, config.index_head_dim, config.rope_head_dim, key.encoding});
      layout.index_pools.push_back(pools.index_keys[static_cast<size_t>(l)]);
      // The overlap of both CSA compressors: Ca and its gate, [rate, width] each, pre-RoPE.
      for (int64_t width : {config.head_dim, config.index_head_dim}) {
        snapshot.push_back({rate, width, 0});
        snapshot.push_back({rate, width, 0});
      }
    }
  }
  layout.snapshot.segments = std::move(snapshot);
  layout.snapshot_pool = kvstore::PagePool::create("snapshot", 1, layout.snapshot.floats());
  return layout;
}

BlockPages block_pages(const KvBlockLayout& layout, const RequestState& state, int64_t block) {
  DSERVE_CHECK_MSG(block >= 0 && (block + 1) * kBlock <= state.position(),
                   "block_pages of a block the request has not completed");
  BlockPages pages;
  for (const LayerState& s : state.layers()) {
    if (s.compressed.attached()) {
      pages.compressed.push_back(s.compressed.pages()[static_cast<size_t>(block)]);
    }
    if (s.index_keys.attached()) {
      pages.index_keys.push_back(s.index_keys.pages()[static_cast<size_t>(block)]);
    }
  }
  DSERVE_CHECK(pages.compressed.size() == layout.compressed.segments.size());
  DSERVE_CHECK(pages.index_keys.size() == layout.index_keys.segments.size());
  return pages;
}

kvstore::PageRef take_snapshot(const KvBlockLayout& layout, const RequestState& state) {
  DSERVE_CHECK_MSG(state.position() > 0 && state.position() % kBlock == 0,
                   "a snapshot is taken at a block end");
  kvstore::PageRef page = layout.snapshot_pool->allocate();
  Cursor c{page->as_floats()};
  for (const LayerState& s : state.layers()) {
    DSERVE_CHECK_MSG(s.window_tokens() == layout.snapshot.segments[0].rows,
                     "the window at a block end holds sliding_window - 1 tokens");
    c.save(s.window);
    if (s.kind != AttentionKind::kCompressed) continue;
    for (const CompressorState* comp : {&s.kv_compressor, &s.index_compressor}) {
      DSERVE_CHECK_MSG(comp->pending_tokens() == 0 && comp->has_overlap(),
                       "a CSA compressor at a block end has no pending tokens and an overlap");
      c.save(comp->overlap_kv);
      c.save(comp->overlap_gate);
    }
  }
  DSERVE_CHECK(c.at == page->as_floats() + layout.snapshot.floats());
  return page;
}

Result<RequestState> restore_state(const ModelConfig& config, const KvPagePools& pools,
                                   const KvBlockLayout& layout, std::span<const BlockPages> blocks,
                                   const kvstore::PageRef& snapshot) {
  if (blocks.empty() || snapshot == nullptr) {
    return invalid_argument("restore_state needs at least one block and its end's snapshot");
  }
  if (snapshot->size_bytes() != layout.snapshot.bytes() ||
      snapshot->pool().format().encoding != kvstore::RowEncoding::kFp32) {
    return invalid_argument("snapshot page of " + std::to_string(snapshot->size_bytes()) +
                            " bytes, expected " + std::to_string(layout.snapshot.bytes()) +
                            " of fp32");
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    const auto check = [&](const std::vector<kvstore::PageRef>& pages,
                           const std::vector<std::shared_ptr<kvstore::PagePool>>& want,
                           const char* pool) -> Status {
      if (pages.size() != want.size()) {
        return invalid_argument("block " + std::to_string(b) + ": " + std::to_string(pages.size()) +
                                " " + pool + " pages, expected " + std::to_string(want.size()));
      }
      for (size_t i = 0; i < pages.size(); ++i) {
        if (pages[i] == nullptr ||
            pages[i]->size_bytes() != static_cast<int64_t>(want[i]->page_bytes()) ||
            !(pages[i]->pool().format() == want[i]->format())) {
          return invalid_argument("block " + std::to_string(b) + ": " + pool + " page " +
                                  std::to_string(i) + " missing, of the wrong size or format");
        }
      }
      return Status::ok();
    };
    DSERVE_RETURN_IF_ERROR(check(blocks[b].compressed, layout.compressed_pools, "compressed"));
    DSERVE_RETURN_IF_ERROR(check(blocks[b].index_keys, layout.index_pools, "index_keys"));
  }

  RequestState state(config, pools);
  const int64_t position = static_cast<int64_t>(blocks.size()) * kBlock;
  state.advance(position);
  Cursor c{snapshot->as_floats()};
  size_t compressed_slot = 0, index_slot = 0;
  for (LayerState& s : state.layers()) {
    c.load(s.window, (config.sliding_window - 1) * s.head_dim);
    if (s.compressed.attached()) {
      for (const BlockPages& block : blocks)
        s.compressed.append_page(block.compressed[compressed_slot]);
      ++compressed_slot;
      s.kv_compressor.entries = position / s.kv_compressor.rate;
    }
    if (s.index_keys.attached()) {
      for (const BlockPages& block : blocks)
        s.index_keys.append_page(block.index_keys[index_slot]);
      ++index_slot;
      s.index_compressor.entries = position / s.index_compressor.rate;
    }
    if (s.kind != AttentionKind::kCompressed) continue;
    for (CompressorState* comp : {&s.kv_compressor, &s.index_compressor}) {
      c.load(comp->overlap_kv, comp->rate * comp->width);
      c.load(comp->overlap_gate, comp->rate * comp->width);
    }
  }
  return state;
}

}  // namespace dserve::model
