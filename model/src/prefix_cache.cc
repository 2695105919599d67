#include "dserve/model/prefix_cache.h"

#include <algorithm>

namespace dserve::model {

namespace kv = dserve::kvstore;

kv::BlockLayout store_layout(const KvBlockLayout& layout) {
  kv::BlockLayout out;
  out.payload[static_cast<size_t>(kv::Pool::kCompressed)] = layout.compressed;
  out.payload[static_cast<size_t>(kv::Pool::kIndexKeys)] = layout.index_keys;
  out.payload[static_cast<size_t>(kv::Pool::kSnapshot)] = layout.snapshot;
  out.page_pools[static_cast<size_t>(kv::Pool::kCompressed)] = layout.compressed_pools;
  out.page_pools[static_cast<size_t>(kv::Pool::kIndexKeys)] = layout.index_pools;
  out.page_pools[static_cast<size_t>(kv::Pool::kSnapshot)] = {layout.snapshot_pool};
  return out;
}

PrefixCache::PrefixCache(const Model& model, KvBlockLayout layout,
                         std::unique_ptr<kv::PrefixStore> store)
    : model_(model), layout_(std::move(layout)), store_(std::move(store)) {}

Result<std::unique_ptr<PrefixCache>> PrefixCache::open(const Model& model,
                                                       std::string_view fingerprint,
                                                       kv::PrefixStoreOptions options) {
  DSERVE_ASSIGN_OR_RETURN(KvBlockLayout layout,
                          kv_block_layout(model.config(), model.page_pools()));
  DSERVE_ASSIGN_OR_RETURN(
      auto store, kv::PrefixStore::open(std::move(options), fingerprint, store_layout(layout)));
  return std::unique_ptr<PrefixCache>(new PrefixCache(model, std::move(layout), std::move(store)));
}

Result<PrefillResult> PrefixCache::prefill(std::span<const int32_t> prompt, int64_t max_chunk) {
  if (prompt.empty()) return invalid_argument("prefill of an empty prompt");
  if (max_chunk < 1) return invalid_argument("max_chunk must be >= 1");
  constexpr int64_t kBlock = kv::kBlockTokens;
  const auto length = static_cast<int64_t>(prompt.size());
  const int64_t whole = length / kBlock;

  kv::PrefixStore::Match match = store_->match(prompt);
  PrefillResult result{model_.new_state(), Tensor(), 0, 0, match.blocks_from_tier};
  if (!match.keys.empty()) {
    std::vector<BlockPages> blocks;
    blocks.reserve(match.blocks.size());
    for (auto& content : match.blocks) {
      blocks.push_back({std::move(content.pages[static_cast<size_t>(kv::Pool::kCompressed)]),
                        std::move(content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)]),
                        nullptr});
    }
    DSERVE_ASSIGN_OR_RETURN(result.state, restore_state(model_.config(), model_.page_pools(),
                                                        layout_, blocks, match.snapshot));
  }
  int64_t pos = result.state.position();
  result.reused_tokens = pos;
  const auto keys =
      kv::block_keys(store_->root(), prompt.first(static_cast<size_t>(whole * kBlock)));
  int64_t next_block = pos / kBlock;  // the first block this prefill computes

  while (pos < length) {
    int64_t end = std::min(length, pos + max_chunk);
    // Stop at the first block end inside the chunk that gets a snapshot.
    for (int64_t b = pos / kBlock; (b + 1) * kBlock <= end; ++b) {
      if ((b + 1) * kBlock > pos && store_->wants_snapshot(b, whole)) {
        end = (b + 1) * kBlock;
        break;
      }
    }
    DSERVE_ASSIGN_OR_RETURN(
        result.last_logits,
        model_.forward(prompt.subspan(static_cast<size_t>(pos), static_cast<size_t>(end - pos)),
                       result.state, LogitsFor::kLastToken));
    result.computed_tokens += end - pos;
    pos = end;
    for (; (next_block + 1) * kBlock <= pos; ++next_block) {
      const BlockPages pages = block_pages(layout_, result.state, next_block);
      kv::BlockContent content;
      content.pages[static_cast<size_t>(kv::Pool::kCompressed)] = pages.compressed;
      content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)] = pages.index_keys;
      if ((next_block + 1) * kBlock == pos && store_->wants_snapshot(next_block, whole)) {
        content.pages[static_cast<size_t>(kv::Pool::kSnapshot)] = {
            take_snapshot(layout_, result.state)};
      }
      const kv::BlockKey& parent =
          next_block == 0 ? store_->root() : keys[static_cast<size_t>(next_block - 1)];
      store_->insert(parent, keys[static_cast<size_t>(next_block)], std::move(content));
    }
  }
  return result;
}

}  // namespace dserve::model
