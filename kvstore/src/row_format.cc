#include "dserve/kvstore/row_format.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "dserve/core/check.h"
#include "scalar_formats.h"

namespace dserve::kvstore {
namespace {

constexpr float kFp4Max = 6.0f;
constexpr float kMinBlockMax = 1e-4f;  // a block of zeros still gets a finite scale

int64_t align_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

// The exponent e of the e8m0 scale 2^e of a block whose largest |x| is `amax`: the smallest
// power of two with amax / 2^e <= `top`.
int scale_exponent(float amax, float top) {
  const float s = std::max(amax, kMinBlockMax) / top;
  int exp = 0;
  const float m = std::frexp(s, &exp);  // s = m * 2^exp, m in [0.5, 1)
  const int e = m == 0.5f ? exp - 1 : exp;
  return std::clamp(e, -127, 127);
}

uint8_t e8m0_byte(int e) {
  return static_cast<uint8_t>(e + 127);
}
int e8m0_exponent(uint8_t byte) {
  return static_cast<int>(byte) - 127;
}

float finite_amax(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(x[i])) amax = std::max(amax, std::fabs(x[i]));
  }
  return amax;
}

// e2m1 magnitudes by code (the sign is bit 3).
constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// Nearest e2m1 code, a tie going to the even code; saturating; NaN -> 0.
uint8_t f32_to_e2m1(float x) {
  if (std::isnan(x)) return 0;
  const uint8_t sign = std::signbit(x) ? 0x8 : 0x0;
  const float a = std::fabs(x);
  uint8_t code = 7;
  if (a <= 0.25f) {
    code = 0;
  } else if (a < 0.75f) {
    code = 1;
  } else if (a <= 1.25f) {
    code = 2;
  } else if (a < 1.75f) {
    code = 3;
  } else if (a <= 2.5f) {
    code = 4;
  } else if (a < 3.5f) {
    code = 5;
  } else if (a <= 5.0f) {
    code = 6;
  }
  return static_cast<uint8_t>(sign | code);
}

float e2m1_to_f32(uint8_t code) {
  const float v = kE2m1[code & 0x7];
  return (code & 0x8) ? -v : v;
}

// Normalised fast Walsh-Hadamard transform in place (n a power of two); a fixed order of
// additions, so the same input gives the same bits everywhere.
void hadamard(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j];
        const float b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i)
    x[i] *= norm;
}

struct Fp8EntryShape {
  int64_t nope, rope, rope_at, scales, scales_at, bytes;
};
Fp8EntryShape fp8_entry_shape(const RowFormat& f) {
  Fp8EntryShape s{};
  s.nope = f.width - f.rope_channels;
  s.rope = f.rope_channels;
  s.rope_at = align_up(s.nope, 2);
  s.scales = (s.nope + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  s.scales_at = s.rope_at + 2 * s.rope;
  s.bytes = align_up(s.scales_at + s.scales, 8);
  return s;
}

void encode_fp8_entry(const RowFormat& f, const float* x, uint8_t* out) {
  const Fp8EntryShape s = fp8_entry_shape(f);
  std::memset(out, 0, static_cast<size_t>(s.bytes));
  for (int64_t b = 0; b < s.scales; ++b) {
    const int64_t first = b * kFp8ScaleBlock;
    const int64_t n = std::min(kFp8ScaleBlock, s.nope - first);
    const int e = scale_exponent(finite_amax(x + first, n), internal::kE4m3Max);
    out[s.scales_at + b] = e8m0_byte(e);
    const float inverse = std::ldexp(1.0f, -e);  // a power of two: x * inverse is ldexp(x, -e)
    for (int64_t i = first; i < first + n; ++i)
      out[i] = internal::f32_to_e4m3(x[i] * inverse);
  }
  for (int64_t r = 0; r < s.rope; ++r) {
    const uint16_t bits = internal::f32_to_bf16(x[s.nope + r]);
    std::memcpy(out + s.rope_at + 2 * r, &bits, 2);  // little-endian hosts only (block.h)
  }
}

void decode_fp8_entry(const RowFormat& f, const uint8_t* in, float* x) {
  const Fp8EntryShape s = fp8_entry_shape(f);
  for (int64_t b = 0; b < s.scales; ++b) {
    const int64_t first = b * kFp8ScaleBlock;
    const int64_t n = std::min(kFp8ScaleBlock, s.nope - first);
    const float scale = std::ldexp(1.0f, e8m0_exponent(in[s.scales_at + b]));
    for (int64_t i = first; i < first + n; ++i)
      x[i] = internal::e4m3_to_f32(in[i]) * scale;
  }
  for (int64_t r = 0; r < s.rope; ++r) {
    uint16_t bits = 0;
    std::memcpy(&bits, in + s.rope_at + 2 * r, 2);
    x[s.nope + r] = internal::bf16_to_f32(bits);
  }
}

void encode_fp4_key(const RowFormat& f, const float* x, uint8_t* out, bool rotate = true) {
  const int64_t w = f.width;
  std::vector<float> rotated(x, x + w);
  if (rotate) hadamard(rotated.data(), w);
  std::memset(out, 0, static_cast<size_t>(f.row_bytes()));
  uint8_t* scales = out + w / 2;
  for (int64_t b = 0; b < w / kFp4ScaleBlock; ++b) {
    const float* block = rotated.data() + b * kFp4ScaleBlock;
    const int e = scale_exponent(finite_amax(block, kFp4ScaleBlock), kFp4Max);
    scales[b] = e8m0_byte(e);
    const float inverse = std::ldexp(1.0f, -e);
    for (int64_t i = 0; i < kFp4ScaleBlock; ++i) {
      const int64_t c = b * kFp4ScaleBlock + i;
      const uint8_t code = f32_to_e2m1(block[i] * inverse);
      out[c / 2] = static_cast<uint8_t>(out[c / 2] | (c % 2 == 0 ? code : code << 4));
    }
  }
}

void decode_fp4_key(const RowFormat& f, const uint8_t* in, float* x) {
  const int64_t w = f.width;
  const uint8_t* scales = in + w / 2;
  for (int64_t b = 0; b < w / kFp4ScaleBlock; ++b) {
    const float scale = std::ldexp(1.0f, e8m0_exponent(scales[b]));
    for (int64_t c = b * kFp4ScaleBlock; c < (b + 1) * kFp4ScaleBlock; ++c) {
      const auto code = static_cast<uint8_t>(c % 2 == 0 ? in[c / 2] & 0xF : in[c / 2] >> 4);
      x[c] = e2m1_to_f32(code) * scale;
    }
  }
}

}  // namespace

std::string_view kv_dtype_name(KvDtype dtype) {
  return dtype == KvDtype::kFp8 ? "fp8" : "fp32";
}

Result<KvDtype> parse_kv_dtype(std::string_view name) {
  if (name == "fp32") return KvDtype::kFp32;
  if (name == "fp8") return KvDtype::kFp8;
  return invalid_argument("KV dtype must be fp32 or fp8, got '" + std::string(name) + "'");
}

std::string_view row_encoding_name(RowEncoding encoding) {
  switch (encoding) {
    case RowEncoding::kFp32:
      return "fp32";
    case RowEncoding::kFp8Entry:
      return "fp8-entry";
    case RowEncoding::kFp4Key:
      return "fp4-key";
  }
  return "unknown";
}

RowFormat RowFormat::entry(KvDtype dtype, int64_t width, int64_t rope_channels) {
  if (dtype == KvDtype::kFp32) return fp32(width);
  return {RowEncoding::kFp8Entry, width, rope_channels};
}

RowFormat RowFormat::index_key(KvDtype dtype, int64_t width) {
  if (dtype == KvDtype::kFp32) return fp32(width);
  return {RowEncoding::kFp4Key, width, 0};
}

int64_t RowFormat::row_bytes() const {
  switch (encoding) {
    case RowEncoding::kFp32:
      return width * static_cast<int64_t>(sizeof(float));
    case RowEncoding::kFp8Entry:
      return fp8_entry_shape(*this).bytes;
    case RowEncoding::kFp4Key:
      return width / 2 + width / kFp4ScaleBlock;
  }
  DSERVE_CHECK_MSG(false, "unknown row encoding");
  return 0;
}

Status RowFormat::check() const {
  auto refuse = [&](const std::string& why) {
    return invalid_argument(std::string(row_encoding_name(encoding)) + " rows of " +
                            std::to_string(width) + " channels: " + why);
  };
  if (width <= 0) return refuse("a row needs channels");
  if (encoding != RowEncoding::kFp8Entry && rope_channels != 0) {
    return refuse("only fp8 entries keep RoPE channels apart");
  }
  if (rope_channels < 0 || rope_channels > width) {
    return refuse(std::to_string(rope_channels) + " RoPE channels");
  }
  if (encoding == RowEncoding::kFp4Key &&
      (width < kFp4ScaleBlock || !std::has_single_bit(static_cast<uint64_t>(width)))) {
    return refuse("fp4 indexer keys need a power of two of at least " +
                  std::to_string(kFp4ScaleBlock) + " channels (the Hadamard rotation)");
  }
  return Status::ok();
}

void encode_rows(const RowFormat& format, const float* in, int64_t rows, std::byte* out) {
  if (const Status valid = format.check(); !valid.is_ok()) {
    DSERVE_CHECK_MSG(false, valid.to_string());
  }
  const int64_t bytes = format.row_bytes();
  auto* o = reinterpret_cast<uint8_t*>(out);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * format.width;
    switch (format.encoding) {
      case RowEncoding::kFp32:
        std::memcpy(o + r * bytes, x, static_cast<size_t>(bytes));
        break;
      case RowEncoding::kFp8Entry:
        encode_fp8_entry(format, x, o + r * bytes);
        break;
      case RowEncoding::kFp4Key:
        encode_fp4_key(format, x, o + r * bytes);
        break;
    }
  }
}

void encode_decoded_rows(const RowFormat& format, const float* decoded, int64_t rows,
                         std::byte* out) {
  if (format.encoding != RowEncoding::kFp4Key) {
    encode_rows(format, decoded, rows, out);
    return;
  }
  if (const Status valid = format.check(); !valid.is_ok()) {
    DSERVE_CHECK_MSG(false, valid.to_string());
  }
  for (int64_t r = 0; r < rows; ++r) {
    encode_fp4_key(format, decoded + r * format.width,
                   reinterpret_cast<uint8_t*>(out) + r * format.row_bytes(), /*rotate=*/false);
  }
}

void decode_rows(const RowFormat& format, const std::byte* in, int64_t rows, float* out) {
  const int64_t bytes = format.row_bytes();
  const auto* i = reinterpret_cast<const uint8_t*>(in);
  for (int64_t r = 0; r < rows; ++r) {
    float* x = out + r * format.width;
    switch (format.encoding) {
      case RowEncoding::kFp32:
        std::memcpy(x, i + r * bytes, static_cast<size_t>(bytes));
        break;
      case RowEncoding::kFp8Entry:
        decode_fp8_entry(format, i + r * bytes, x);
        break;
      case RowEncoding::kFp4Key:
        decode_fp4_key(format, i + r * bytes, x);
        break;
    }
  }
}

void round_trip_rows(const RowFormat& format, float* rows, int64_t count) {
  if (format.encoding == RowEncoding::kFp32) return;
  std::vector<std::byte> encoded(static_cast<size_t>(format.row_bytes()));
  for (int64_t r = 0; r < count; ++r) {
    encode_rows(format, rows + r * format.width, 1, encoded.data());
    decode_rows(format, encoded.data(), 1, rows + r * format.width);
  }
}

}  // namespace dserve::kvstore
