#pragma once
// PrefixAffinity: the gateway's guess of which 128-token prompt blocks a prefill worker holds
// in its prefix cache, from the prompts it sent there. A bounded LRU set of chained block
// hashes (block i's hash covers blocks 0..i), so "the leading N blocks are there" is N lookups.
// Approximate by design: the worker may have evicted a block (a cache miss costs compute, not
// correctness); it is cleared when the worker restarts. Not thread-safe.

#include <cstddef>
#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "dserve/actors/messages.h"

namespace dserve::actors {

inline constexpr size_t kAffinityBlockTokens = 128;

// Chained hashes of the prompt's full blocks (a partial last block has none).
std::vector<uint64_t> prompt_block_chain(std::span<const TokenId> prompt);

class PrefixAffinity {
 public:
  explicit PrefixAffinity(size_t capacity_blocks);

  // How many leading blocks of `chain` are present.
  size_t matched_blocks(std::span<const uint64_t> chain) const;
  // Records every block of `chain` as most recently used; evicts the least recently used
  // beyond capacity.
  void insert(std::span<const uint64_t> chain);
  void clear();
  size_t size() const { return index_.size(); }

 private:
  size_t capacity_;
  std::list<uint64_t> lru_;  // front: most recent
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> index_;
};

}  // namespace dserve::actors
