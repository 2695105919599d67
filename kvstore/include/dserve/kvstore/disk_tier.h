#pragma once
// The disk tier: encoded block payloads (codec.h values) kept in a local RocksDB, bounded in
// bytes with least-recently-used eviction, written back asynchronously so that the serving
// path never waits on the disk.
//
// The tier stores values as given and never decodes them: they are already versioned and
// checksummed by the codec. The caller decodes what get() returns and, on DataLoss, calls
// report_corrupt(), which removes the value and counts it. RocksDB's own block checksums are
// verified on every read; a value RocksDB finds corrupt is removed, counted and reported as
// absent, never returned.
//
// On disk, one column family per pool (named by pool_name) holds key -> value, the key being
// the 16 bytes of the BlockKey (hi then lo, each big-endian, so that RocksDB orders keys as
// numbers). The "default" column family is the catalogue: (pool byte, key) -> value size as a
// little-endian u64, written in the same atomic batch as the value. open() rebuilds the index
// from the catalogue alone, reading some 30 bytes per value instead of the values themselves
// (which a plain scan of the pool families would read, kilobytes to megabytes each). Recency is
// not persisted: after open, blocks are ordered for eviction by key, an arbitrary order that
// keeps the pools of one block together. The numeric values of Pool are part of this format.
//
// Durability: writes go through RocksDB's write-ahead log and the DB is opened with
// point-in-time WAL recovery, so after a crash (kill -9) it reopens holding a prefix of the
// write-back batches: every put that stats().written counted before the crash is there,
// torn tails are dropped. sync_writes adds an fsync per batch for machine crashes.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/block.h"

namespace dserve::kvstore {

struct DiskTierOptions {
  std::string path;                           // RocksDB directory (created if missing)
  uint64_t capacity_bytes = 8ull << 30;       // value bytes kept; LRU evicted beyond it
  uint64_t write_queue_bytes = 256ull << 20;  // write-back queue bound; puts beyond it drop
  bool sync_writes = false;                   // fsync the WAL on every write-back batch
};

struct DiskTierStats {
  uint64_t blocks = 0;              // values stored (written or being written), all pools
  uint64_t bytes = 0;               // their bytes; <= capacity_bytes whenever observed
  uint64_t queued_puts = 0;         // puts accepted and not yet written
  uint64_t queued_bytes = 0;        // their bytes; <= write_queue_bytes
  uint64_t written = 0;             // puts written to RocksDB (durable against kill -9)
  uint64_t dropped_queue_full = 0;  // puts refused because the queue was full
  uint64_t evicted = 0;             // values removed to stay within capacity_bytes
  uint64_t hits = 0;                // get() that returned a value
  uint64_t misses = 0;              // get() that returned nothing
  uint64_t corrupt = 0;             // values found corrupt (report_corrupt, RocksDB checksums)
  uint64_t io_errors = 0;           // failed RocksDB writes or reads (values lost, not stored)
};

// Thread-safe: every method may be called from any thread. One mutex guards the in-memory
// index and the queue; RocksDB reads run outside it, and all RocksDB writes (puts, deletes,
// evictions) are made by one background writer thread, in the order they were asked for.
// One DiskTier per directory (RocksDB locks it; a second open fails with Unavailable).
class DiskTier {
 public:
  // Opens or creates the store at options.path and rebuilds the index from its catalogue,
  // evicting down to capacity_bytes if the store is over it (a smaller capacity than last
  // time). A store RocksDB finds corrupt (a damaged MANIFEST, SST or catalogue) is a cache
  // lost, not a reason to stop: its directory is moved aside to `<path>.corrupt-<unix time>`
  // (kept for inspection) and an empty store is opened; quarantined() says so. Errors name the
  // path and carry RocksDB's message: Unavailable for I/O errors and a directory locked by
  // another process, DataLoss when a corrupt store cannot be moved aside, Internal otherwise.
  // InvalidArgument for an empty path or a zero capacity or queue.
  static Result<std::unique_ptr<DiskTier>> open(const DiskTierOptions& options);

  // Writes everything still queued, then closes the DB.
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Queues `value` (a codec value for `key` in `pool`) for the writer thread and returns at
  // once. Returns false, counting it, when the queue cannot take value.size() more bytes: the
  // put is dropped (the caller still has the block in a faster tier or can recompute it), the
  // serving path never blocks on the disk. A key already stored or queued is not written
  // again (a BlockKey names its content) and only becomes the most recently used; returns true.
  bool put_async(const BlockKey& key, Pool pool, std::vector<uint8_t> value);

  // The value stored for (key, pool), or nullopt. A queued value not yet written is returned
  // from the queue. Makes the block the most recently used. Values RocksDB reports corrupt
  // are removed and counted, and nullopt is returned.
  std::optional<std::vector<uint8_t>> get(const BlockKey& key, Pool pool);

  // Whether (key, pool) is stored or queued; does not change recency.
  bool contains(const BlockKey& key, Pool pool) const;

  // Removes (key, pool) from the index at once and from the DB in write-back order (a later
  // put of the same key is written after the removal). Absent keys are fine.
  void erase(const BlockKey& key, Pool pool);

  // erase() for a value the caller found corrupt (decode_payload gave DataLoss); counted.
  void report_corrupt(const BlockKey& key, Pool pool);

  // Blocks until everything queued before the call (puts, erasures, evictions) is written.
  void flush();

  DiskTierStats stats() const;

  // The store's directory.
  const std::string& path() const;
  // Empty, or what open() did with a corrupt store (where it moved it, and why).
  const std::string& quarantined() const { return quarantined_; }

 private:
  class Impl;
  explicit DiskTier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::string quarantined_;
};

}  // namespace dserve::kvstore
