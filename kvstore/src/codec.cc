#include "dserve/kvstore/codec.h"

#include <xxhash.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "dserve/core/check.h"
#include "scalar_formats.h"

namespace dserve::kvstore {
namespace {

// Header fields are written byte by byte (put_le/get_le) and so are little-endian on any host;
// the payload planes are bulk-copied with memcpy, which is only little-endian on such a host.
static_assert(std::endian::native == std::endian::little,
              "codec payload planes are memcpy'd: add byte swaps before building big-endian");

constexpr uint8_t kMagic[4] = {'D', 'S', 'K', 'V'};
constexpr size_t kMagicAt = 0;
constexpr size_t kVersionAt = 4;
constexpr size_t kCodecAt = 6;
constexpr size_t kPoolAt = 7;
constexpr size_t kKeyHiAt = 8;
constexpr size_t kKeyLoAt = 16;
constexpr size_t kDigestAt = 24;
constexpr size_t kPayloadBytesAt = 32;
static_assert(kPayloadBytesAt + 8 == kCodecHeaderBytes);

template <typename T>
void put_le(uint8_t* p, T v) {
  const auto u = static_cast<uint64_t>(v);
  for (size_t i = 0; i < sizeof(T); ++i)
    p[i] = static_cast<uint8_t>(u >> (8 * i));
}

template <typename T>
T get_le(const uint8_t* p) {
  uint64_t u = 0;
  for (size_t i = 0; i < sizeof(T); ++i)
    u |= static_cast<uint64_t>(p[i]) << (8 * i);
  return static_cast<T>(u);
}

void check_layout(const PayloadLayout& layout) {
  for (const Segment& s : layout.segments) {
    DSERVE_CHECK_MSG(
        s.rows >= 0 && s.width >= 0 && s.rope_channels >= 0 && s.rope_channels <= s.width,
        "a segment needs rows >= 0, width >= 0 and 0 <= rope_channels <= width");
  }
}

size_t fp8_row_bytes(const Segment& s) {
  const auto rope = static_cast<size_t>(s.rope_channels);
  const auto nope = static_cast<size_t>(s.width - s.rope_channels);
  return sizeof(float) + rope * sizeof(uint16_t) + nope;
}

size_t payload_bytes(Codec codec, const PayloadLayout& layout) {
  if (codec == Codec::kLossless) return static_cast<size_t>(layout.bytes());
  size_t n = 0;
  for (const Segment& s : layout.segments)
    n += static_cast<size_t>(s.rows) * fp8_row_bytes(s);
  return n;
}

// The row scale: max |x| over the finite non-RoPE channels / 448, rounded up when the
// division rounded down, so that every |x| / scale <= 448 and nothing saturates but +-inf.
// The round-up also keeps a tiny (subnormal) row max from flushing the scale to 0.
float fp8_row_scale(const float* row, int64_t nope) {
  float amax = 0.0f;
  for (int64_t c = 0; c < nope; ++c) {
    const float a = std::fabs(row[c]);
    if (std::isfinite(a) && a > amax) amax = a;
  }
  float scale = amax / internal::kE4m3Max;
  // scale * 448 is exact in double (24 + 3 significant bits).
  if (static_cast<double>(scale) * internal::kE4m3Max < static_cast<double>(amax))
    scale = std::nextafter(scale, std::numeric_limits<float>::infinity());
  return scale;
}

// Writes one segment's three planes (see codec.h) at `out`; returns the end.
uint8_t* encode_fp8_segment(const Segment& s, const float* x, uint8_t* out) {
  const int64_t rope = s.rope_channels;
  const int64_t nope = s.width - rope;
  uint8_t* scales = out;
  uint8_t* rope_plane = scales + s.rows * static_cast<int64_t>(sizeof(float));
  uint8_t* codes = rope_plane + s.rows * rope * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t r = 0; r < s.rows; ++r) {
    const float* row = x + r * s.width;
    const float scale = fp8_row_scale(row, nope);
    std::memcpy(scales + r * 4, &scale, sizeof(scale));
    uint8_t* row_codes = codes + r * nope;
    if (scale == 0.0f) {
      // Every finite value is +-0: encode the values themselves (keeps the sign of zero and
      // NaN; an infinity saturates and decodes to 448 * 0).
      for (int64_t c = 0; c < nope; ++c)
        row_codes[c] = internal::f32_to_e4m3(row[c]);
    } else {
      for (int64_t c = 0; c < nope; ++c)
        row_codes[c] = internal::f32_to_e4m3(row[c] / scale);
    }
    for (int64_t c = 0; c < rope; ++c) {
      const uint16_t b = internal::f32_to_bf16(row[nope + c]);
      std::memcpy(rope_plane + (r * rope + c) * 2, &b, sizeof(b));
    }
  }
  return codes + s.rows * nope;
}

const uint8_t* decode_fp8_segment(const Segment& s, const uint8_t* in, float* x) {
  const int64_t rope = s.rope_channels;
  const int64_t nope = s.width - rope;
  const uint8_t* scales = in;
  const uint8_t* rope_plane = scales + s.rows * static_cast<int64_t>(sizeof(float));
  const uint8_t* codes = rope_plane + s.rows * rope * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t r = 0; r < s.rows; ++r) {
    float* row = x + r * s.width;
    float scale = 0.0f;
    std::memcpy(&scale, scales + r * 4, sizeof(scale));
    const uint8_t* row_codes = codes + r * nope;
    for (int64_t c = 0; c < nope; ++c)
      row[c] = internal::e4m3_to_f32(row_codes[c]) * scale;
    for (int64_t c = 0; c < rope; ++c) {
      uint16_t b = 0;
      std::memcpy(&b, rope_plane + (r * rope + c) * 2, sizeof(b));
      row[nope + c] = internal::bf16_to_f32(b);
    }
  }
  return codes + s.rows * nope;
}

std::string hex64(uint64_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out = "0x";
  for (int shift = 60; shift >= 0; shift -= 4)
    out += kDigits[(v >> shift) & 0xF];
  return out;
}

std::string pool_byte_name(uint8_t pool) {
  if (pool < kPoolCount) return std::string(pool_name(static_cast<Pool>(pool)));
  return "unknown pool " + std::to_string(pool);
}

}  // namespace

std::string_view codec_name(Codec codec) {
  switch (codec) {
    case Codec::kLossless:
      return "lossless";
    case Codec::kFp8:
      return "fp8";
  }
  DSERVE_CHECK_MSG(false, "unknown codec");
  return "";
}

Result<Codec> parse_codec(std::string_view name) {
  if (name == "lossless") return Codec::kLossless;
  if (name == "fp8") return Codec::kFp8;
  return invalid_argument("unknown KV codec '" + std::string(name) +
                          "' (expected 'lossless' or 'fp8')");
}

Codec effective_codec(Pool pool, Codec requested) {
  return pool == Pool::kCompressed ? requested : Codec::kLossless;
}

Codec effective_codec(Pool pool, Codec requested, const PayloadLayout& layout) {
  return layout.all_fp32() ? effective_codec(pool, requested) : Codec::kLossless;
}

size_t encoded_size(Pool pool, Codec codec, const PayloadLayout& layout) {
  check_layout(layout);
  return kCodecHeaderBytes + payload_bytes(effective_codec(pool, codec, layout), layout) +
         kCodecChecksumBytes;
}

std::vector<uint8_t> encode_payload(const BlockKey& key, Pool pool, Codec codec,
                                    const PayloadLayout& layout, std::span<const float> data) {
  DSERVE_CHECK_MSG(layout.all_fp32(), "float payloads are for layouts of fp32 rows");
  return encode_payload(key, pool, codec, layout, std::as_bytes(data));
}

std::vector<uint8_t> encode_payload(const BlockKey& key, Pool pool, Codec codec,
                                    const PayloadLayout& layout, std::span<const std::byte> data) {
  check_layout(layout);
  DSERVE_CHECK_MSG(static_cast<int64_t>(data.size()) == layout.bytes(),
                   "the payload does not have the layout's number of bytes");
  const Codec applied = effective_codec(pool, codec, layout);
  const size_t n = payload_bytes(applied, layout);
  std::vector<uint8_t> value(kCodecHeaderBytes + n + kCodecChecksumBytes);
  uint8_t* p = value.data();
  std::memcpy(p + kMagicAt, kMagic, sizeof(kMagic));
  put_le<uint16_t>(p + kVersionAt, kCodecFormatVersion);
  put_le<uint8_t>(p + kCodecAt, static_cast<uint8_t>(applied));
  put_le<uint8_t>(p + kPoolAt, static_cast<uint8_t>(pool));
  put_le<uint64_t>(p + kKeyHiAt, key.hi);
  put_le<uint64_t>(p + kKeyLoAt, key.lo);
  put_le<uint64_t>(p + kDigestAt, layout.digest());
  put_le<uint64_t>(p + kPayloadBytesAt, n);
  uint8_t* payload = p + kCodecHeaderBytes;
  if (applied == Codec::kLossless) {
    if (n > 0) std::memcpy(payload, data.data(), n);
  } else {
    // fp32 rows (all_fp32): the values, copied out so that they are read as floats.
    std::vector<float> values(static_cast<size_t>(layout.floats()));
    if (!values.empty()) std::memcpy(values.data(), data.data(), data.size());
    const float* x = values.data();
    uint8_t* out = payload;
    for (const Segment& s : layout.segments) {
      out = encode_fp8_segment(s, x, out);
      x += s.rows * s.width;
    }
    DSERVE_CHECK(out == payload + n);
  }
  put_le<uint64_t>(payload + n, XXH3_64bits(p, kCodecHeaderBytes + n));
  return value;
}

Result<std::vector<float>> decode_payload(const BlockKey& expected_key, Pool expected_pool,
                                          const PayloadLayout& layout,
                                          std::span<const uint8_t> value) {
  DSERVE_CHECK_MSG(layout.all_fp32(), "float payloads are for layouts of fp32 rows");
  auto bytes = decode_payload_bytes(expected_key, expected_pool, layout, value);
  if (!bytes.is_ok()) return bytes.status();
  std::vector<float> out(static_cast<size_t>(layout.floats()));
  if (!out.empty()) std::memcpy(out.data(), bytes->data(), bytes->size());
  return out;
}

Result<std::vector<std::byte>> decode_payload_bytes(const BlockKey& expected_key,
                                                    Pool expected_pool, const PayloadLayout& layout,
                                                    std::span<const uint8_t> value) {
  check_layout(layout);
  const std::string where = "KV value of block " + expected_key.to_hex() + ", pool " +
                            std::string(pool_name(expected_pool)) + ": ";
  constexpr size_t kFixed = kCodecHeaderBytes + kCodecChecksumBytes;
  if (value.size() < kFixed) {
    return data_loss(where + "truncated: " + std::to_string(value.size()) +
                     " bytes, shorter than the " + std::to_string(kFixed) +
                     "-byte header and checksum");
  }
  const uint8_t* p = value.data();
  if (std::memcmp(p + kMagicAt, kMagic, sizeof(kMagic)) != 0)
    return data_loss(where + "bad magic (expected \"DSKV\"): not a dserve KV value");
  const auto version = get_le<uint16_t>(p + kVersionAt);
  if (version != kCodecFormatVersion) {
    return data_loss(where + "format version " + std::to_string(version) +
                     ", this build reads version " + std::to_string(kCodecFormatVersion));
  }
  // The length field is compared with what is there before anything is read through it.
  const auto n = get_le<uint64_t>(p + kPayloadBytesAt);
  const size_t available = value.size() - kFixed;
  if (n != available) {
    return data_loss(where + "payload length field says " + std::to_string(n) +
                     " bytes, the value holds " + std::to_string(available) +
                     " (truncated or corrupt)");
  }
  const auto stored_sum = get_le<uint64_t>(p + kCodecHeaderBytes + n);
  const uint64_t sum = XXH3_64bits(p, kCodecHeaderBytes + n);
  if (stored_sum != sum) {
    return data_loss(where + "checksum mismatch (stored " + hex64(stored_sum) + ", computed " +
                     hex64(sum) + ")");
  }
  // The bytes are what the writer wrote; what follows catches values written for another
  // block, pool or layout (or by a buggy writer), not bit rot.
  const auto codec_byte = get_le<uint8_t>(p + kCodecAt);
  if (codec_byte > static_cast<uint8_t>(Codec::kFp8))
    return data_loss(where + "unknown codec " + std::to_string(codec_byte));
  const auto codec = static_cast<Codec>(codec_byte);
  const auto pool_byte = get_le<uint8_t>(p + kPoolAt);
  if (pool_byte != static_cast<uint8_t>(expected_pool)) {
    return data_loss(where + "the value was written for pool " + pool_byte_name(pool_byte));
  }
  if (effective_codec(expected_pool, codec, layout) != codec) {
    return data_loss(where + "codec " + std::string(codec_name(codec)) +
                     " is never applied to this pool");
  }
  const BlockKey stored_key{get_le<uint64_t>(p + kKeyHiAt), get_le<uint64_t>(p + kKeyLoAt)};
  if (stored_key != expected_key)
    return data_loss(where + "the value was written for block " + stored_key.to_hex());
  const auto digest = get_le<uint64_t>(p + kDigestAt);
  if (digest != layout.digest()) {
    return data_loss(where + "the value was encoded for another layout (digest " + hex64(digest) +
                     ", expected " + hex64(layout.digest()) + ")");
  }
  const size_t expected_n = payload_bytes(codec, layout);
  if (n != expected_n) {
    return data_loss(where + std::to_string(n) + " payload bytes, the layout needs " +
                     std::to_string(expected_n) + " with codec " + std::string(codec_name(codec)));
  }

  std::vector<std::byte> out(static_cast<size_t>(layout.bytes()));
  const uint8_t* payload = p + kCodecHeaderBytes;
  if (codec == Codec::kLossless) {
    if (n > 0) std::memcpy(out.data(), payload, n);
  } else {
    std::vector<float> values(static_cast<size_t>(layout.floats()));
    float* x = values.data();
    const uint8_t* in = payload;
    for (const Segment& s : layout.segments) {
      in = decode_fp8_segment(s, in, x);
      x += s.rows * s.width;
    }
    DSERVE_CHECK(in == payload + n);
    if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());
  }
  return out;
}

}  // namespace dserve::kvstore
