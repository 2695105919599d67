#include "dserve/actors/prefix_affinity.h"

#include <xxhash.h>

#include "dserve/core/check.h"

namespace dserve::actors {

std::vector<uint64_t> prompt_block_chain(std::span<const TokenId> prompt) {
  std::vector<uint64_t> chain;
  chain.reserve(prompt.size() / kAffinityBlockTokens);
  uint64_t prev = 0;
  for (size_t b = 0; (b + 1) * kAffinityBlockTokens <= prompt.size(); ++b) {
    prev = XXH3_64bits_withSeed(prompt.data() + b * kAffinityBlockTokens,
                                kAffinityBlockTokens * sizeof(TokenId), prev);
    chain.push_back(prev);
  }
  return chain;
}

PrefixAffinity::PrefixAffinity(size_t capacity_blocks) : capacity_(capacity_blocks) {
  DSERVE_CHECK(capacity_ > 0);
}

size_t PrefixAffinity::matched_blocks(std::span<const uint64_t> chain) const {
  size_t n = 0;
  while (n < chain.size() && index_.count(chain[n]) != 0)
    ++n;
  return n;
}

void PrefixAffinity::insert(std::span<const uint64_t> chain) {
  // Last block first, so that the leading blocks end up most recent and are evicted last: a
  // chain is only useful from its start.
  for (auto rit = chain.rbegin(); rit != chain.rend(); ++rit) {
    const uint64_t h = *rit;
    auto it = index_.find(h);
    if (it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      continue;
    }
    lru_.push_front(h);
    index_.emplace(h, lru_.begin());
    if (index_.size() > capacity_) {
      index_.erase(lru_.back());
      lru_.pop_back();
    }
  }
}

void PrefixAffinity::clear() {
  lru_.clear();
  index_.clear();
}

}  // namespace dserve::actors
