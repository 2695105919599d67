// PrefixStore with synthetic V4-width blocks: matching rules, tier movement, LRU and the
// memory limits of the device and host tiers under 10x their volume.

#include "dserve/kvstore/prefix_store.h"

#include <gtest/gtest.h>
#include <malloc.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "dserve/core/random.h"

namespace dserve::kvstore {
namespace {

// A V4-width model with one CSA and one HCA layer: per block 32 + 1 compressed entries of
// 512 channels, 32 indexer keys of 128, and a snapshot of a 127-token window per layer.
struct Fixture {
  BlockLayout layout;
  Fixture() {
    auto& c = layout.payload[static_cast<size_t>(Pool::kCompressed)];
    c.segments = {{32, 512, 64}, {1, 512, 64}};
    layout.page_pools[static_cast<size_t>(Pool::kCompressed)] = {
        PagePool::create("csa.compressed", 32, 512), PagePool::create("hca.compressed", 1, 512)};
    layout.payload[static_cast<size_t>(Pool::kIndexKeys)].segments = {{32, 128, 64}};
    layout.page_pools[static_cast<size_t>(Pool::kIndexKeys)] = {
        PagePool::create("csa.index_keys", 32, 128)};
    layout.payload[static_cast<size_t>(Pool::kSnapshot)].segments = {{127, 512, 64},
                                                                     {127, 512, 64}};
    layout.page_pools[static_cast<size_t>(Pool::kSnapshot)] = {
        PagePool::create("snapshot", 1, 2 * 127 * 512)};
  }

  // Deterministic content for a block: every float is a function of (key, pool, index).
  BlockContent content(const BlockKey& key, bool snapshot) const {
    BlockContent out;
    for (Pool p : kAllPools) {
      if (p == Pool::kSnapshot && !snapshot) continue;
      const auto i = static_cast<size_t>(p);
      SplitMix64 rng(key.lo ^ (static_cast<uint64_t>(p) << 56));
      for (const auto& pool : layout.page_pools[i]) {
        PageRef page = pool->allocate();
        const int64_t floats = page->size_bytes() / static_cast<int64_t>(sizeof(float));
        for (int64_t f = 0; f < floats; ++f)
          page->as_floats()[f] = static_cast<float>(rng.normal());
        out.pages[i].push_back(std::move(page));
      }
    }
    return out;
  }
  bool same(const std::vector<PageRef>& a, const std::vector<PageRef>& b) const {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i]->size_bytes() != b[i]->size_bytes() ||
          std::memcmp(a[i]->data(), b[i]->data(), static_cast<size_t>(a[i]->size_bytes())) != 0) {
        return false;
      }
    }
    return true;
  }
};

std::vector<int32_t> tokens(int64_t blocks, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(blocks * kBlockTokens + 1));
  for (auto& x : t)
    x = static_cast<int32_t>(rng.below(100000));
  return t;
}

// Inserts every block of `t`, snapshots where the store wants them.
void insert_all(PrefixStore& store, const Fixture& f, std::span<const int32_t> t) {
  const auto keys = block_keys(store.root(), t);
  for (size_t b = 0; b < keys.size(); ++b) {
    const bool snap =
        store.wants_snapshot(static_cast<int64_t>(b), static_cast<int64_t>(keys.size()));
    store.insert(b == 0 ? store.root() : keys[b - 1], keys[b], f.content(keys[b], snap));
  }
}

uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

TEST(PrefixStore, MatchIsTheLongestStoredPrefixEndingAtASnapshot) {
  Fixture f;
  PrefixStoreOptions o;
  o.snapshot_every_blocks = 3;
  auto store = PrefixStore::open(o, "model-a", f.layout);
  ASSERT_TRUE(store.is_ok()) << store.status().to_string();
  const auto t = tokens(8, 1);
  insert_all(**store, f, std::span(t).first(8 * kBlockTokens));  // snapshots after 3, 6, 8
  const auto keys = block_keys((*store)->root(), t);
  for (int64_t shared = 0; shared <= 8; ++shared) {
    std::vector<int32_t> q(t.begin(), t.begin() + shared * kBlockTokens);
    q.push_back(7);  // one more token to compute
    const auto m = (*store)->match(q);
    const int64_t want = shared >= 8 ? 8 : (shared >= 6 ? 6 : (shared >= 3 ? 3 : 0));
    ASSERT_EQ(static_cast<int64_t>(m.keys.size()), want) << "shared " << shared;
    for (int64_t b = 0; b < want; ++b) {
      const auto expect = f.content(keys[static_cast<size_t>(b)], false);
      EXPECT_TRUE(f.same(m.blocks[static_cast<size_t>(b)].pages[0], expect.pages[0]));
    }
    if (want > 0) {
      const auto snap = f.content(keys[static_cast<size_t>(want - 1)], true);
      EXPECT_TRUE(f.same({m.snapshot}, snap.pages[static_cast<size_t>(Pool::kSnapshot)]));
    }
  }
  // A whole-prompt match leaves the last token to compute.
  EXPECT_EQ((*store)->match(std::span(t).first(8 * kBlockTokens)).keys.size(), 6u);
  // Another fingerprint shares nothing.
  auto other = PrefixStore::open(o, "model-b", f.layout);
  ASSERT_TRUE(other.is_ok());
  EXPECT_TRUE((*other)->match(t).keys.empty());
}

TEST(PrefixStore, RejectsALayoutWhosePagesDoNotFitThePayload) {
  Fixture f;
  f.layout.payload[static_cast<size_t>(Pool::kIndexKeys)].segments[0].rows = 31;
  const auto store = PrefixStore::open({}, "m", f.layout);
  ASSERT_FALSE(store.is_ok());
  EXPECT_NE(store.status().message().find("index_keys"), std::string::npos);
}

TEST(PrefixStore, MemoryStaysWithinTierLimitsUnderTenTimesTheVolume) {
  Fixture f;
  PrefixStoreOptions o;
  o.device_capacity_bytes = 8ull << 20;
  o.host_capacity_bytes = 8ull << 20;
  o.snapshot_every_blocks = 2;
  auto opened = PrefixStore::open(o, "m", f.layout);
  ASSERT_TRUE(opened.is_ok());
  PrefixStore& store = **opened;
  malloc_trim(0);
  const uint64_t rss_before = resident_bytes();
  uint64_t inserted_bytes = 0, peak_rss = 0;
  const uint64_t limit = o.device_capacity_bytes + o.host_capacity_bytes;
  for (uint64_t seq = 0; inserted_bytes < 10 * limit; ++seq) {
    const auto t = tokens(16, 1000 + seq);
    insert_all(store, f, std::span(t).first(16 * kBlockTokens));
    const auto m = store.metrics();
    ASSERT_LE(m.tiers[0].bytes, o.device_capacity_bytes) << "after sequence " << seq;
    ASSERT_LE(m.tiers[1].bytes, o.host_capacity_bytes) << "after sequence " << seq;
    inserted_bytes = m.inserted_blocks * (33 * 512 + 32 * 128) * sizeof(float) +
                     m.snapshots * 2 * 127 * 512 * sizeof(float);
    malloc_trim(0);
    peak_rss = std::max(peak_rss, resident_bytes());
  }
  const auto m = store.metrics();
  EXPECT_GT(m.tiers[0].evictions, 0u);
  EXPECT_GT(m.tiers[1].evictions, 0u);
  // Resident growth: the two tiers plus allocator slack, against 10x that inserted.
  const uint64_t growth = peak_rss > rss_before ? peak_rss - rss_before : 0;
  std::printf("inserted %.1f MiB, tier limits %.1f MiB, peak resident growth %.1f MiB\n",
              static_cast<double>(inserted_bytes) / (1 << 20),
              static_cast<double>(limit) / (1 << 20), static_cast<double>(growth) / (1 << 20));
  EXPECT_LT(growth, limit + (8ull << 20));
}

TEST(PrefixStore, RecentlyMatchedPrefixSurvivesPressureInTheDeviceTier) {
  Fixture f;
  PrefixStoreOptions o;
  o.device_capacity_bytes = 6ull << 20;
  o.host_capacity_bytes = 64ull << 20;
  o.snapshot_every_blocks = 1;
  auto opened = PrefixStore::open(o, "m", f.layout);
  ASSERT_TRUE(opened.is_ok());
  PrefixStore& store = **opened;
  const auto hot = tokens(4, 1);
  insert_all(store, f, std::span(hot).first(4 * kBlockTokens));
  for (uint64_t seq = 0; seq < 12; ++seq) {
    const auto cold = tokens(2, 500 + seq);
    insert_all(store, f, std::span(cold).first(2 * kBlockTokens));
    ASSERT_EQ(store.match(hot).keys.size(), 4u);  // touched after every insert
  }
  const auto m = store.match(hot);
  EXPECT_EQ(m.blocks_from_tier[static_cast<size_t>(Tier::kDevice)], 4);
  // Old cold prefixes went to the host tier and come back from there, intact.
  const auto first_cold = tokens(2, 500);
  const auto back = store.match(first_cold);
  ASSERT_EQ(back.keys.size(), 2u);
  EXPECT_EQ(back.blocks_from_tier[static_cast<size_t>(Tier::kHost)], 2);
  EXPECT_TRUE(f.same(back.blocks[1].pages[0], f.content(back.keys[1], false).pages[0]));
}

}  // namespace
}  // namespace dserve::kvstore
