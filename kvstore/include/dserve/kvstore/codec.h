#pragma once
// The codec: how one pool payload of one block becomes bytes for the disk tier and the wire,
// and back. An encoded value is self-describing and checksummed, so a value that was cut
// short, bit-flipped, written for another block, pool or layout, or by another format version
// is refused with DataLoss instead of being decoded into wrong attention state.
//
// Value format, version 1. Every integer is little-endian, whatever the host.
//
//   offset  size  field
//        0     4  magic "DSKV"
//        4     2  u16 format version (1)
//        6     1  u8 codec actually applied (Codec; kLossless for pools fp8 does not apply to)
//        7     1  u8 pool (Pool)
//        8    16  block key: u64 hi, then u64 lo
//       24     8  u64 PayloadLayout::digest() of the layout the payload was encoded with
//       32     8  u64 payload byte count N
//       40     N  payload
//     40+N     8  u64 XXH3-64 (seed 0) of bytes [0, 40+N)
//
// Payload by codec, segment after segment in layout order:
//   kLossless  the rows as the pages hold them (row_format.h), bit for bit: fp32 values as
//              computed, or, with kv_dtype fp8, V4's fp8 entries and fp4 indexer keys. In fp8
//              mode a block goes device -> host -> disk -> host -> another worker unchanged.
//   kFp8       (Pool::kCompressed of fp32 pages only) per segment three planes, each row-major:
//                rows           fp32 scale, one per row: max |x| over the row's non-RoPE
//                               channels / 448 (0 for an all-zero row);
//                rows x rope    bf16, the RoPE channels (the last rope_channels of a row),
//                               rounded to nearest even;
//                rows x nope    FP8 e4m3fn codes of x / scale for the other channels (nope =
//                               width - rope_channels), rounded to nearest even, saturating.
//              Planes rather than interleaved rows so that a GPU kernel reads each with
//              aligned, coalesced loads. Decoded x = e4m3(code) * scale and bf16(rope): the
//              error of a non-RoPE channel is at most 1/28 of its row's max |x| (half an
//              e4m3 step at the top of the range), and at most 2^-4 of |x| itself when
//              x / scale is an e4m3 normal; a RoPE channel keeps 8 significant bits. RoPE
//              channels stay 16 bit, as in DeepSeek's own FP8 KV cache (FlashMLA, V3.2): they
//              carry the position, and a row-scaled fp8 error there enters every query-key
//              product with a position-dependent rotation.
//              Non-finite inputs: NaN stays NaN; +-inf saturates to +-(448 * scale), the scale
//              being taken over the row's finite values.
//
// Fp8 is a lossy tier codec for clusters whose pages are fp32: a block that went through it
// decodes to other values than the forward computed (kv_dtype fp8 is exact instead: the pages
// themselves hold fp8). It applies only to Pool::kCompressed of fp32 pages; on pages already
// encoded it is the identity. Indexer keys (kIndexKeys) pick
// the top-k entries, where a small error changes which entries are attended, and a snapshot
// (kSnapshot) is the sliding window and compressor overlap a restored request continues from
// bit for bit: both are stored lossless even when kFp8 is asked for, and the value's codec
// byte then says kLossless.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/block.h"

namespace dserve::kvstore {

enum class Codec : uint8_t { kLossless = 0, kFp8 = 1 };

inline constexpr uint16_t kCodecFormatVersion = 1;
inline constexpr size_t kCodecHeaderBytes = 40;   // everything before the payload
inline constexpr size_t kCodecChecksumBytes = 8;  // the trailing XXH3-64

std::string_view codec_name(Codec codec);          // "lossless", "fp8"
Result<Codec> parse_codec(std::string_view name);  // InvalidArgument for other names

// The codec encode_payload applies for `requested` in `pool` with `layout` (kFp8 only for
// kCompressed of fp32 rows).
Codec effective_codec(Pool pool, Codec requested);
Codec effective_codec(Pool pool, Codec requested, const PayloadLayout& layout);

// Encodes `data`, the payload of `pool` for block `key` laid out as `layout` (the pages' bytes),
// into a value in the format above. Preconditions (checked): data.size() == layout.bytes();
// every segment has rows >= 0, width >= 0 and 0 <= rope_channels <= width. Thread-safe (no
// shared state).
std::vector<uint8_t> encode_payload(const BlockKey& key, Pool pool, Codec codec,
                                    const PayloadLayout& layout, std::span<const std::byte> data);
// The same for a layout of fp32 rows, from their values.
std::vector<uint8_t> encode_payload(const BlockKey& key, Pool pool, Codec codec,
                                    const PayloadLayout& layout, std::span<const float> data);

// Verifies `value` and decodes its payload into the pages' bytes (layout.bytes()). DataLoss,
// with a message naming the block, the pool and what did not match, when the value is too
// short, its magic, format version, length, checksum, codec, key, pool or layout digest is not
// what it should be, or its payload size does not fit the layout. Never reads outside `value`,
// whatever its bytes.
Result<std::vector<std::byte>> decode_payload_bytes(const BlockKey& expected_key,
                                                    Pool expected_pool, const PayloadLayout& layout,
                                                    std::span<const uint8_t> value);
// The same for a layout of fp32 rows (checked), as layout.floats() values.
Result<std::vector<float>> decode_payload(const BlockKey& expected_key, Pool expected_pool,
                                          const PayloadLayout& layout,
                                          std::span<const uint8_t> value);

// The exact size of the value encode_payload produces for this pool, codec and layout.
size_t encoded_size(Pool pool, Codec codec, const PayloadLayout& layout);

}  // namespace dserve::kvstore
