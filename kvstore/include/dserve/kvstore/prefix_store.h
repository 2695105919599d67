#pragma once
// PrefixStore: the prefix index over 128-token blocks and the three tiers that keep them.
//
// Index. A radix tree whose edges are blocks: a node is named by its chained BlockKey
// (block.h), so a node stands for a whole prefix, and two models (other fingerprints) have
// disjoint trees. Each node records, per pool, in which tiers the block's payload is.
//
// Tiers, fastest first:
//   device  pages (PageRef) that requests read directly; on the CPU backend these are host
//           memory too. A hit here shares the pages with no copy.
//   host    encoded payloads (codec.h) in process memory.
//   disk    encoded payloads in RocksDB (disk_tier.h), written back asynchronously at insert
//           (write-through, bounded queue) so that a restarted process finds them.
// Capacity: device and host bytes are bounded; beyond them the least recently used blocks that
// no request holds move down (device -> host -> disk) and their upper copies are dropped. A hit
// in a lower tier is decoded back into pages (promotion). The disk tier evicts on its own.
//
// Snapshots. Compressed entries and indexer keys are shareable per block; the sliding window and
// compressor overlap are not, and exist as a snapshot of the state at one block end. A match
// is the longest prefix whose shareable payloads are all stored AND that ends at a block with
// a stored snapshot; payloads past that block are recomputed by the caller. Which block ends
// get a snapshot is a policy (wants_snapshot): every `snapshot_every_blocks`-th block and the
// last whole block of every inserted sequence. See kvstore/README.md for the measured
// trade-off between snapshot bytes and hit length.
//
// Thread-safe: one mutex guards the index; decode and encode run under it (simple and enough
// for one node's request rate on the CPU backend).

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/block.h"
#include "dserve/kvstore/codec.h"
#include "dserve/kvstore/disk_tier.h"
#include "dserve/kvstore/page_pool.h"

namespace dserve::kvstore {

enum class Tier : uint8_t { kDevice = 0, kHost = 1, kDisk = 2 };
inline constexpr int kTierCount = 3;
std::string_view tier_name(Tier tier);  // "device", "host", "disk"

// How blocks of one model are laid out: per pool, the payload layout and the page pools of
// the pages that make up a block's payload, in order (their floats concatenated are the
// payload). A pool without segments (e.g. indexer keys of a model without CSA layers) is
// always trivially present.
struct BlockLayout {
  std::array<PayloadLayout, kPoolCount> payload;
  std::array<std::vector<std::shared_ptr<PagePool>>, kPoolCount> page_pools;
};

// One block's pages, per pool (index by Pool). An empty snapshot list: no snapshot.
struct BlockContent {
  std::array<std::vector<PageRef>, kPoolCount> pages;
};

struct PrefixStoreOptions {
  uint64_t device_capacity_bytes = 1ull << 30;  // pages kept for later (beyond live requests)
  uint64_t host_capacity_bytes = 4ull << 30;    // encoded payloads in memory
  Codec host_codec = Codec::kLossless;
  Codec disk_codec = Codec::kLossless;
  std::string disk_path;  // RocksDB directory; empty: no disk tier
  uint64_t disk_capacity_bytes = 16ull << 30;
  uint64_t write_queue_bytes = 256ull << 20;
  int64_t snapshot_every_blocks = 4;  // >= 1; sequence ends always get one
};

struct TierMetrics {
  uint64_t hit_blocks = 0;  // blocks served from this tier by match()
  uint64_t hit_tokens = 0;
  uint64_t blocks = 0;  // payload-holding blocks now (device, host: counted by the index)
  uint64_t bytes = 0;
  uint64_t evictions = 0;  // blocks moved down or dropped from this tier
};

struct PrefixStoreMetrics {
  uint64_t lookups = 0;
  uint64_t hits = 0;           // lookups that reused at least one block
  uint64_t lookup_tokens = 0;  // tokens the lookups could have reused (whole blocks)
  uint64_t hit_tokens = 0;     // tokens they did reuse
  uint64_t inserted_blocks = 0;
  uint64_t snapshots = 0;             // snapshots inserted
  uint64_t snapshot_bytes = 0;        // device + host bytes held by snapshots now
  uint64_t corrupt = 0;               // payloads that failed to decode (dropped, never served)
  uint64_t pinned_over_capacity = 0;  // demotions refused because requests hold the pages
  std::array<TierMetrics, kTierCount> tiers;
  std::optional<DiskTierStats> disk;
};

class PrefixStore {
 public:
  // `model_fingerprint` names everything the payloads depend on besides the tokens (weights,
  // config, numerics); the codecs are folded in here.
  static Result<std::unique_ptr<PrefixStore>> open(PrefixStoreOptions options,
                                                   std::string_view model_fingerprint,
                                                   BlockLayout layout);
  ~PrefixStore();

  const BlockKey& root() const { return root_; }
  const BlockLayout& layout() const { return layout_; }
  const PrefixStoreOptions& options() const { return options_; }

  struct Match {
    std::vector<BlockKey> keys;        // of the matched blocks
    std::vector<BlockContent> blocks;  // shareable pages (no snapshot) per matched block
    PageRef snapshot;                  // at the end of the last matched block
    std::array<int64_t, kTierCount> blocks_from_tier{};
    int64_t tokens() const { return static_cast<int64_t>(keys.size()) * kBlockTokens; }
  };
  // The longest usable prefix of `tokens`, leaving at least one token to compute (the caller
  // needs its logits). Promotes what it returns to the device tier.
  Match match(std::span<const int32_t> tokens);

  // Whether the caller should snapshot the end of block `block` (0-based) of a sequence of
  // `whole_blocks` whole blocks.
  bool wants_snapshot(int64_t block, int64_t whole_blocks) const;

  // Records block `key`, the child of `parent` (root() for a first block). Pages must be
  // complete and are shared, not copied. Pools the store already has for this block are kept
  // (a block's content is a function of its key). Encodes it for the disk tier (queued).
  void insert(const BlockKey& parent, const BlockKey& key, BlockContent content);

  PrefixStoreMetrics metrics() const;
  // DiskTier::quarantined() of the disk tier: empty, or the corrupt store open() moved aside.
  std::string disk_quarantined() const;
  // Waits until the disk tier has written everything queued.
  void flush();

 private:
  struct Node;
  struct Impl;
  struct Ops;
  PrefixStore(PrefixStoreOptions options, BlockKey root, BlockLayout layout);
  PrefixStoreOptions options_;
  BlockKey root_;
  BlockLayout layout_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dserve::kvstore
