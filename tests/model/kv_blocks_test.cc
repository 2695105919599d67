// Block pages and block-end snapshots: a state rebuilt from a prefix's pages and the snapshot
// at its end continues exactly (bit for bit) like the state that produced them.

#include "dserve/model/kv_blocks.h"

#include <gtest/gtest.h>

#include <cstring>

#include "dserve/core/random.h"
#include "test_model.h"

namespace dserve::model {
namespace {

std::vector<int32_t> random_tokens(int64_t n, uint64_t seed, int64_t vocab) {
  SplitMix64 rng(seed);
  std::vector<int32_t> ids;
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  return ids;
}

TEST(KvBlocks, LayoutOfTheTinyPreset) {
  const Model& model = testing_support::tiny_model();
  const auto layout = kv_block_layout(model.config(), model.page_pools());
  ASSERT_TRUE(layout.is_ok()) << layout.status().to_string();
  // tiny: sliding, CSA (rate 4), HCA (rate 16), CSA; head_dim 64, index_head_dim 32, window 16.
  ASSERT_EQ(layout->compressed.segments.size(), 3u);
  EXPECT_EQ(layout->compressed.segments[0], (kvstore::Segment{32, 64, 16}));
  EXPECT_EQ(layout->compressed.segments[1], (kvstore::Segment{8, 64, 16}));
  ASSERT_EQ(layout->index_keys.segments.size(), 2u);
  EXPECT_EQ(layout->index_keys.segments[0], (kvstore::Segment{32, 32, 16}));
  // 4 windows of 15 x 64, and per CSA layer 2 x (4 x 64) + 2 x (4 x 32).
  EXPECT_EQ(layout->snapshot.floats(), 4 * 15 * 64 + 2 * (2 * 4 * 64 + 2 * 4 * 32));
}

TEST(KvBlocks, RejectsModelsThatDoNotCutIntoBlocks) {
  const Model& model = testing_support::tiny_model();
  ModelConfig c = model.config();
  c.hca_rate = 48;
  auto pools = KvPagePools::create(c);
  const auto bad_rate = kv_block_layout(c, pools);
  ASSERT_FALSE(bad_rate.is_ok());
  EXPECT_NE(bad_rate.status().message().find("compress rate 48"), std::string::npos);
  c = model.config();
  c.sliding_window = 300;
  EXPECT_FALSE(kv_block_layout(c, KvPagePools::create(c)).is_ok());
}

TEST(KvBlocks, RestoredStateContinuesBitForBit) {
  const Model& model = testing_support::tiny_model();
  const ModelConfig& c = model.config();
  const auto layout = kv_block_layout(c, model.page_pools());
  ASSERT_TRUE(layout.is_ok());
  const auto ids = random_tokens(3 * 128 + 50, 7, c.vocab_size);
  for (int64_t blocks = 1; blocks <= 3; ++blocks) {
    const auto head = std::span(ids).first(static_cast<size_t>(blocks * 128));
    const auto tail = std::span(ids).subspan(static_cast<size_t>(blocks * 128));
    RequestState original = model.new_state();
    // Prefill the head in uneven chunks: the pages do not depend on the split.
    ASSERT_TRUE(model.forward(head.first(100), original).is_ok());
    ASSERT_TRUE(model.forward(head.subspan(100), original).is_ok());
    std::vector<BlockPages> pages;
    for (int64_t b = 0; b < blocks; ++b)
      pages.push_back(block_pages(*layout, original, b));
    const kvstore::PageRef snapshot = take_snapshot(*layout, original);

    auto restored = restore_state(c, model.page_pools(), *layout, pages, snapshot);
    ASSERT_TRUE(restored.is_ok()) << restored.status().to_string();
    EXPECT_EQ(restored->position(), blocks * 128);
    const auto a = model.forward(tail, original);
    const auto b = model.forward(tail, *restored);
    ASSERT_TRUE(a.is_ok() && b.is_ok());
    ASSERT_EQ(a->numel(), b->numel());
    EXPECT_EQ(std::memcmp(a->data(), b->data(), static_cast<size_t>(a->numel()) * sizeof(float)), 0)
        << "after " << blocks << " restored blocks";
    // The restored request wrote its own pages: the shared ones are unchanged.
    EXPECT_EQ(block_pages(*layout, *restored, 0).compressed[0], pages[0].compressed[0]);
  }
}

TEST(KvBlocks, RestoreRefusesMissingPages) {
  const Model& model = testing_support::tiny_model();
  const auto layout = kv_block_layout(model.config(), model.page_pools());
  ASSERT_TRUE(layout.is_ok());
  BlockPages empty;
  const auto r =
      restore_state(model.config(), model.page_pools(), *layout,
                    std::span<const BlockPages>(&empty, 1), layout->snapshot_pool->allocate());
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("compressed pages"), std::string::npos)
      << r.status().message();
}

}  // namespace
}  // namespace dserve::model
