#pragma once
// Blocks: the unit the prefix store shares, keeps in tiers and ships between nodes.
//
// A block is kBlockTokens consecutive tokens of a request, starting at a multiple of
// kBlockTokens. Its content depends on every token before its end and on the model, so a
// block is named by a BlockKey chained from the model's root key through the tokens of every
// block up to and including it. Two models (other weights, config or codec) have other root
// keys and never share a block.
//
// For each block the store keeps up to three payloads, one per Pool:
//   kCompressed  the compressed entries the block's windows produced (CSA and HCA layers),
//   kIndexKeys   the Lightning Indexer keys of those windows (CSA layers),
//   kSnapshot    the request state that is not shareable per block, as it stands at the
//                block's end: every layer's sliding window and the compressors' overlap.
// A payload is the block's rows as its pages hold them (row_format.h: fp32 as the forward
// computed them, or V4's fp8 entries and fp4 indexer keys), laid out as a PayloadLayout says.

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/kvstore/row_format.h"

namespace dserve::kvstore {

inline constexpr int64_t kBlockTokens = 128;

// 128 bits of XXH3: collisions are out of reach for any realistic number of blocks.
struct BlockKey {
  uint64_t hi = 0;
  uint64_t lo = 0;
  friend bool operator==(const BlockKey&, const BlockKey&) = default;
  std::string to_hex() const;  // 32 lowercase hex digits, hi first
};

struct BlockKeyHash {
  size_t operator()(const BlockKey& k) const { return static_cast<size_t>(k.lo ^ (k.hi << 1)); }
};

// The key of the empty prefix of one model. `model_fingerprint` must change whenever a
// block's content would: weights, config, numerics, codec (see model::model_fingerprint).
BlockKey root_key(std::string_view model_fingerprint);

// The key of the block that follows `parent` and holds `tokens` (kBlockTokens of them).
// Keys and layout digests hash the host's little-endian words; they are stored, so a
// big-endian port must hash byte-swapped words to read existing stores.
BlockKey chain_key(const BlockKey& parent, std::span<const int32_t> tokens);

// The keys of every whole block of `tokens`, in order (a trailing partial block has none).
std::vector<BlockKey> block_keys(const BlockKey& root, std::span<const int32_t> tokens);

// The numeric values are stored (codec values, the disk tier's catalogue): never renumber.
enum class Pool : uint8_t { kCompressed = 0, kIndexKeys = 1, kSnapshot = 2 };
inline constexpr int kPoolCount = 3;
inline constexpr Pool kAllPools[] = {Pool::kCompressed, Pool::kIndexKeys, Pool::kSnapshot};
std::string_view pool_name(Pool pool);  // "compressed", "index_keys", "snapshot"

// One run of rows inside a payload: `rows` rows of `width` channels, of which the last
// `rope_channels` carry RoPE, each stored as `encoding` says (row_format.h).
struct Segment {
  int64_t rows = 0;
  int64_t width = 0;
  int64_t rope_channels = 0;
  RowEncoding encoding = RowEncoding::kFp32;
  RowFormat format() const {
    return {encoding, width, encoding == RowEncoding::kFp8Entry ? rope_channels : 0};
  }
  int64_t bytes() const { return rows * format().row_bytes(); }
  friend bool operator==(const Segment&, const Segment&) = default;
};

// The layout of one pool's payload for one block: its segments, back to back.
struct PayloadLayout {
  std::vector<Segment> segments;
  int64_t floats() const;  // decoded: the sum of rows x width
  int64_t bytes() const;   // as stored on pages: the sum of the segments' bytes
  bool all_fp32() const;   // every segment stores fp32 rows
  // A digest of the segments, stored with every encoded payload so that a payload is never
  // decoded against another layout.
  uint64_t digest() const;
  friend bool operator==(const PayloadLayout&, const PayloadLayout&) = default;
};

}  // namespace dserve::kvstore
