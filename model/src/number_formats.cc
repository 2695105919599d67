#include "number_formats.h"

#include <array>
#include <bit>
#include <cmath>
#include <limits>

namespace dserve::model {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  int64_t size;
};
constexpr std::array<DTypeInfo, 9> kDTypes = {{
    {DType::kF32, "F32", 4},
    {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},
    {DType::kF8E4M3, "F8_E4M3", 1},
    {DType::kF8E8M0, "F8_E8M0", 1},
    {DType::kI8, "I8", 1},
    {DType::kU8, "U8", 1},
    {DType::kI32, "I32", 4},
    {DType::kI64, "I64", 8},
}};

// The e4m3fn value of every byte, built once.
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int exp = (b >> 3) & 0xF;
    const int man = b & 0x7;
    float v;
    if (exp == 0xF && man == 0x7) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else if (exp == 0) {
      v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man * 2^-6 / 8
    } else {
      v = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
    }
    t[static_cast<size_t>(b)] = (b & 0x80) ? -v : v;
  }
  return t;
}

constexpr std::array<float, 8> kE2m1Magnitudes = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

}  // namespace

std::string_view dtype_name(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (d.name == name) return d.dtype;
  }
  return std::nullopt;
}

int64_t dtype_size(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 0;
}

bool is_float_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

float bf16_to_f32(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t f32_to_bf16(float value) {
  const uint32_t u = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((u >> 16) | 0x40);  // keep it a NaN
  const uint32_t rounding = 0x7FFF + ((u >> 16) & 1);                     // ties to even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  const int exp = (bits >> 10) & 0x1F;
  const uint32_t man = bits & 0x3FFu;
  float v;
  if (exp == 0x1F) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else {
    v = std::ldexp(1.0f + static_cast<float>(man) / 1024.0f, exp - 15);
  }
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) | sign);
}

uint16_t f32_to_f16(float value) {
  const uint32_t u = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(value);
  if (std::isnan(value)) return static_cast<uint16_t>(sign | 0x7E00);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7C00);  // rounds past the max
  if (a < 0x1.0p-14f) {
    // Subnormal: a multiple of 2^-24; nearbyint rounds ties to even in the default mode.
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1.0p24f)));
  }
  int e = 0;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1 + 15;
  int man = static_cast<int>(std::nearbyint((m * 2.0f - 1.0f) * 1024.0f));
  if (man == 1024) {
    man = 0;
    ++exp;
  }
  return static_cast<uint16_t>(sign | (exp << 10) | man);
}

float e4m3_to_f32(uint8_t bits) {
  static const std::array<float, 256> table = make_e4m3_table();
  return table[bits];
}

uint8_t f32_to_e4m3(float value) {
  if (std::isnan(value)) return 0x7F;
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float a = std::fabs(value);
  if (a >= 448.0f) return sign | 0x7E;  // saturate: e4m3fn has no infinity
  if (a < 0x1.0p-6f) {
    // Subnormals are multiples of 2^-9; code 8 is the smallest normal, so this is seamless.
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  int e = 0;
  const float m = std::frexp(a, &e);
  int exp = e - 1 + 7;
  int man = static_cast<int>(std::nearbyint((m * 2.0f - 1.0f) * 8.0f));
  if (man == 8) {
    man = 0;
    ++exp;
  }
  return static_cast<uint8_t>(sign | (exp << 3) | man);
}

float e8m0_to_f32(uint8_t bits) {
  if (bits == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

uint8_t e8m0_scale_for(float value, float max_code) {
  if (!(value > 0.0f) || !std::isfinite(value)) return 127;
  // The exponent is found by frexp rather than log2 so that it is exact.
  int e = 0;
  const float m = std::frexp(value / max_code, &e);  // ratio = m * 2^e, m in [0.5, 1)
  const int exp = (m == 0.5f) ? e - 1 : e;           // ceil(log2(ratio))
  const int biased = exp + 127;
  return static_cast<uint8_t>(biased < 0 ? 0 : biased > 254 ? 254 : biased);
}

float e2m1_to_f32(uint8_t nibble) {
  const float v = kE2m1Magnitudes[nibble & 0x7];
  return (nibble & 0x8) ? -v : v;
}

uint8_t f32_to_e2m1(float value) {
  if (std::isnan(value)) return 0;
  const uint8_t sign = std::signbit(value) ? 0x8 : 0x0;
  const float a = std::fabs(value);
  uint8_t best = 0;
  for (uint8_t c = 1; c < 8; ++c) {
    const float d_best = std::fabs(a - kE2m1Magnitudes[best]);
    const float d = std::fabs(a - kE2m1Magnitudes[c]);
    // Strictly closer wins; on a tie the even code wins (round to nearest even).
    if (d < d_best || (d == d_best && (c % 2 == 0))) best = c;
  }
  return sign | best;
}

}  // namespace dserve::model
