#include "dserve/model/prefix_cache.h"
#include "layers.h"

#include <algorithm>
#include <optional>
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

PrefixCache::PrefixCache(Engine& engine, KvBlockLayout layout,
                         std::unique_ptr<kv::PrefixStore> store)
    : engine_(engine), layout_(std::move(layout)), store_(std::move(store)) {}

Result<std::unique_ptr<PrefixCache>> PrefixCache::open(Engine& engine, std::string_view fingerprint,
                                                       kv::PrefixStoreOptions options) {
  DSERVE_ASSIGN_OR_RETURN(KvBlockLayout layout,
                          kv_block_layout(engine.config(), engine.page_pools()));
  // Blocks of another KV dtype hold other values: they are another model's blocks (the layout
  // digest refuses them too). fp32 keeps the fingerprint it always had: stored blocks stay.
  std::string keyed(fingerprint);
  if (engine.config().kv_dtype != kv::KvDtype::kFp32) {
    keyed += "|kv_dtype=" + std::string(kv::kv_dtype_name(engine.config().kv_dtype));
  }
  DSERVE_ASSIGN_OR_RETURN(auto store,
                          kv::PrefixStore::open(std::move(options), keyed, store_layout(layout)));
  return std::unique_ptr<PrefixCache>(new PrefixCache(engine, std::move(layout), std::move(store)));
}

Result<PrefillJob> PrefixCache::begin(std::span<const int32_t> prompt) {
  if (prompt.empty()) return invalid_argument("prefill of an empty prompt");
  DSERVE_RETURN_IF_ERROR(detail::check_token_ids(prompt, engine_.config().vocab_size));
  constexpr int64_t kBlock = kv::kBlockTokens;
  PrefillJob job;
  job.prompt_.assign(prompt.begin(), prompt.end());
  const auto whole = static_cast<size_t>(job.length() / kBlock * kBlock);
  job.keys_ = kv::block_keys(store_->root(), prompt.first(whole));

  kv::PrefixStore::Match match = store_->match(prompt);
  job.result_.reused_blocks_from_tier = match.blocks_from_tier;
  if (match.keys.empty()) {
    DSERVE_ASSIGN_OR_RETURN(job.result_.request, engine_.new_request());
  } else {
    std::vector<BlockPages> blocks;
    blocks.reserve(match.blocks.size());
    for (auto& content : match.blocks) {
      blocks.push_back({std::move(content.pages[static_cast<size_t>(kv::Pool::kCompressed)]),
                        std::move(content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)]),
                        nullptr});
    }
    DSERVE_ASSIGN_OR_RETURN(
        RequestState restored,
        restore_state(engine_.config(), engine_.page_pools(), layout_, blocks, match.snapshot));
    DSERVE_ASSIGN_OR_RETURN(job.result_.request, engine_.import_state(std::move(restored)));
  }
  job.result_.reused_tokens = job.position();
  job.next_block_ = job.position() / kBlock;
  return job;
}

int64_t PrefixCache::chunk_end(const PrefillJob& job, int64_t max_tokens) const {
  constexpr int64_t kBlock = kv::kBlockTokens;
  const int64_t pos = job.position();
  const int64_t whole = job.length() / kBlock;
  int64_t end = std::min(job.length(), pos + max_tokens);
  // Stop at the first block end inside the chunk that gets a snapshot.
  for (int64_t b = pos / kBlock; (b + 1) * kBlock <= end; ++b) {
    if ((b + 1) * kBlock > pos && store_->wants_snapshot(b, whole)) return (b + 1) * kBlock;
  }
  return end;
}

Status PrefixCache::insert_blocks(PrefillJob& job, int64_t end) {
  constexpr int64_t kBlock = kv::kBlockTokens;
  if ((job.next_block_ + 1) * kBlock > end) return Status::ok();
  const int64_t whole = job.length() / kBlock;
  // The engine's own state where it lives on the host; a copy where it does not.
  std::optional<RequestState> copy;
  const RequestState* state = engine_.host_state(*job.result_.request);
  if (state == nullptr) {
    DSERVE_ASSIGN_OR_RETURN(copy, engine_.export_state(*job.result_.request));
    state = &*copy;
  }
  for (; (job.next_block_ + 1) * kBlock <= end; ++job.next_block_) {
    const int64_t b = job.next_block_;
    const BlockPages pages = block_pages(layout_, *state, b);
    kv::BlockContent content;
    content.pages[static_cast<size_t>(kv::Pool::kCompressed)] = pages.compressed;
    content.pages[static_cast<size_t>(kv::Pool::kIndexKeys)] = pages.index_keys;
    if ((b + 1) * kBlock == end && store_->wants_snapshot(b, whole)) {
      content.pages[static_cast<size_t>(kv::Pool::kSnapshot)] = {take_snapshot(layout_, *state)};
    }
    const kv::BlockKey& parent = b == 0 ? store_->root() : job.keys_[static_cast<size_t>(b - 1)];
    store_->insert(parent, job.keys_[static_cast<size_t>(b)], std::move(content));
  }
  return Status::ok();
}

Status PrefixCache::advance(PrefillJob& job, int64_t max_tokens) {
  PrefillJob* const one[1] = {&job};
  return advance_batch(one, std::span(&max_tokens, 1)).front();
}

std::vector<Status> PrefixCache::advance_batch(std::span<PrefillJob* const> jobs,
                                               std::span<const int64_t> max_tokens) {
  DSERVE_CHECK_MSG(jobs.size() == max_tokens.size(), "one token budget per prefill job");
  std::vector<Status> status(jobs.size(), Status::ok());
  std::vector<int64_t> ends(jobs.size(), 0);
  std::vector<StepRows> rows;
  std::vector<size_t> stepping;
  for (size_t i = 0; i < jobs.size(); ++i) {
    PrefillJob& job = *jobs[i];
    if (max_tokens[i] < 1) {
      status[i] = invalid_argument("advance: max_tokens must be >= 1");
      continue;
    }
    if (job.done()) continue;
    const int64_t pos = job.position();
    ends[i] = chunk_end(job, max_tokens[i]);
    rows.push_back({job.result_.request.get(),
                    std::span<const int32_t>(job.prompt_)
                        .subspan(static_cast<size_t>(pos), static_cast<size_t>(ends[i] - pos)),
                    LogitsFor::kLastToken});
    stepping.push_back(i);
  }
  if (rows.empty()) return status;
  auto logits = engine_.step(rows);
  if (!logits.is_ok()) {
    // No state moved: each job alone, so the error is its own job's.
    if (rows.size() == 1) {
      status[stepping.front()] = logits.status();
      return status;
    }
    for (const size_t i : stepping)
      status[i] = advance(*jobs[i], max_tokens[i]);
    return status;
  }
  for (size_t j = 0; j < stepping.size(); ++j) {
    const size_t i = stepping[j];
    PrefillResult& r = jobs[i]->result_;
    r.computed_tokens += static_cast<int64_t>(rows[j].tokens.size());
    r.last_logits = std::move((*logits)[j]);
    status[i] = insert_blocks(*jobs[i], ends[i]);
  }
  return status;
}

Result<PrefillResult> PrefixCache::prefill(std::span<const int32_t> prompt, int64_t max_chunk) {
  if (max_chunk < 1) return invalid_argument("max_chunk must be >= 1");
  DSERVE_ASSIGN_OR_RETURN(PrefillJob job, begin(prompt));
  while (!job.done())
    DSERVE_RETURN_IF_ERROR(advance(job, max_chunk));
  return std::move(job.result_);
}

}  // namespace dserve::model
