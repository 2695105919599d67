// Prefill through the prefix store: a hit at any block boundary, served from any tier (device
// pages, host memory, RocksDB, RocksDB after a restart), gives the same greedy continuation as
// a cold run, and the same logits bit for bit with the lossless codec (fp32 KV) or any codec
// (fp8 KV).

#include "dserve/model/prefix_cache.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "dserve/core/random.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;
namespace kv = dserve::kvstore;

constexpr int64_t kBlock = kv::kBlockTokens;
constexpr int kGenerated = 8;

std::vector<int32_t> random_tokens(int64_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int32_t> ids;
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(1 + rng.below(128000)));
  return ids;
}

struct Continuation {
  std::vector<float> prompt_logits;  // the prompt's last token
  std::vector<int32_t> generated;
  int64_t reused = 0;
  std::array<int64_t, kv::kTierCount> from_tier{};
};

Continuation greedy_decode(const Model& model, RequestState& state, Tensor last_logits) {
  Continuation run;
  run.prompt_logits.assign(last_logits.data(), last_logits.data() + last_logits.numel());
  for (int i = 0; i < kGenerated; ++i) {
    const int32_t next = argmax(std::span<const float>(last_logits.data(), last_logits.numel()));
    run.generated.push_back(next);
    auto logits = model.forward(std::span<const int32_t>(&next, 1), state, LogitsFor::kLastToken);
    EXPECT_TRUE(logits.is_ok());
    last_logits = std::move(*logits);
  }
  return run;
}

Continuation cold(const Model& model, std::span<const int32_t> prompt) {
  RequestState state = model.new_state();
  auto logits = model.forward(prompt, state, LogitsFor::kLastToken);
  EXPECT_TRUE(logits.is_ok());
  return greedy_decode(model, state, std::move(*logits));
}

Continuation warm(const Model& model, PrefixCache& cache, std::span<const int32_t> prompt) {
  auto r = cache.prefill(prompt, 100);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  auto state = cache.engine().release_state(std::move(r->request));
  EXPECT_TRUE(state.is_ok()) << state.status().to_string();
  Continuation run = greedy_decode(model, *state, std::move(r->last_logits));
  run.reused = r->reused_tokens;
  run.from_tier = r->reused_blocks_from_tier;
  return run;
}

class PrefixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dserve-prefix-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    auto fp = checkpoint_fingerprint(testing_support::tiny_model_dir());
    ASSERT_TRUE(fp.is_ok()) << fp.status().to_string();
    fingerprint_ = *fp;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<PrefixCache> open(kv::PrefixStoreOptions options) {
    options.snapshot_every_blocks = 1;
    auto cache = PrefixCache::open(testing_support::tiny_engine(kv_dtype_), fingerprint_, options);
    EXPECT_TRUE(cache.is_ok()) << cache.status().to_string();
    return cache.is_ok() ? std::move(*cache) : nullptr;
  }

  // For every block boundary b of a 5-block base prompt: a request sharing the first b blocks
  // and then diverging is served b blocks from `expected` and continues exactly like a cold run.
  void check_every_boundary(PrefixCache& cache, kv::Tier expected, bool populate = true) {
    const Model& model = testing_support::tiny_model(kv_dtype_);
    const auto base = random_tokens(5 * kBlock + 37, 1);
    if (populate) {
      ASSERT_TRUE(cache.prefill(base).is_ok());
    }
    for (int64_t b = 1; b <= 5; ++b) {
      std::vector<int32_t> prompt(base.begin(), base.begin() + b * kBlock);
      const auto tail = random_tokens(45, 100 + static_cast<uint64_t>(b));
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      const Continuation want = cold(model, prompt);
      const Continuation got = warm(model, cache, prompt);
      EXPECT_EQ(got.reused, b * kBlock) << "boundary " << b;
      EXPECT_EQ(got.from_tier[static_cast<size_t>(expected)], b) << "boundary " << b;
      EXPECT_EQ(got.generated, want.generated) << "boundary " << b;
      ASSERT_EQ(got.prompt_logits.size(), want.prompt_logits.size());
      // Bit for bit: the restored state is the stored one, and the forward does not depend on
      // how the prompt was split.
      EXPECT_EQ(std::memcmp(got.prompt_logits.data(), want.prompt_logits.data(),
                            want.prompt_logits.size() * sizeof(float)),
                0)
          << "boundary " << b;
      // Serve the next boundary from the same tier again.
      if (expected != kv::Tier::kDevice) cache.store().flush();
    }
  }

  fs::path dir_;
  std::string fingerprint_;
  kv::KvDtype kv_dtype_ = kv::KvDtype::kFp32;
};

// Hits from each tier, in each KV dtype. With fp8 KV the pages hold V4's served format and every
// tier keeps their bytes as they are: the lossy tier codec is asked for, and is the identity on
// them, so a hit still continues bit for bit like the plain fp8 forward.
class PrefixCacheTiers : public PrefixCacheTest, public ::testing::WithParamInterface<kv::KvDtype> {
 protected:
  void SetUp() override {
    PrefixCacheTest::SetUp();
    kv_dtype_ = GetParam();
  }
  kv::PrefixStoreOptions options() const {
    kv::PrefixStoreOptions o;
    if (kv_dtype_ == kv::KvDtype::kFp8) {
      o.host_codec = kv::Codec::kFp8;
      o.disk_codec = kv::Codec::kFp8;
    }
    return o;
  }
};
INSTANTIATE_TEST_SUITE_P(KvDtypes, PrefixCacheTiers,
                         ::testing::ValuesIn(testing_support::kKvDtypes),
                         testing_support::kv_dtype_param_name);

TEST_P(PrefixCacheTiers, HitFromDevicePagesAtEveryBoundary) {
  auto cache = open(options());
  ASSERT_NE(cache, nullptr);
  check_every_boundary(*cache, kv::Tier::kDevice);
  const auto m = cache->store().metrics();
  EXPECT_EQ(m.hits, 5u);
  EXPECT_EQ(m.hit_tokens, 15u * kBlock);
}

TEST_P(PrefixCacheTiers, HitFromHostMemoryAtEveryBoundary) {
  kv::PrefixStoreOptions o = options();
  o.device_capacity_bytes = 0;  // everything not in use moves to the host tier
  auto cache = open(o);
  ASSERT_NE(cache, nullptr);
  check_every_boundary(*cache, kv::Tier::kHost);
  EXPECT_GT(cache->store().metrics().tiers[static_cast<size_t>(kv::Tier::kHost)].bytes, 0u);
}

TEST_P(PrefixCacheTiers, HitFromRocksDbAtEveryBoundaryAndAfterARestart) {
  kv::PrefixStoreOptions o = options();
  o.device_capacity_bytes = 0;
  o.host_capacity_bytes = 0;
  o.disk_path = (dir_ / "kv").string();
  {
    auto cache = open(o);
    ASSERT_NE(cache, nullptr);
    check_every_boundary(*cache, kv::Tier::kDisk);
  }
  // A new store on the same files: the index is empty, the blocks are found by key.
  auto again = open(o);
  ASSERT_NE(again, nullptr);
  check_every_boundary(*again, kv::Tier::kDisk, /*populate=*/false);
}

// An fp8 store and an fp32 store of one checkpoint never share a block, and an fp8 block is a
// fraction of an fp32 one.
TEST_F(PrefixCacheTest, Fp8AndFp32KvNeverShareAndFp8BlocksAreSmaller) {
  auto fp32 = open({});
  kv_dtype_ = kv::KvDtype::kFp8;
  auto fp8 = open({});
  ASSERT_TRUE(fp32 && fp8);
  EXPECT_NE(fp32->store().root(), fp8->store().root());
  const auto& a = fp32->layout().compressed;
  const auto& b = fp8->layout().compressed;
  EXPECT_NE(a.digest(), b.digest());
  EXPECT_LT(2 * b.bytes(), a.bytes()) << "fp8 " << b.bytes() << " bytes, fp32 " << a.bytes();
  std::fprintf(stderr,
               "[ info ] tiny preset, compressed entries of one block: fp32 %lld bytes, "
               "fp8 %lld; indexer keys: fp32 %lld, fp4 %lld\n",
               static_cast<long long>(a.bytes()), static_cast<long long>(b.bytes()),
               static_cast<long long>(fp32->layout().index_keys.bytes()),
               static_cast<long long>(fp8->layout().index_keys.bytes()));
}

TEST_F(PrefixCacheTest, OtherCheckpointNeverShares) {
  auto cache = open({});
  ASSERT_NE(cache, nullptr);
  const auto prompt = random_tokens(3 * kBlock + 5, 9);
  ASSERT_TRUE(cache->prefill(prompt).is_ok());
  auto other = PrefixCache::open(testing_support::tiny_engine(), fingerprint_ + "-other", {});
  ASSERT_TRUE(other.is_ok());
  EXPECT_NE((*other)->store().root(), cache->store().root());
  const auto r = cache->prefill(prompt);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->reused_tokens, 3 * kBlock);
}

TEST_F(PrefixCacheTest, SnapshotsEveryKBlocksShortenHitsToTheLastSnapshot) {
  const Model& model = testing_support::tiny_model();
  auto cache = PrefixCache::open(testing_support::tiny_engine(), fingerprint_, [] {
    kv::PrefixStoreOptions o;
    o.snapshot_every_blocks = 4;
    return o;
  }());
  ASSERT_TRUE(cache.is_ok());
  const auto base = random_tokens(7 * kBlock + 3, 4);
  ASSERT_TRUE((*cache)->prefill(base).is_ok());
  // Snapshots at the ends of blocks 4 and 7 (the sequence's last whole block); each request
  // adds one at its own last whole block.
  for (const auto& [shared, want] :
       std::vector<std::pair<int64_t, int64_t>>{{3, 0}, {5, 4}, {6, 5}, {7, 7}}) {
    std::vector<int32_t> prompt(base.begin(), base.begin() + shared * kBlock);
    const auto tail = random_tokens(20, 50 + static_cast<uint64_t>(shared));
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    auto r = (*cache)->prefill(prompt);
    ASSERT_TRUE(r.is_ok());
    EXPECT_EQ(r->reused_tokens, want * kBlock) << "shared " << shared;
    auto state = (*cache)->engine().release_state(std::move(r->request));
    ASSERT_TRUE(state.is_ok());
    const Continuation a = greedy_decode(model, *state, r->last_logits);
    const Continuation b = cold(model, prompt);
    EXPECT_EQ(a.generated, b.generated) << "shared " << shared;
  }
}

}  // namespace
}  // namespace dserve::model

namespace dserve::model {
namespace {

// Random byte flips in every stored value (through RocksDB itself, behind the store's back):
// after a restart nothing corrupt is served; the request falls back to computing and still
// continues exactly like a cold run.
TEST_F(PrefixCacheTest, CorruptDiskValuesAreMissesNeverServed) {
  kv::PrefixStoreOptions o;
  o.device_capacity_bytes = 0;
  o.host_capacity_bytes = 0;
  o.disk_path = (dir_ / "kv").string();
  const auto base = random_tokens(4 * kBlock + 10, 3);
  {
    auto cache = open(o);
    ASSERT_NE(cache, nullptr);
    ASSERT_TRUE(cache->prefill(base).is_ok());
    cache->store().flush();
  }
  {
    rocksdb::Options options;
    std::vector<rocksdb::ColumnFamilyDescriptor> families{{rocksdb::kDefaultColumnFamilyName, {}}};
    for (kv::Pool p : kv::kAllPools)
      families.emplace_back(std::string(kv::pool_name(p)), rocksdb::ColumnFamilyOptions());
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(options, o.disk_path, families, &handles, &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    SplitMix64 rng(5);
    int corrupted = 0;
    for (size_t f = 1; f < handles.size(); ++f) {
      std::vector<std::pair<std::string, std::string>> values;
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), handles[f]));
      for (it->SeekToFirst(); it->Valid(); it->Next())
        values.emplace_back(it->key().ToString(), it->value().ToString());
      for (auto& [key, value] : values) {
        const size_t at = rng.below(value.size());
        value[at] = static_cast<char>(value[at] ^ (1 << rng.below(8)));
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), handles[f], key, value).ok());
        ++corrupted;
      }
    }
    EXPECT_GT(corrupted, 8);
    for (auto* h : handles)
      ASSERT_TRUE(db->DestroyColumnFamilyHandle(h).ok());
  }
  auto cache = open(o);
  ASSERT_NE(cache, nullptr);
  const Model& model = testing_support::tiny_model();
  const Continuation got = warm(model, *cache, base);
  EXPECT_EQ(got.reused, 0);
  EXPECT_EQ(got.generated, cold(model, base).generated);
  const auto m = cache->store().metrics();
  EXPECT_GT(m.corrupt, 0u);
  ASSERT_TRUE(m.disk.has_value());
  EXPECT_GT(m.disk->corrupt, 0u);
  // The recomputed blocks replaced the bad ones: the next request is served from disk.
  cache->store().flush();
  const Continuation again = warm(model, *cache, base);
  EXPECT_EQ(again.reused, 4 * kBlock);
  EXPECT_EQ(again.generated, got.generated);
}

}  // namespace
}  // namespace dserve::model
