#include "dserve/model/prefix_cache.h"
#include "layers.h"

#include <algorithm>
#include <string>

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

Result<PrefillJob> PrefixCache::begin(std::span<const int32_t> prompt) {
  if (prompt.empty()) return invalid_argument("prefill of an empty prompt");
  DSERVE_RETURN_IF_ERROR(detail::check_token_ids(prompt, model_.config().vocab_size));
  constexpr int64_t kBlock = kv::kBlockTokens;
  PrefillJob job;
  job.prompt_.assign(prompt.begin(), prompt.end());
  const auto whole = static_cast<size_t>(job.length() / kBlock * kBlock);
  job.keys_ = kv::block_keys(store_->root(), prompt.first(whole));

  kv::PrefixStore::Match match = store_->match(prompt);
  job.result_.state = model_.new_state();
  job.result_.reused_blocks_from_tier = match.blocks_from_tier;
  if (!match.keys.empty()) {
    std::vector<BlockPages> blocks;
    blocks.reserve(match.blocks.size());
    for (auto& content : match.blocks) {
      blocks.push_back({std::move(content.pages[static_cast<size_t>(kv::Pool::kCompressed)]),
                        std::move(content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)]),
                        nullptr});
    }
    DSERVE_ASSIGN_OR_RETURN(job.result_.state, restore_state(model_.config(), model_.page_pools(),
                                                             layout_, blocks, match.snapshot));
  }
  job.result_.reused_tokens = job.position();
  job.next_block_ = job.position() / kBlock;
  return job;
}

Status PrefixCache::advance(PrefillJob& job, int64_t max_tokens) {
  if (max_tokens < 1) return invalid_argument("advance: max_tokens must be >= 1");
  constexpr int64_t kBlock = kv::kBlockTokens;
  const int64_t pos = job.position();
  if (pos == job.length()) return Status::ok();
  const int64_t whole = job.length() / kBlock;
  int64_t end = std::min(job.length(), pos + max_tokens);
  // Stop at the first block end inside the chunk that gets a snapshot.
  for (int64_t b = pos / kBlock; (b + 1) * kBlock <= end; ++b) {
    if ((b + 1) * kBlock > pos && store_->wants_snapshot(b, whole)) {
      end = (b + 1) * kBlock;
      break;
    }
  }
  PrefillResult& r = job.result_;
  DSERVE_ASSIGN_OR_RETURN(
      r.last_logits,
      model_.forward(std::span<const int32_t>(job.prompt_)
                         .subspan(static_cast<size_t>(pos), static_cast<size_t>(end - pos)),
                     r.state, LogitsFor::kLastToken));
  r.computed_tokens += end - pos;
  for (; (job.next_block_ + 1) * kBlock <= end; ++job.next_block_) {
    const int64_t b = job.next_block_;
    const BlockPages pages = block_pages(layout_, r.state, b);
    kv::BlockContent content;
    content.pages[static_cast<size_t>(kv::Pool::kCompressed)] = pages.compressed;
    content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)] = pages.index_keys;
    if ((b + 1) * kBlock == end && store_->wants_snapshot(b, whole)) {
      content.pages[static_cast<size_t>(kv::Pool::kSnapshot)] = {take_snapshot(layout_, r.state)};
    }
    const kv::BlockKey& parent = b == 0 ? store_->root() : job.keys_[static_cast<size_t>(b - 1)];
    store_->insert(parent, job.keys_[static_cast<size_t>(b)], std::move(content));
  }
  return Status::ok();
}

Result<PrefillResult> PrefixCache::prefill(std::span<const int32_t> prompt, int64_t max_chunk) {
  if (max_chunk < 1) return invalid_argument("max_chunk must be >= 1");
  DSERVE_ASSIGN_OR_RETURN(PrefillJob job, begin(prompt));
  while (!job.done())
    DSERVE_RETURN_IF_ERROR(advance(job, max_chunk));
  return std::move(job.result_);
}

}  // namespace dserve::model
