// The RocksDB disk tier on real files: round trips and reopening, LRU capacity, the bounded
// write-back queue, corrupt values (tampered through RocksDB directly, and a damaged SST file)
// never returned as valid, and a writer process killed with SIGKILL mid-write-back three times
// leaving a store whose every block is intact and which holds every block it had written.

#include "dserve/kvstore/disk_tier.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "disk_tier_workload.h"
#include "dserve/core/random.h"
#include "dserve/kvstore/codec.h"

namespace dserve::kvstore {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

const PayloadLayout kLayout{{{8, 32, 8}}};  // 1 KiB lossless, ~0.4 KiB fp8

BlockKey test_key(uint64_t i) {
  return {0x5eed000000000000ULL ^ (i * 0x9E3779B97F4A7C15ULL), i};
}

std::vector<float> test_payload(uint64_t i) {
  SplitMix64 rng(i + 1);
  std::vector<float> data(static_cast<size_t>(kLayout.floats()));
  for (float& x : data)
    x = static_cast<float>(rng.normal());
  return data;
}

std::vector<uint8_t> test_value(uint64_t i, Pool pool = Pool::kCompressed,
                                Codec codec = Codec::kLossless) {
  return encode_payload(test_key(i), pool, codec, kLayout, test_payload(i));
}

// The documented on-disk key: hi then lo, big-endian.
std::string disk_key(const BlockKey& key) {
  std::string out(16, '\0');
  for (size_t i = 0; i < 8; ++i) {
    out[i] = static_cast<char>(key.hi >> (56 - 8 * i));
    out[8 + i] = static_cast<char>(key.lo >> (56 - 8 * i));
  }
  return out;
}

// The store opened with RocksDB directly, as a foreign writer (or bit rot) would meet it.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    // Uncompressed like the tier's pool families, so that file sizes compare with values.
    rocksdb::ColumnFamilyOptions options;
    options.compression = rocksdb::kNoCompression;
    std::vector<rocksdb::ColumnFamilyDescriptor> families;
    families.emplace_back(rocksdb::kDefaultColumnFamilyName, options);
    for (Pool pool : kAllPools)
      families.emplace_back(std::string(pool_name(pool)), options);
    rocksdb::DB* raw = nullptr;
    const rocksdb::Status s =
        rocksdb::DB::Open(rocksdb::DBOptions(), path, families, &handles_, &raw);
    EXPECT_TRUE(s.ok()) << s.ToString();
    db_.reset(raw);
  }
  ~RawDb() {
    for (auto* h : handles_)
      (void)db_->DestroyColumnFamilyHandle(h);
    (void)db_->Close();
  }
  rocksdb::DB& db() { return *db_; }
  rocksdb::ColumnFamilyHandle* catalogue() { return handles_[0]; }
  rocksdb::ColumnFamilyHandle* pool(Pool p) { return handles_[1 + static_cast<size_t>(p)]; }

  void put(Pool p, const BlockKey& key, const std::vector<uint8_t>& value) {
    const rocksdb::Slice v(reinterpret_cast<const char*>(value.data()), value.size());
    ASSERT_TRUE(db_->Put(rocksdb::WriteOptions(), pool(p), disk_key(key), v).ok());
  }
  std::string get(Pool p, const BlockKey& key) {
    std::string v;
    EXPECT_TRUE(db_->Get(rocksdb::ReadOptions(), pool(p), disk_key(key), &v).ok());
    return v;
  }
  // (entries, value bytes) of a column family.
  std::pair<uint64_t, uint64_t> scan(rocksdb::ColumnFamilyHandle* cf) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf));
    uint64_t n = 0, bytes = 0;
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ++n;
      bytes += it->value().size();
    }
    EXPECT_TRUE(it->status().ok()) << it->status().ToString();
    return {n, bytes};
  }

 private:
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
};

class DiskTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("dserve-disk-tier-" + std::string(info->name()) + "-" + std::to_string(getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<DiskTier> open(uint64_t capacity = 64ull << 20, uint64_t queue = 16ull << 20) {
    DiskTierOptions options;
    options.path = dir_.string();
    options.capacity_bytes = capacity;
    options.write_queue_bytes = queue;
    auto tier = DiskTier::open(options);
    EXPECT_TRUE(tier.is_ok()) << tier.status().to_string();
    return tier.is_ok() ? std::move(tier).value() : nullptr;
  }

  fs::path dir_;
};

TEST_F(DiskTierTest, RoundTripAndReopen) {
  constexpr uint64_t kBlocks = 20;
  uint64_t total = 0;
  {
    auto tier = open();
    ASSERT_NE(tier, nullptr);
    for (uint64_t i = 0; i < kBlocks; ++i) {
      for (Pool pool : kAllPools) {
        auto value = test_value(i, pool, i % 2 ? Codec::kFp8 : Codec::kLossless);
        total += value.size();
        ASSERT_TRUE(tier->put_async(test_key(i), pool, value));
        // Served from the queue or the disk, whichever it is in by now.
        EXPECT_TRUE(tier->contains(test_key(i), pool));
        EXPECT_EQ(tier->get(test_key(i), pool), value);
      }
    }
    // A key names its content: a second put of it is not written again.
    EXPECT_TRUE(tier->put_async(test_key(0), Pool::kCompressed, test_value(0)));
    tier->flush();
    DiskTierStats s = tier->stats();
    EXPECT_EQ(s.written, kBlocks * kPoolCount);
    EXPECT_EQ(s.blocks, kBlocks * kPoolCount);
    EXPECT_EQ(s.bytes, total);
    EXPECT_EQ(s.queued_puts, 0u);
    EXPECT_EQ(s.queued_bytes, 0u);
    EXPECT_EQ(s.hits, kBlocks * kPoolCount);

    EXPECT_FALSE(tier->get(test_key(kBlocks), Pool::kCompressed).has_value());
    EXPECT_EQ(tier->stats().misses, 1u);
    const auto erased = test_value(3, Pool::kSnapshot);
    tier->erase(test_key(3), Pool::kSnapshot);
    EXPECT_FALSE(tier->contains(test_key(3), Pool::kSnapshot));
    EXPECT_FALSE(tier->get(test_key(3), Pool::kSnapshot).has_value());
    EXPECT_TRUE(tier->contains(test_key(3), Pool::kCompressed));  // other pools untouched
    total -= erased.size();
    EXPECT_EQ(tier->stats().bytes, total);
  }
  // The queue is written at close; a new DiskTier on the same path sees everything.
  auto tier = open();
  ASSERT_NE(tier, nullptr);
  DiskTierStats s = tier->stats();
  EXPECT_EQ(s.blocks, kBlocks * kPoolCount - 1);
  EXPECT_EQ(s.bytes, total);
  for (uint64_t i = 0; i < kBlocks; ++i) {
    for (Pool pool : kAllPools) {
      const auto value = tier->get(test_key(i), pool);
      if (i == 3 && pool == Pool::kSnapshot) {
        EXPECT_FALSE(value.has_value());
        continue;
      }
      ASSERT_TRUE(value.has_value()) << i << " " << pool_name(pool);
      EXPECT_EQ(*value, test_value(i, pool, i % 2 ? Codec::kFp8 : Codec::kLossless));
      const auto decoded = decode_payload(test_key(i), pool, kLayout, *value);
      EXPECT_TRUE(decoded.is_ok()) << decoded.status().to_string();
    }
  }
}

TEST_F(DiskTierTest, EraseThenPutWhileQueued) {
  auto tier = open();
  ASSERT_NE(tier, nullptr);
  // Erase and re-put in every order the writer might meet them; the final state must win.
  for (uint64_t i = 0; i < 200; ++i) {
    ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, test_value(i)));
    tier->erase(test_key(i), Pool::kCompressed);
    if (i % 2 == 0) {
      ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, test_value(i)));
    }
  }
  tier->flush();
  tier.reset();
  tier = open();
  ASSERT_NE(tier, nullptr);
  for (uint64_t i = 0; i < 200; ++i) {
    EXPECT_EQ(tier->contains(test_key(i), Pool::kCompressed), i % 2 == 0) << i;
    const auto v = tier->get(test_key(i), Pool::kCompressed);
    if (i % 2 == 0) {
      EXPECT_EQ(v, test_value(i));
    }
  }
  EXPECT_EQ(tier->stats().blocks, 100u);
}

TEST_F(DiskTierTest, CapacityEvictsLeastRecentlyUsed) {
  const uint64_t value_size = test_value(0).size();
  const uint64_t capacity = 20 * value_size;
  const BlockKey hot = test_key(0);
  {
    auto tier = open(capacity);
    ASSERT_NE(tier, nullptr);
    for (uint64_t i = 0; i < 20; ++i)
      ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, test_value(i)));
    tier->flush();
    EXPECT_EQ(tier->stats().bytes, capacity);
    EXPECT_EQ(tier->stats().evicted, 0u);
    // Reading block 0 makes block 1 the least recently used.
    ASSERT_TRUE(tier->get(hot, Pool::kCompressed).has_value());
    ASSERT_TRUE(tier->put_async(test_key(20), Pool::kCompressed, test_value(20)));
    tier->flush();
    EXPECT_TRUE(tier->contains(hot, Pool::kCompressed));
    EXPECT_FALSE(tier->contains(test_key(1), Pool::kCompressed));
    EXPECT_EQ(tier->stats().evicted, 1u);

    // 10x the capacity more, reading the hot block between small batches.
    for (uint64_t i = 21; i < 221; ++i) {
      ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, test_value(i)));
      ASSERT_LE(tier->stats().bytes, capacity);
      if (i % 5 == 0) {
        tier->flush();
        ASSERT_TRUE(tier->get(hot, Pool::kCompressed).has_value()) << "hot block evicted at " << i;
      }
    }
    tier->flush();
    const DiskTierStats s = tier->stats();
    EXPECT_EQ(s.blocks, 20u);
    EXPECT_EQ(s.bytes, capacity);
    EXPECT_EQ(s.evicted, 201u);
    EXPECT_TRUE(tier->contains(hot, Pool::kCompressed));
    for (uint64_t i = 201; i < 221; ++i)  // the newest (minus the hot one's slot) survive
      EXPECT_EQ(tier->contains(test_key(i), Pool::kCompressed), i > 201) << i;
  }
  {
    // What RocksDB holds is bounded too: live values and, once compacted, its files.
    RawDb raw(dir_.string());
    const auto [n, bytes] = raw.scan(raw.pool(Pool::kCompressed));
    EXPECT_EQ(n, 20u);
    EXPECT_LE(bytes, capacity);
    EXPECT_EQ(raw.scan(raw.catalogue()).first, 20u);
    uint64_t sst_bytes = 0;
    for (Pool pool : kAllPools) {
      ASSERT_TRUE(
          raw.db()
              .CompactRange(rocksdb::CompactRangeOptions(), raw.pool(pool), nullptr, nullptr)
              .ok());
      uint64_t size = 0;
      ASSERT_TRUE(raw.db().GetIntProperty(raw.pool(pool), "rocksdb.total-sst-files-size", &size));
      sst_bytes += size;
    }
    EXPECT_LE(sst_bytes, capacity + (64u << 10)) << "compacted SST bytes";
  }
  // Reopened with half the capacity: evicted down to it at open.
  auto tier = open(capacity / 2);
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->stats().blocks, 10u);
  EXPECT_EQ(tier->stats().evicted, 10u);
  EXPECT_LE(tier->stats().bytes, capacity / 2);
}

TEST_F(DiskTierTest, FullQueueDropsInsteadOfBlocking) {
  constexpr uint64_t kQueue = 64u << 10;
  auto tier = open(/*capacity=*/1ull << 30, kQueue);
  ASSERT_NE(tier, nullptr);
  std::vector<uint8_t> value(16u << 10);
  constexpr uint64_t kPuts = 2000;
  std::vector<bool> accepted(kPuts);
  uint64_t dropped = 0;
  Clock::duration slowest{};
  const auto start = Clock::now();
  for (uint64_t i = 0; i < kPuts; ++i) {
    value[0] = static_cast<uint8_t>(i);
    const auto t0 = Clock::now();
    accepted[i] = tier->put_async(test_key(i), Pool::kSnapshot, value);
    slowest = std::max(slowest, Clock::now() - t0);
    if (!accepted[i]) ++dropped;
    ASSERT_LE(tier->stats().queued_bytes, kQueue);
  }
  const double burst_s = std::chrono::duration<double>(Clock::now() - start).count();
  const double slowest_ms = std::chrono::duration<double, std::milli>(slowest).count();
  std::printf("burst of %llu puts: %.1f ms, %llu dropped, slowest put %.3f ms\n",
              static_cast<unsigned long long>(kPuts), burst_s * 1e3,
              static_cast<unsigned long long>(dropped), slowest_ms);
  EXPECT_GT(dropped, 0u);
  EXPECT_LT(dropped, kPuts);
  EXPECT_LT(burst_s, 2.0);
  EXPECT_LT(slowest_ms, 200.0);
  EXPECT_EQ(tier->stats().dropped_queue_full, dropped);
  // A value larger than the whole queue can never be taken.
  EXPECT_FALSE(tier->put_async(test_key(kPuts), Pool::kSnapshot, std::vector<uint8_t>(kQueue + 1)));

  tier->flush();
  EXPECT_EQ(tier->stats().written, kPuts - dropped);
  // Drained, the queue takes puts again.
  EXPECT_TRUE(tier->put_async(test_key(kPuts + 1), Pool::kSnapshot, value));
  for (uint64_t i = 0; i < kPuts; ++i) {
    ASSERT_EQ(tier->contains(test_key(i), Pool::kSnapshot), accepted[i]) << i;
    if (accepted[i]) {
      value[0] = static_cast<uint8_t>(i);
      ASSERT_EQ(tier->get(test_key(i), Pool::kSnapshot), value) << i;
    }
  }
}

TEST_F(DiskTierTest, CorruptValuesAreRefusedAndRemoved) {
  constexpr uint64_t kBlocks = 40;
  auto original = [](uint64_t i) {
    return test_value(i, Pool::kCompressed, i % 2 ? Codec::kFp8 : Codec::kLossless);
  };
  {
    auto tier = open();
    ASSERT_NE(tier, nullptr);
    for (uint64_t i = 0; i < kBlocks; ++i)
      ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, original(i)));
  }
  // Tamper through RocksDB itself: the tier cannot tell, only the codec can.
  std::vector<uint64_t> tampered;
  {
    RawDb raw(dir_.string());
    auto flipped = original(0);
    flipped[flipped.size() / 2] ^= 0x10;
    raw.put(Pool::kCompressed, test_key(0), flipped);
    auto truncated = original(1);
    truncated.resize(truncated.size() - 3);
    raw.put(Pool::kCompressed, test_key(1), truncated);
    raw.put(Pool::kCompressed, test_key(2), original(3));  // another block's valid value
    SplitMix64 rng(14);
    std::vector<uint8_t> garbage(original(4).size());
    for (uint8_t& b : garbage)
      b = static_cast<uint8_t>(rng.next());
    raw.put(Pool::kCompressed, test_key(4), garbage);
    raw.put(Pool::kCompressed, test_key(5), test_value(5, Pool::kIndexKeys));  // other pool
    raw.put(Pool::kCompressed, test_key(6), {});
    tampered = {0, 1, 2, 4, 5, 6};
  }
  auto is_tampered = [&](uint64_t i) {
    return std::find(tampered.begin(), tampered.end(), i) != tampered.end();
  };
  {
    auto tier = open();
    ASSERT_NE(tier, nullptr);
    for (uint64_t i = 0; i < kBlocks; ++i) {
      const auto value = tier->get(test_key(i), Pool::kCompressed);
      ASSERT_TRUE(value.has_value()) << i;
      const auto decoded = decode_payload(test_key(i), Pool::kCompressed, kLayout, *value);
      if (is_tampered(i)) {
        ASSERT_FALSE(decoded.is_ok()) << "tampered block " << i << " decoded";
        EXPECT_EQ(decoded.status().code(), StatusCode::kDataLoss);
        tier->report_corrupt(test_key(i), Pool::kCompressed);
        EXPECT_FALSE(tier->contains(test_key(i), Pool::kCompressed));
        EXPECT_FALSE(tier->get(test_key(i), Pool::kCompressed).has_value());
      } else {
        ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();
        EXPECT_EQ(*value, original(i));
      }
    }
    EXPECT_EQ(tier->stats().corrupt, tampered.size());
    EXPECT_EQ(tier->stats().blocks, kBlocks - tampered.size());
  }
  // The removals reached the disk; compact the rest into one SST file and damage its first
  // data block, under RocksDB's block checksum.
  std::string sst;
  {
    RawDb raw(dir_.string());
    for (uint64_t i : tampered) {
      std::string v;
      EXPECT_TRUE(
          raw.db()
              .Get(rocksdb::ReadOptions(), raw.pool(Pool::kCompressed), disk_key(test_key(i)), &v)
              .IsNotFound());
    }
    ASSERT_TRUE(raw.db()
                    .CompactRange(rocksdb::CompactRangeOptions(), raw.pool(Pool::kCompressed),
                                  nullptr, nullptr)
                    .ok());
    std::vector<rocksdb::LiveFileMetaData> files;
    raw.db().GetLiveFilesMetaData(&files);
    for (const auto& f : files) {
      if (f.column_family_name == pool_name(Pool::kCompressed)) sst = f.db_path + f.name;
    }
    ASSERT_FALSE(sst.empty());
  }
  {
    std::fstream f(sst, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good()) << sst;
    f.seekg(100);
    char byte = 0;
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x01);
    f.seekp(100);
    f.write(&byte, 1);
  }
  auto tier = open();
  ASSERT_NE(tier, nullptr);
  uint64_t lost = 0;
  for (uint64_t i = 0; i < kBlocks; ++i) {
    if (is_tampered(i)) {
      EXPECT_FALSE(tier->contains(test_key(i), Pool::kCompressed)) << i;
      continue;
    }
    const auto value = tier->get(test_key(i), Pool::kCompressed);
    if (!value.has_value()) {
      ++lost;
      EXPECT_FALSE(tier->contains(test_key(i), Pool::kCompressed)) << "corrupt block kept";
      continue;
    }
    // Whatever is returned is exactly what was written.
    ASSERT_EQ(*value, original(i)) << i;
  }
  EXPECT_GE(lost, 1u) << "the damaged data block was read without a checksum error";
  EXPECT_EQ(tier->stats().corrupt, lost);
  std::printf("damaged SST block: %llu of %llu blocks refused by RocksDB's checksum\n",
              static_cast<unsigned long long>(lost),
              static_cast<unsigned long long>(kBlocks - tampered.size()));
}

// A corrupt store is a cache lost, not a reason to stop serving: workers used to refuse to start
// on a damaged MANIFEST or SST until the directory was deleted by hand. It is moved aside (kept
// for inspection) and an empty store opens, saying so.
TEST_F(DiskTierTest, CorruptStoreIsMovedAsideAndAnEmptyOneOpens) {
  auto original = [](uint64_t i) { return test_value(i, Pool::kCompressed, Codec::kLossless); };
  {
    auto tier = open();
    ASSERT_NE(tier, nullptr);
    for (uint64_t i = 0; i < 20; ++i)
      ASSERT_TRUE(tier->put_async(test_key(i), Pool::kCompressed, original(i)));
    tier->flush();
  }
  std::string manifest;
  for (const auto& e : fs::directory_iterator(dir_)) {
    if (e.path().filename().string().rfind("MANIFEST-", 0) == 0) manifest = e.path().string();
  }
  ASSERT_FALSE(manifest.empty());
  {
    std::fstream f(manifest, std::ios::in | std::ios::out | std::ios::binary);
    const auto size = static_cast<std::streamoff>(fs::file_size(manifest));
    for (std::streamoff at = 0; at < size; at += 7) {
      f.seekp(at);
      f.put('\x5a');
    }
  }
  auto tier = open();
  ASSERT_NE(tier, nullptr);
  EXPECT_NE(tier->quarantined().find("was corrupt"), std::string::npos) << tier->quarantined();
  EXPECT_EQ(tier->stats().blocks, 0u);
  EXPECT_FALSE(tier->get(test_key(1), Pool::kCompressed).has_value());
  std::vector<fs::path> aside;
  for (const auto& e : fs::directory_iterator(dir_.parent_path())) {
    if (e.path().filename().string().rfind(dir_.filename().string() + ".corrupt-", 0) == 0)
      aside.push_back(e.path());
  }
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_NE(tier->quarantined().find(aside[0].string()), std::string::npos);
  EXPECT_TRUE(fs::exists(aside[0] / fs::path(manifest).filename()));
  // The new store works, and a later open finds nothing to move.
  ASSERT_TRUE(tier->put_async(test_key(3), Pool::kCompressed, original(3)));
  tier->flush();
  tier.reset();
  tier = open();
  ASSERT_NE(tier, nullptr);
  EXPECT_TRUE(tier->quarantined().empty()) << tier->quarantined();
  EXPECT_EQ(tier->get(test_key(3), Pool::kCompressed), original(3));
  for (const auto& p : aside)
    fs::remove_all(p);
}

TEST_F(DiskTierTest, OpenErrorsNameThePath) {
  DiskTierOptions options;
  options.path = (dir_ / "a-file").string();
  fs::create_directories(dir_);
  std::ofstream(options.path) << "not a directory";
  const auto not_a_dir = DiskTier::open(options);
  ASSERT_FALSE(not_a_dir.is_ok());
  EXPECT_NE(not_a_dir.status().message().find(options.path), std::string::npos)
      << not_a_dir.status().to_string();

  options.path = (dir_ / "db").string();
  auto first = DiskTier::open(options);
  ASSERT_TRUE(first.is_ok()) << first.status().to_string();
  const auto second = DiskTier::open(options);  // RocksDB's lock
  ASSERT_FALSE(second.is_ok());
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable) << second.status().to_string();
  EXPECT_NE(second.status().message().find(options.path), std::string::npos);

  options.capacity_bytes = 0;
  EXPECT_EQ(DiskTier::open(options).status().code(), StatusCode::kInvalidArgument);
}

// Puts, gets, erasures and flushes from several threads: every value returned is the one
// written for its key, and the capacity holds throughout.
TEST_F(DiskTierTest, ConcurrentUseKeepsValuesAndCapacity) {
  constexpr uint64_t kKeys = 300;
  const uint64_t capacity = 100 * test_value(0).size();
  auto tier = open(capacity, 256u << 10);
  ASSERT_NE(tier, nullptr);
  std::vector<std::vector<uint8_t>> values;
  for (uint64_t i = 0; i < kKeys; ++i)
    values.push_back(test_value(i));
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      SplitMix64 rng(100 + static_cast<uint64_t>(t));
      const auto end = Clock::now() + std::chrono::milliseconds(1500);
      while (Clock::now() < end && !failed) {
        const uint64_t i = rng.below(kKeys);
        switch (rng.below(8)) {
          case 0:
            tier->erase(test_key(i), Pool::kCompressed);
            break;
          case 1:
            if (rng.below(50) == 0) tier->flush();
            break;
          case 2:
          case 3:
          case 4:
            (void)tier->put_async(test_key(i), Pool::kCompressed, values[i]);
            break;
          default:
            if (auto v = tier->get(test_key(i), Pool::kCompressed); v && *v != values[i])
              failed = true;
        }
        if (tier->stats().bytes > capacity) failed = true;
      }
    });
  }
  for (auto& th : threads)
    th.join();
  EXPECT_FALSE(failed);
  tier->flush();
  const DiskTierStats s = tier->stats();
  std::printf("concurrent: %llu written, %llu evicted, %llu hits, %llu misses\n",
              static_cast<unsigned long long>(s.written),
              static_cast<unsigned long long>(s.evicted), static_cast<unsigned long long>(s.hits),
              static_cast<unsigned long long>(s.misses));
  EXPECT_EQ(s.queued_puts, 0u);
  EXPECT_EQ(s.queued_bytes, 0u);
  EXPECT_LE(s.bytes, capacity);
  // Reopened, the store holds exactly the blocks the index held, all intact.
  const uint64_t blocks = s.blocks;
  tier.reset();
  tier = open(capacity);
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->stats().blocks, blocks);
  for (uint64_t i = 0; i < kKeys; ++i) {
    if (auto v = tier->get(test_key(i), Pool::kCompressed)) {
      ASSERT_EQ(*v, values[i]) << i;
    }
  }
}

// A child process running disk_tier_writer, its stdout read line by line.
class WriterProcess {
 public:
  WriterProcess(const std::string& path, int run) {
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], STDOUT_FILENO);
      close(fds[0]);
      close(fds[1]);
      const std::string run_arg = std::to_string(run);
      execl(DSERVE_DISK_TIER_WRITER, DSERVE_DISK_TIER_WRITER, path.c_str(), run_arg.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    out_ = fds[0];
  }
  ~WriterProcess() {
    if (pid_ > 0) kill_and_wait();
    if (out_ >= 0) close(out_);
  }
  bool started() const { return pid_ > 0 && out_ >= 0; }

  // The next line of output, or nullopt at end of output or after `deadline`.
  std::optional<std::string> read_line(Clock::time_point deadline) {
    for (;;) {
      if (const auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{out_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[4096];
      const ssize_t n = read(out_, chunk, sizeof(chunk));
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  // SIGKILL, then the wait status.
  int kill_and_wait() {
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buffer_;
};

TEST_F(DiskTierTest, SurvivesKillDuringWriteBack) {
  struct Run {
    uint64_t last_put = 0;  // the last "put <index>" the writer printed
    uint64_t durable = 0;   // the last "written <n>": blocks [0, n) were written
  };
  std::vector<Run> runs;
  SplitMix64 rng(15);
  for (int run = 0; run < 3; ++run) {
    Run r;
    {
      WriterProcess writer(dir_.string(), run);
      ASSERT_TRUE(writer.started());
      // Kill at a different point each time, once some thousands of blocks are written.
      const uint64_t kill_after = 2000 + rng.below(2000);
      const auto deadline = Clock::now() + std::chrono::seconds(15);
      while (r.durable < kill_after) {
        const auto line = writer.read_line(deadline);
        ASSERT_TRUE(line.has_value()) << "writer ended or stalled (run " << run << ")";
        unsigned long long put = 0, written = 0;
        ASSERT_EQ(std::sscanf(line->c_str(), "put %llu written %llu", &put, &written), 2) << *line;
        r.last_put = put;
        r.durable = written;
      }
      const int status = writer.kill_and_wait();
      ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
      // The writer went on until the kill: take in what it printed meanwhile.
      while (const auto line = writer.read_line(Clock::now() + std::chrono::seconds(5))) {
        unsigned long long put = 0, written = 0;
        if (std::sscanf(line->c_str(), "put %llu written %llu", &put, &written) == 2) {
          r.last_put = put;
          r.durable = written;
        }
      }
    }
    runs.push_back(r);

    // Every block present is intact and exactly the deterministic value of its index, and
    // every block the writer had reported written is present.
    auto tier = open(/*capacity=*/8ull << 30);
    ASSERT_NE(tier, nullptr);
    uint64_t present = 0;
    for (int past = 0; past <= run; ++past) {
      BlockKey key = testing_support::writer_root(past);
      // Blocks past the last printed index + 32 were never put (it prints every 32).
      for (uint64_t i = 0; i <= runs[static_cast<size_t>(past)].last_put + 32; ++i) {
        key = chain_key(key, testing_support::writer_tokens(past, i));
        const auto value = tier->get(key, Pool::kCompressed);
        if (i < runs[static_cast<size_t>(past)].durable) {
          ASSERT_TRUE(value.has_value()) << "run " << past << " lost written block " << i;
        }
        if (!value) continue;
        ++present;
        const auto decoded =
            decode_payload(key, Pool::kCompressed, testing_support::writer_layout(), *value);
        ASSERT_TRUE(decoded.is_ok())
            << "run " << past << " block " << i << ": " << decoded.status().to_string();
        ASSERT_EQ(*value, testing_support::writer_value(past, i, key))
            << "run " << past << " block " << i;
      }
    }
    EXPECT_GE(present, 1u);
    // Nothing else is in the store (no stray or half-written entries).
    EXPECT_EQ(tier->stats().blocks, present);
    EXPECT_EQ(tier->stats().corrupt, 0u);
    std::printf("kill %d: writer reported %llu written, last put %llu; %llu blocks in store\n", run,
                static_cast<unsigned long long>(r.durable),
                static_cast<unsigned long long>(r.last_put),
                static_cast<unsigned long long>(present));
  }
}

}  // namespace
}  // namespace dserve::kvstore
