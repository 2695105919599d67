// Placement: the gateway's choice of prefill and decode workers and its count of what each
// holds, driven directly (no actors, no processes).

#include "dserve/actors/placement.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

namespace dserve::actors {
namespace {

std::vector<TokenId> prompt_of(size_t tokens, TokenId first) {
  std::vector<TokenId> p(tokens);
  std::iota(p.begin(), p.end(), first);
  return p;
}

// Three prefill workers (0, 1, 2) and two decode workers (3, 4), all available.
Placement three_and_two(uint64_t queue_tokens = 1000) {
  Placement p(PlacementOptions{queue_tokens, 1024});
  for (int i = 0; i < 3; ++i)
    p.set_available(p.add_worker(Role::kPrefill), true);
  for (int i = 0; i < 2; ++i)
    p.set_available(p.add_worker(Role::kDecode), true);
  return p;
}

TEST(Placement, PrefillGoesWhereTheLongestPrefixProbablyIs) {
  Placement p = three_and_two(100000);
  const auto shared = prompt_of(512, 1);  // 4 blocks
  auto longer = shared;
  const auto tail = prompt_of(256, 9000);
  longer.insert(longer.end(), tail.begin(), tail.end());  // 6 blocks, the first 4 shared
  p.record_prefix(1, prompt_block_chain(std::span(shared).first(256)));  // 2 blocks
  p.record_prefix(2, prompt_block_chain(shared));                        // all 4
  const auto chain = prompt_block_chain(longer);
  EXPECT_EQ(p.matched_blocks(1, chain), 2u);
  EXPECT_EQ(p.matched_blocks(2, chain), 4u);
  // Worker 2 has more queued than 0 and 1, and still wins on the prefix.
  ASSERT_TRUE(p.claim_prefill(prompt_block_chain(prompt_of(128, 5)), 900).is_ok());
  auto chosen = p.claim_prefill(chain, longer.size());
  ASSERT_TRUE(chosen.is_ok()) << chosen.status().to_string();
  EXPECT_EQ(*chosen, 2u);
}

TEST(Placement, PrefillTiesGoToTheShortestQueueThenTheLowestIndex) {
  Placement p = three_and_two();
  const auto chain = prompt_block_chain(prompt_of(300, 1));
  auto first = p.claim_prefill(chain, 300);
  ASSERT_TRUE(first.is_ok());
  EXPECT_EQ(*first, 0u);  // all empty: the lowest index
  auto second = p.claim_prefill(chain, 300);
  ASSERT_TRUE(second.is_ok());
  EXPECT_EQ(*second, 1u);  // 0 has 300 queued
  p.end_prefill(0, 300);
  auto third = p.claim_prefill(chain, 300);
  ASSERT_TRUE(third.is_ok());
  EXPECT_EQ(*third, 0u);  // 0 is empty again, 2 too: the lowest index
  EXPECT_EQ(p.load(0).placed, 1u);
  EXPECT_EQ(p.load(0).placed_total, 2u);
  EXPECT_EQ(p.load(0).queued_tokens, 300u);
}

TEST(Placement, FullQueuesMakeARequestWaitAndAnIdleWorkerTakesAnyLength) {
  Placement p = three_and_two(/*queue_tokens=*/1000);
  // An idle worker takes a prompt longer than the bound.
  for (size_t w = 0; w < 3; ++w) {
    auto c = p.claim_prefill({}, 5000);
    ASSERT_TRUE(c.is_ok()) << c.status().to_string();
    EXPECT_EQ(*c, w);
  }
  // Every queue holds 5000 > 1000 tokens: even one more token waits.
  auto full = p.claim_prefill({}, 1);
  ASSERT_FALSE(full.is_ok());
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.status().message().find("1000 tokens"), std::string::npos);
  // One queue drains: the next prompt goes there.
  p.end_prefill(1, 5000);
  auto next = p.claim_prefill({}, 700);
  ASSERT_TRUE(next.is_ok());
  EXPECT_EQ(*next, 1u);
  // 700 + 400 > 1000: it does not fit behind the 700 either.
  auto behind = p.claim_prefill({}, 400);
  ASSERT_FALSE(behind.is_ok());
  EXPECT_EQ(behind.status().code(), StatusCode::kResourceExhausted);
  auto fits = p.claim_prefill({}, 300);
  ASSERT_TRUE(fits.is_ok());
  EXPECT_EQ(*fits, 1u);
}

TEST(Placement, UnavailableWorkersAreNeverChosen) {
  Placement p = three_and_two();
  p.set_available(0, false);
  p.set_available(1, false);
  auto c = p.claim_prefill({}, 10);
  ASSERT_TRUE(c.is_ok());
  EXPECT_EQ(*c, 2u);
  p.set_available(2, false);
  auto none = p.claim_prefill({}, 10);
  ASSERT_FALSE(none.is_ok());
  EXPECT_EQ(none.status().code(), StatusCode::kUnavailable);
  p.set_available(3, false);
  EXPECT_EQ(p.decode_order(), std::vector<size_t>{4});
  p.set_available(4, false);
  EXPECT_TRUE(p.decode_order().empty());
}

TEST(Placement, DecodeOrderIsFewestPlacedThenMostFreeKv) {
  Placement p = three_and_two();
  const size_t extra = p.add_worker(Role::kDecode);  // 5
  p.set_available(extra, true);
  p.set_free_kv_bytes(3, 100);
  p.set_free_kv_bytes(4, 300);
  p.set_free_kv_bytes(5, 200);
  EXPECT_EQ(p.decode_order(), (std::vector<size_t>{4, 5, 3}));
  p.start_decode(4);
  EXPECT_EQ(p.decode_order(), (std::vector<size_t>{5, 3, 4}));
  p.start_decode(5);
  p.start_decode(3);
  EXPECT_EQ(p.decode_order(), (std::vector<size_t>{4, 5, 3}));
  p.end_decode(3);
  EXPECT_EQ(p.decode_order(), (std::vector<size_t>{3, 4, 5}));
  EXPECT_EQ(p.load(4).placed_total, 1u);
  // Prefill workers are never in the decode order.
  for (size_t w : p.decode_order())
    EXPECT_EQ(p.load(w).role, Role::kDecode);
}

TEST(Placement, ARestartForgetsWhatTheWorkerHeld) {
  Placement p = three_and_two();
  const auto chain = prompt_block_chain(prompt_of(384, 1));
  p.record_prefix(1, chain);
  EXPECT_EQ(p.matched_blocks(1, chain), 3u);
  auto c = p.claim_prefill(chain, 384);
  ASSERT_TRUE(c.is_ok());
  EXPECT_EQ(*c, 1u);
  p.forget_prefixes(1);
  EXPECT_EQ(p.matched_blocks(1, chain), 0u);
  // Without the prefix, 1's queue (384) makes it lose to an empty worker.
  auto after = p.claim_prefill(chain, 384);
  ASSERT_TRUE(after.is_ok());
  EXPECT_EQ(*after, 0u);
}

TEST(PlacementDeathTest, EndingWhatWasNeverPlacedAborts) {
  Placement p = three_and_two();
  EXPECT_DEATH(p.end_prefill(0, 10), "had none placed");
  EXPECT_DEATH(p.end_decode(3), "had none placed");
  EXPECT_DEATH(p.start_decode(0), "prefill worker");
  EXPECT_DEATH((void)p.load(99), "no worker 99");
}

}  // namespace
}  // namespace dserve::actors
