#pragma once
// How one pool stores a row (one compressed entry, one indexer key) on its pages, chosen per
// cluster by the KV dtype (`kv_dtype` in the manifest, `--kv-dtype`):
//
//   kv_dtype  compressed entries                   indexer keys
//   fp32      kFp32: width x fp32, as computed     kFp32
//   fp8       kFp8Entry (V4's served entry)        kFp4Key (V4's served indexer key)
//
// The forward writes a row once, encoded, and reads it back decoded; a prefix hit, a tier and
// the prefill-to-decode hand-off move the encoded bytes as they are. So every path sees the
// same values, and the decoded values are what the forward attends to.
//
// kFp8Entry, one row (all integers little-endian; `nope = width - rope` channels):
//   nope bytes        FP8 e4m3fn codes of x / scale(block), rounded to nearest even, saturating
//   pad to even
//   rope x bf16       the RoPE channels (the last `rope` of the row), rounded to nearest even
//   ceil(nope/64) B   one e8m0 scale per block of 64 non-RoPE channels: 2^(byte - 127), the
//                     power of two at or above max(|x| over the block, 1e-4) / 448
//   pad to 8
// At V4 widths (512 channels, 64 RoPE) that is 448 + 128 + 7 + 1 = 584 bytes, against 2,048 in
// fp32: DeepSeek's served entry (MODEL-V4.md "Served numerics").
//
// kFp4Key, one row of `width` channels (a power of two, at least 32):
//   the row is first rotated by the normalised Walsh-Hadamard transform (H / sqrt(width)),
//   width/2 bytes     FP4 e2m1 codes of rotated x / scale(block), two per byte, low nibble
//                     first, rounded to nearest (ties to the even code), saturating at +-6
//   width/32 bytes    one e8m0 scale per block of 32: the power of two at or above
//                     max(|x| over the block, 1e-4) / 6
// At V4 widths (128 channels) 64 + 4 = 68 bytes, against 512. A decoded key is in the rotated
// basis: the indexer rotates its queries the same way (round_trip_rows), so that query . key is
// the same product up to the quantisation, as in DeepSeek's inference code.
//
// Non-finite inputs: e4m3 keeps NaN and saturates +-inf; e2m1 has neither and saturates (a NaN
// becomes 0). The forward never writes either.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dserve/core/status.h"

namespace dserve::kvstore {

// The KV format of a cluster. Stored in values (the layout digest): never renumber.
enum class KvDtype : uint8_t { kFp32 = 0, kFp8 = 1 };
std::string_view kv_dtype_name(KvDtype dtype);          // "fp32", "fp8"
Result<KvDtype> parse_kv_dtype(std::string_view name);  // InvalidArgument naming what is allowed

// Stored in values (the layout digest): never renumber.
enum class RowEncoding : uint8_t { kFp32 = 0, kFp8Entry = 1, kFp4Key = 2 };
std::string_view row_encoding_name(RowEncoding encoding);  // "fp32", "fp8-entry", "fp4-key"

inline constexpr int64_t kFp8ScaleBlock = 64;  // channels per e8m0 scale of an fp8 entry
inline constexpr int64_t kFp4ScaleBlock = 32;  // channels per e8m0 scale of an fp4 key

struct RowFormat {
  RowEncoding encoding = RowEncoding::kFp32;
  int64_t width = 0;          // channels of a decoded row
  int64_t rope_channels = 0;  // kFp8Entry: the last rope_channels stay bf16; otherwise 0

  static RowFormat fp32(int64_t width) { return {RowEncoding::kFp32, width, 0}; }
  // The format compressed entries take under `dtype`.
  static RowFormat entry(KvDtype dtype, int64_t width, int64_t rope_channels);
  // The format indexer keys take under `dtype`.
  static RowFormat index_key(KvDtype dtype, int64_t width);

  // Bytes of one encoded row.
  int64_t row_bytes() const;
  // InvalidArgument when the encoding cannot hold rows of this width (kFp4Key: a power of two
  // of at least 32 channels; kFp8Entry: 0 <= rope_channels <= width).
  Status check() const;
  friend bool operator==(const RowFormat&, const RowFormat&) = default;
};

// Encodes `rows` rows of format.width floats into rows * row_bytes() bytes. Same input, same
// bytes, on every host. Preconditions (checked): format.check() holds.
void encode_rows(const RowFormat& format, const float* in, int64_t rows, std::byte* out);
// Encodes rows given as decode_rows gives them (a device that keeps decoded values: fp4 keys
// already in the rotated basis, not rotated again). Values that decode_rows could have produced
// come back bit for bit from decode_rows.
void encode_decoded_rows(const RowFormat& format, const float* decoded, int64_t rows,
                         std::byte* out);
// Decodes what encode_rows wrote: rows * format.width floats.
void decode_rows(const RowFormat& format, const std::byte* in, int64_t rows, float* out);
// In place, what encode_rows then decode_rows gives: the values the forward attends to (a
// window's kv before it is stored, the indexer's queries in the keys' rotated basis).
void round_trip_rows(const RowFormat& format, float* rows, int64_t count);

}  // namespace dserve::kvstore
