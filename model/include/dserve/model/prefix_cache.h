#pragma once
// PrefixCache: prefill through an Engine that reuses what a kvstore::PrefixStore holds and gives
// it every whole block it computes. The result is the same as a cold prefill: a restored block-end
// state is bit-for-bit the state that was stored (with the lossless codec), and the forward does
// not depend on how a prompt is split (tests/model/prefix_cache_test.cc).

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "dserve/core/status.h"
#include "dserve/kvstore/prefix_store.h"
#include "dserve/model/engine.h"
#include "dserve/model/kv_blocks.h"

namespace dserve::model {

struct PrefillResult {
  RequestHandle request;        // the engine's request, after the prompt
  Tensor last_logits;           // [1, vocab]: the prompt's last token
  int64_t reused_tokens = 0;    // restored from the store
  int64_t computed_tokens = 0;  // run through the forward
  std::array<int64_t, kvstore::kTierCount> reused_blocks_from_tier{};
};

// A prefill in progress: made by PrefixCache::begin, moved forward by PrefixCache::advance
// (so that a scheduler can interleave several within a token budget).
class PrefillJob {
 public:
  int64_t position() const { return result_.request->position(); }
  int64_t length() const { return static_cast<int64_t>(prompt_.size()); }
  bool done() const { return position() == length(); }
  std::span<const int32_t> prompt() const { return prompt_; }
  PrefillResult& result() { return result_; }
  const PrefillResult& result() const { return result_; }

 private:
  friend class PrefixCache;
  std::vector<int32_t> prompt_;
  std::vector<kvstore::BlockKey> keys_;  // of the prompt's whole blocks
  int64_t next_block_ = 0;               // the first block not yet inserted
  PrefillResult result_;
};

class PrefixCache {
 public:
  // `fingerprint` names the checkpoint (checkpoint_fingerprint of its directory). Fails when
  // the model cannot be cut into blocks (kv_block_layout) or the store cannot open.
  static Result<std::unique_ptr<PrefixCache>> open(Engine& engine, std::string_view fingerprint,
                                                   kvstore::PrefixStoreOptions options);

  // Restores the longest stored prefix of `prompt`, computes the rest in chunks of at most
  // `max_chunk` tokens (cut at the block ends that get a snapshot) and inserts every whole
  // block it computed. InvalidArgument/OutOfRange for an empty prompt or a bad token id.
  Result<PrefillResult> prefill(std::span<const int32_t> prompt, int64_t max_chunk = 2048);

  // The same in steps: begin() restores the longest stored prefix; each advance() computes at
  // most `max_tokens` more (stopping early at a block end that gets a snapshot) and inserts
  // the blocks it completed. InvalidArgument/OutOfRange as for prefill().
  Result<PrefillJob> begin(std::span<const int32_t> prompt);
  Status advance(PrefillJob& job, int64_t max_tokens);
  // advance() for several jobs in one engine step (each weight read once for all their rows):
  // job i computes at most max_tokens[i] more. Returns each job's status; when the step as a
  // whole fails, every job is advanced alone so that the error lands on its own job.
  std::vector<Status> advance_batch(std::span<PrefillJob* const> jobs,
                                    std::span<const int64_t> max_tokens);

  Engine& engine() { return engine_; }
  kvstore::PrefixStore& store() { return *store_; }
  const KvBlockLayout& layout() const { return layout_; }

 private:
  PrefixCache(Engine& engine, KvBlockLayout layout, std::unique_ptr<kvstore::PrefixStore> store);
  // The end of job's next chunk of at most max_tokens (stopping at a block end that gets a
  // snapshot), and the store inserts of the blocks a computed chunk completed.
  int64_t chunk_end(const PrefillJob& job, int64_t max_tokens) const;
  Status insert_blocks(PrefillJob& job, int64_t end);
  Engine& engine_;
  KvBlockLayout layout_;
  std::unique_ptr<kvstore::PrefixStore> store_;
};

// The store's view of a model's blocks.
kvstore::BlockLayout store_layout(const KvBlockLayout& layout);

}  // namespace dserve::model
