#pragma once
// The disk tier's on-disk layout (internal to kvstore/): column families, key and catalogue
// encodings, RocksDB options, and RocksDB statuses as dserve Statuses. See disk_tier.h for the
// layout itself; everything that decides a byte on disk is here.

#include <rocksdb/db.h>
#include <rocksdb/slice.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/block.h"
#include "dserve/kvstore/disk_tier.h"

namespace dserve::kvstore::internal {

// (key, pool): what the tier stores one value under.
struct SlotId {
  BlockKey key;
  Pool pool = Pool::kCompressed;
  friend bool operator==(const SlotId&, const SlotId&) = default;
};

struct SlotIdHash {
  size_t operator()(const SlotId& id) const {
    return BlockKeyHash{}(id.key) ^ (static_cast<size_t>(id.pool) * 0x9E3779B97F4A7C15ULL);
  }
};

// A pool family's key: the BlockKey, hi then lo, each big-endian.
using KeyBytes = std::array<char, 16>;
// A catalogue key: the pool byte, then the KeyBytes.
using CatalogueKeyBytes = std::array<char, 17>;
// A catalogue value: the value's size, little-endian.
using SizeBytes = std::array<char, 8>;

KeyBytes key_bytes(const BlockKey& key);
CatalogueKeyBytes catalogue_key(const SlotId& id);
SizeBytes size_bytes(uint64_t size);
// The slot and size of a catalogue entry; nullopt when it is malformed (wrong lengths or an
// unknown pool), which only a foreign writer produces.
std::optional<std::pair<SlotId, uint64_t>> parse_catalogue_entry(const rocksdb::Slice& key,
                                                                 const rocksdb::Slice& value);

template <size_t N>
rocksdb::Slice as_slice(const std::array<char, N>& bytes) {
  return {bytes.data(), N};
}

// `what`: "<what>: <RocksDB's message>", coded by what the caller can do about it.
Status from_rocksdb(const rocksdb::Status& s, const std::string& what);

// The DB and its column family handles: the catalogue ("default") first, then one per pool in
// Pool order. The handles belong to the caller, who destroys them before closing the DB.
struct OpenedDb {
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
};

// Opens or creates the DB at options.path with the tier's options (create_if_missing,
// point-in-time WAL recovery, paranoid checks). Errors name the path.
Result<OpenedDb> open_rocksdb(const DiskTierOptions& options);

}  // namespace dserve::kvstore::internal
