#include "dserve/kvstore/disk_tier.h"

#include <rocksdb/write_batch.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include "disk_tier_layout.h"
#include "dserve/core/check.h"

namespace dserve::kvstore {

using internal::as_slice;
using internal::catalogue_key;
using internal::from_rocksdb;
using internal::key_bytes;
using internal::size_bytes;
using internal::SlotId;
using internal::SlotIdHash;

namespace {

// A write-back batch is cut at this many value bytes: large enough to amortise the WAL write,
// small enough that the writer releases queue memory (and flush() waiters) often.
constexpr size_t kMaxBatchBytes = 8u << 20;

}  // namespace

class DiskTier::Impl {
 public:
  Impl(DiskTierOptions options, std::unique_ptr<rocksdb::DB> db,
       std::vector<rocksdb::ColumnFamilyHandle*> handles)
      : options_(std::move(options)), db_(std::move(db)), handles_(std::move(handles)) {
    DSERVE_CHECK(handles_.size() == 1 + kPoolCount);
    catalogue_ = handles_[0];
    for (int p = 0; p < kPoolCount; ++p)
      pools_[static_cast<size_t>(p)] = handles_[1 + static_cast<size_t>(p)];
    read_options_.verify_checksums = true;
    // The tiers above cache hot blocks; RocksDB's block cache would hold a second copy.
    read_options_.fill_cache = false;
    write_options_.sync = options_.sync_writes;
  }

  ~Impl() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    for (rocksdb::ColumnFamilyHandle* h : handles_)
      (void)db_->DestroyColumnFamilyHandle(h);
    // Close() reports a failure to release resources cleanly; the WAL already holds the data.
    (void)db_->Close();
  }

  // Rebuilds the index from the catalogue (before the writer starts).
  Status load_catalogue() {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read_options_, catalogue_));
    std::vector<std::string> malformed;
    std::vector<std::pair<SlotId, uint64_t>> entries;
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      auto entry = internal::parse_catalogue_entry(it->key(), it->value());
      if (entry) {
        entries.push_back(*entry);
      } else {
        malformed.push_back(it->key().ToString());
      }
    }
    if (!it->status().ok())
      return from_rocksdb(it->status(), "disk tier at '" + options_.path + "': reading catalogue");
    // Recency is not persisted. Ordering by key rather than by (pool, key) keeps the payloads
    // of one block together, so that eviction takes whole blocks rather than emptying one pool
    // before touching the others.
    std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
      const BlockKey& x = a.first.key;
      const BlockKey& y = b.first.key;
      if (x.hi != y.hi) return x.hi < y.hi;
      if (x.lo != y.lo) return x.lo < y.lo;
      return a.first.pool < b.first.pool;
    });
    for (const auto& [id, size] : entries) {
      lru_.push_front(id);
      index_.emplace(id, Entry{size, lru_.begin(), next_generation_++});
      bytes_ += size;
    }
    if (!malformed.empty()) {
      // Only a foreign writer produces these; drop them rather than refuse the whole store.
      rocksdb::WriteBatch batch;
      for (const std::string& k : malformed)
        (void)batch.Delete(catalogue_, k);
      const rocksdb::Status s = db_->Write(write_options_, &batch);
      if (!s.ok())
        return from_rocksdb(s, "disk tier at '" + options_.path + "': cleaning the catalogue");
      counters_.corrupt += malformed.size();
    }
    // A smaller capacity than last time: evict now, before the writer starts.
    std::vector<SlotId> victims;
    {
      std::lock_guard lock(mu_);
      victims = evict_locked();
    }
    if (!victims.empty()) {
      rocksdb::WriteBatch batch;
      for (const SlotId& id : victims)
        add_delete(batch, id);
      const rocksdb::Status s = db_->Write(write_options_, &batch);
      if (!s.ok())
        return from_rocksdb(s, "disk tier at '" + options_.path + "': evicting to capacity");
    }
    return Status::ok();
  }

  void start() {
    writer_ = std::thread([this] { write_back(); });
  }

  bool put_async(const SlotId& id, std::vector<uint8_t> value) {
    std::lock_guard lock(mu_);
    if (auto it = index_.find(id); it != index_.end()) {
      touch_locked(it->second);
      return true;
    }
    if (queued_.contains(id)) return true;
    if (queued_bytes_ + value.size() > options_.write_queue_bytes) {
      ++counters_.dropped_queue_full;
      return false;
    }
    queued_bytes_ += value.size();
    ++queued_puts_;
    auto shared = std::make_shared<const std::vector<uint8_t>>(std::move(value));
    queued_.emplace(id, shared);
    ops_.push_back(Op{Op::kPut, id, std::move(shared), ++last_seq_});
    work_cv_.notify_one();
    return true;
  }

  std::optional<std::vector<uint8_t>> get(const SlotId& id) {
    std::unique_lock lock(mu_);
    auto entry = index_.find(id);
    if (entry != index_.end()) touch_locked(entry->second);
    if (auto q = queued_.find(id); q != queued_.end()) {
      const std::shared_ptr<const std::vector<uint8_t>> value = q->second;
      ++counters_.hits;
      lock.unlock();
      return *value;  // copied outside the lock
    }
    if (entry == index_.end()) {
      ++counters_.misses;
      return std::nullopt;
    }
    const uint64_t generation = entry->second.generation;
    lock.unlock();

    // A racing eviction or erase may delete the value under us: RocksDB then either still
    // returns it (it is valid, keys name their content) or reports NotFound.
    const internal::KeyBytes k = key_bytes(id.key);
    rocksdb::PinnableSlice found;
    const rocksdb::Status s = db_->Get(read_options_, pool_handle(id.pool), as_slice(k), &found);
    if (s.ok()) {
      std::vector<uint8_t> value(found.size());
      if (!value.empty()) std::memcpy(value.data(), found.data(), found.size());
      lock.lock();
      ++counters_.hits;
      return value;
    }
    lock.lock();
    ++counters_.misses;
    if (s.IsCorruption()) {
      ++counters_.corrupt;
      erase_locked(id);
    } else if (s.IsNotFound()) {
      // Indexed but not on disk, and not because of a racing erase (that would have changed
      // the generation): the index is wrong about it; forget it.
      if (auto e = index_.find(id); e != index_.end() && e->second.generation == generation)
        drop_locked(e);
    } else {
      ++counters_.io_errors;
    }
    return std::nullopt;
  }

  bool contains(const SlotId& id) const {
    std::lock_guard lock(mu_);
    return index_.contains(id) || queued_.contains(id);
  }

  void erase(const SlotId& id, bool corrupt) {
    std::lock_guard lock(mu_);
    if (corrupt) ++counters_.corrupt;
    erase_locked(id);
  }

  void flush() {
    std::unique_lock lock(mu_);
    const uint64_t target = last_seq_;
    done_cv_.wait(lock, [&] { return done_seq_ >= target; });
  }

  DiskTierStats stats() const {
    std::lock_guard lock(mu_);
    DiskTierStats s = counters_;
    s.blocks = index_.size();
    s.bytes = bytes_;
    s.queued_puts = queued_puts_;
    s.queued_bytes = queued_bytes_;
    return s;
  }

  const std::string& path() const { return options_.path; }

 private:
  struct Entry {
    uint64_t size = 0;
    std::list<SlotId>::iterator lru;  // its place in lru_
    uint64_t generation = 0;          // distinguishes re-insertions of the same slot
  };

  // One write-back operation. Evictions are not queued: the writer appends them to the batch
  // that pushed the tier over capacity.
  struct Op {
    enum Kind { kPut, kDelete } kind = kPut;
    SlotId id;
    std::shared_ptr<const std::vector<uint8_t>> value;  // kPut only
    uint64_t seq = 0;
  };

  rocksdb::ColumnFamilyHandle* pool_handle(Pool pool) const {
    return pools_[static_cast<size_t>(pool)];
  }

  void touch_locked(Entry& e) { lru_.splice(lru_.begin(), lru_, e.lru); }

  void drop_locked(std::unordered_map<SlotId, Entry, SlotIdHash>::iterator it) {
    bytes_ -= it->second.size;
    lru_.erase(it->second.lru);
    index_.erase(it);
  }

  void erase_locked(const SlotId& id) {
    if (auto it = index_.find(id); it != index_.end()) drop_locked(it);
    // A queued put of it is skipped by the writer once it is no longer in queued_.
    queued_.erase(id);
    ops_.push_back(Op{Op::kDelete, id, nullptr, ++last_seq_});
    work_cv_.notify_one();
  }

  // Drops least recently used values from the index until the bytes fit and returns them;
  // the caller deletes them from the DB.
  std::vector<SlotId> evict_locked() {
    std::vector<SlotId> victims;
    while (bytes_ > options_.capacity_bytes) {
      DSERVE_CHECK(!lru_.empty());
      const SlotId victim = lru_.back();
      drop_locked(index_.find(victim));
      // A victim still in queued_ is a put of the batch being formed: its delete follows its
      // put in that batch, and get() must not serve it from the queue meanwhile.
      queued_.erase(victim);
      victims.push_back(victim);
      ++counters_.evicted;
    }
    return victims;
  }

  void add_delete(rocksdb::WriteBatch& batch, const SlotId& id) {
    (void)batch.Delete(pool_handle(id.pool), as_slice(key_bytes(id.key)));
    (void)batch.Delete(catalogue_, as_slice(catalogue_key(id)));
  }

  // The writer thread: takes batches off the queue, indexes their puts and evicts under the
  // lock, writes one atomic RocksDB batch outside it, then retires the batch.
  void write_back() {
    std::unique_lock lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stopping_ || !ops_.empty(); });
      if (ops_.empty()) return;  // stopping, and everything is written

      std::vector<Op> batch;
      size_t batch_bytes = 0;
      while (!ops_.empty() && (batch.empty() || batch_bytes < kMaxBatchBytes)) {
        if (ops_.front().kind == Op::kPut) batch_bytes += ops_.front().value->size();
        batch.push_back(std::move(ops_.front()));
        ops_.pop_front();
      }
      // Puts erased while queued are skipped; the others enter the index now, so that the
      // capacity holds before they reach the disk.
      std::vector<bool> write(batch.size(), true);
      std::vector<std::pair<SlotId, uint64_t>> inserted;  // (slot, generation)
      for (size_t i = 0; i < batch.size(); ++i) {
        const Op& op = batch[i];
        if (op.kind != Op::kPut) continue;
        auto q = queued_.find(op.id);
        if (q == queued_.end() || q->second != op.value) {
          write[i] = false;
          continue;
        }
        DSERVE_CHECK_MSG(!index_.contains(op.id), "a queued put of an indexed slot");
        lru_.push_front(op.id);
        index_.emplace(op.id, Entry{op.value->size(), lru_.begin(), next_generation_});
        inserted.emplace_back(op.id, next_generation_++);
        bytes_ += op.value->size();
      }
      const std::vector<SlotId> evicted = evict_locked();
      lock.unlock();

      rocksdb::WriteBatch wb;
      for (size_t i = 0; i < batch.size(); ++i) {
        if (!write[i]) continue;
        const Op& op = batch[i];
        if (op.kind == Op::kPut) {
          const rocksdb::Slice v(reinterpret_cast<const char*>(op.value->data()), op.value->size());
          (void)wb.Put(pool_handle(op.id.pool), as_slice(key_bytes(op.id.key)), v);
          (void)wb.Put(catalogue_, as_slice(catalogue_key(op.id)),
                       as_slice(size_bytes(op.value->size())));
        } else {
          add_delete(wb, op.id);
        }
      }
      for (const SlotId& id : evicted)
        add_delete(wb, id);
      const rocksdb::Status s = db_->Write(write_options_, &wb);

      lock.lock();
      if (!s.ok()) {
        // Nothing of the batch reached the disk. Its puts leave the index (they are not
        // stored); its deletes are lost, and the next open() indexes those values again,
        // where a corrupt one is found and reported again.
        ++counters_.io_errors;
        for (const auto& [id, generation] : inserted) {
          if (auto e = index_.find(id); e != index_.end() && e->second.generation == generation)
            drop_locked(e);
        }
      }
      for (const Op& op : batch) {
        if (op.kind != Op::kPut) continue;
        if (auto q = queued_.find(op.id); q != queued_.end() && q->second == op.value)
          queued_.erase(q);
        queued_bytes_ -= op.value->size();
        --queued_puts_;
      }
      if (s.ok()) counters_.written += inserted.size();
      if (!batch.empty()) done_seq_ = batch.back().seq;
      done_cv_.notify_all();
    }
  }

  const DiskTierOptions options_;
  const std::unique_ptr<rocksdb::DB> db_;
  const std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // owned; "default" first
  rocksdb::ColumnFamilyHandle* catalogue_ = nullptr;
  std::array<rocksdb::ColumnFamilyHandle*, kPoolCount> pools_{};
  rocksdb::ReadOptions read_options_;
  rocksdb::WriteOptions write_options_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // the writer waits for ops or stopping_
  std::condition_variable done_cv_;  // flush() waits for done_seq_
  // Values stored or being written, and their recency (front = most recently used).
  std::unordered_map<SlotId, Entry, SlotIdHash> index_;
  std::list<SlotId> lru_;
  uint64_t bytes_ = 0;
  uint64_t next_generation_ = 0;
  // Values accepted and not yet written (get() serves them from here), and the queue.
  std::unordered_map<SlotId, std::shared_ptr<const std::vector<uint8_t>>, SlotIdHash> queued_;
  std::deque<Op> ops_;
  uint64_t queued_bytes_ = 0;
  uint64_t queued_puts_ = 0;
  uint64_t last_seq_ = 0;  // of the last op queued
  uint64_t done_seq_ = 0;  // of the last op written
  bool stopping_ = false;
  DiskTierStats counters_;  // the event counters; the gauges are computed in stats()
  std::thread writer_;
};

Result<std::unique_ptr<DiskTier>> DiskTier::open(const DiskTierOptions& options) {
  if (options.path.empty()) return invalid_argument("disk tier: empty path");
  if (options.capacity_bytes == 0 || options.write_queue_bytes == 0) {
    return invalid_argument("disk tier at '" + options.path +
                            "': capacity_bytes and write_queue_bytes must be positive");
  }
  const auto open_store = [](const DiskTierOptions& o) -> Result<std::unique_ptr<Impl>> {
    DSERVE_ASSIGN_OR_RETURN(internal::OpenedDb opened, internal::open_rocksdb(o));
    auto impl = std::make_unique<Impl>(o, std::move(opened.db), std::move(opened.handles));
    DSERVE_RETURN_IF_ERROR(impl->load_catalogue());
    return impl;
  };
  auto impl = open_store(options);
  std::string quarantined;
  if (!impl.is_ok() && impl.status().code() == StatusCode::kDataLoss) {
    const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
    const std::string aside = options.path + ".corrupt-" + std::to_string(seconds);
    std::error_code ec;
    std::filesystem::rename(options.path, aside, ec);
    if (ec) {
      return data_loss(impl.status().message() + "; moving it aside to '" + aside +
                       "' failed: " + ec.message());
    }
    quarantined = "the store at '" + options.path + "' was corrupt (" + impl.status().message() +
                  "); moved it to '" + aside + "' and started an empty one";
    impl = open_store(options);
  }
  if (!impl.is_ok()) return impl.status();
  (*impl)->start();
  std::unique_ptr<DiskTier> tier(new DiskTier(std::move(impl).value()));
  tier->quarantined_ = std::move(quarantined);
  return tier;
}

DiskTier::DiskTier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DiskTier::~DiskTier() = default;

bool DiskTier::put_async(const BlockKey& key, Pool pool, std::vector<uint8_t> value) {
  return impl_->put_async({key, pool}, std::move(value));
}

std::optional<std::vector<uint8_t>> DiskTier::get(const BlockKey& key, Pool pool) {
  return impl_->get({key, pool});
}

bool DiskTier::contains(const BlockKey& key, Pool pool) const {
  return impl_->contains({key, pool});
}

void DiskTier::erase(const BlockKey& key, Pool pool) {
  impl_->erase({key, pool}, /*corrupt=*/false);
}

void DiskTier::report_corrupt(const BlockKey& key, Pool pool) {
  impl_->erase({key, pool}, /*corrupt=*/true);
}

void DiskTier::flush() {
  impl_->flush();
}

DiskTierStats DiskTier::stats() const {
  return impl_->stats();
}

const std::string& DiskTier::path() const {
  return impl_->path();
}

}  // namespace dserve::kvstore
