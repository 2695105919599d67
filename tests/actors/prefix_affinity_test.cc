// PrefixAffinity: leading-block matching, LRU eviction that keeps chain heads longest, clear.

#include "dserve/actors/prefix_affinity.h"

#include <gtest/gtest.h>

#include <vector>

namespace dserve::actors {
namespace {

std::vector<TokenId> tokens(size_t n, TokenId salt) {
  std::vector<TokenId> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<TokenId>(i * 7 + static_cast<size_t>(salt));
  return v;
}

TEST(PrefixAffinity, ChainCoversFullBlocksAndDependsOnEverythingBefore) {
  EXPECT_TRUE(prompt_block_chain(tokens(127, 0)).empty());
  EXPECT_EQ(prompt_block_chain(tokens(128, 0)).size(), 1u);
  EXPECT_EQ(prompt_block_chain(tokens(300, 0)).size(), 2u);
  // Same second block after a different first block: a different hash.
  auto a = tokens(256, 0), b = a;
  b[5] += 1;
  EXPECT_NE(prompt_block_chain(a)[1], prompt_block_chain(b)[1]);
  EXPECT_NE(prompt_block_chain(a)[0], prompt_block_chain(b)[0]);
}

TEST(PrefixAffinity, MatchesLeadingBlocksOnly) {
  PrefixAffinity index(100);
  const auto shared = tokens(3 * 128, 1);
  index.insert(prompt_block_chain(shared));
  auto longer = shared;
  const auto tail = tokens(2 * 128, 9);
  longer.insert(longer.end(), tail.begin(), tail.end());
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(longer)), 3u);
  auto diverged = longer;
  diverged[130] += 1;  // block 1 differs: only block 0 matches
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(diverged)), 1u);
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(tokens(512, 4))), 0u);
  index.clear();
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(shared)), 0u);
  EXPECT_EQ(index.size(), 0u);
}

TEST(PrefixAffinity, EvictsLeastRecentlyUsedKeepingChainHeads) {
  PrefixAffinity index(4);
  const auto first = tokens(3 * 128, 2);
  index.insert(prompt_block_chain(first));
  const auto second = tokens(2 * 128, 3);
  index.insert(prompt_block_chain(second));  // 5 blocks > 4: one of `first` goes
  EXPECT_EQ(index.size(), 4u);
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(second)), 2u);
  // The tail of `first` went, not its head: a chain is only useful from its start.
  EXPECT_EQ(index.matched_blocks(prompt_block_chain(first)), 2u);
}

}  // namespace
}  // namespace dserve::actors
