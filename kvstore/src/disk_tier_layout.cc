#include "disk_tier_layout.h"

#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>

#include <algorithm>
#include <filesystem>
#include <system_error>

namespace dserve::kvstore::internal {
namespace {

BlockKey key_from_bytes(const char* p) {
  BlockKey key;
  for (size_t i = 0; i < 8; ++i) {
    key.hi = (key.hi << 8) | static_cast<uint8_t>(p[i]);
    key.lo = (key.lo << 8) | static_cast<uint8_t>(p[8 + i]);
  }
  return key;
}

rocksdb::ColumnFamilyOptions pool_family_options() {
  rocksdb::ColumnFamilyOptions o;
  // fp32 and fp8 activations barely compress; compressing would only cost CPU on every read.
  o.compression = rocksdb::kNoCompression;
  o.level_compaction_dynamic_level_bytes = true;
  // Gets are only issued for keys the index holds, so they almost always hit: the bottom
  // level's filters would only cost memory.
  o.optimize_filters_for_hits = true;
  rocksdb::BlockBasedTableOptions table;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  return o;
}

rocksdb::DBOptions db_options() {
  rocksdb::DBOptions o;
  o.create_if_missing = true;
  o.create_missing_column_families = true;
  o.paranoid_checks = true;
  // After a crash, recover the WAL up to its first torn or corrupt record: a consistent
  // prefix of the write-back batches (each batch is one atomic record).
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  // The pool families flush on their own; the small catalogue family would otherwise pin old
  // WAL files for a long time. Bounding the WAL also bounds replay time at open.
  o.max_total_wal_size = 512ull << 20;
  o.db_write_buffer_size = 256ull << 20;
  o.keep_log_file_num = 4;
  o.max_log_file_size = 16ull << 20;
  return o;
}

}  // namespace

KeyBytes key_bytes(const BlockKey& key) {
  // Big-endian, so that RocksDB's bytewise order is the keys' numeric order.
  KeyBytes out{};
  for (size_t i = 0; i < 8; ++i) {
    out[i] = static_cast<char>(key.hi >> (56 - 8 * i));
    out[8 + i] = static_cast<char>(key.lo >> (56 - 8 * i));
  }
  return out;
}

CatalogueKeyBytes catalogue_key(const SlotId& id) {
  CatalogueKeyBytes out{};
  out[0] = static_cast<char>(id.pool);
  const KeyBytes k = key_bytes(id.key);
  std::copy(k.begin(), k.end(), out.begin() + 1);
  return out;
}

SizeBytes size_bytes(uint64_t size) {
  SizeBytes out{};
  for (size_t i = 0; i < 8; ++i)
    out[i] = static_cast<char>(size >> (8 * i));
  return out;
}

std::optional<std::pair<SlotId, uint64_t>> parse_catalogue_entry(const rocksdb::Slice& key,
                                                                 const rocksdb::Slice& value) {
  if (key.size() != std::tuple_size_v<CatalogueKeyBytes> ||
      value.size() != std::tuple_size_v<SizeBytes> || static_cast<uint8_t>(key[0]) >= kPoolCount)
    return std::nullopt;
  uint64_t size = 0;
  for (size_t i = 0; i < 8; ++i)
    size |= static_cast<uint64_t>(static_cast<uint8_t>(value[i])) << (8 * i);
  return std::pair{SlotId{key_from_bytes(key.data() + 1), static_cast<Pool>(key[0])}, size};
}

Status from_rocksdb(const rocksdb::Status& s, const std::string& what) {
  const std::string msg = what + ": " + s.ToString();
  // I/O errors include "lock held by another process": a second tier on the same path.
  if (s.IsIOError() || s.IsBusy() || s.IsTimedOut() || s.IsTryAgain()) return unavailable(msg);
  if (s.IsCorruption()) return data_loss(msg);
  if (s.IsInvalidArgument()) return invalid_argument(msg);
  return internal_error(msg);
}

Result<OpenedDb> open_rocksdb(const DiskTierOptions& options) {
  const std::string where = "disk tier at '" + options.path + "'";
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) return unavailable(where + ": cannot create the directory: " + ec.message());

  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  families.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (Pool pool : kAllPools)
    families.emplace_back(std::string(pool_name(pool)), pool_family_options());
  OpenedDb opened;
  rocksdb::DB* raw = nullptr;
  const rocksdb::Status s =
      rocksdb::DB::Open(db_options(), options.path, families, &opened.handles, &raw);
  if (!s.ok()) return from_rocksdb(s, where + ": cannot open RocksDB");
  opened.db.reset(raw);
  return opened;
}

}  // namespace dserve::kvstore::internal
