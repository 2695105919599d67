#pragma once
// The scalar formats of the fp8 codec (internal to kvstore/): FP8 e4m3fn and bf16, converted
// from fp32 by round-to-nearest-even. Header-only so that the per-element loops of the codec
// inline them.
//
// e4m3fn (OCP 8-bit floating point, "FN" = finite + NaN): 1 sign bit, 4 exponent bits with
// bias 7, 3 mantissa bits; no infinity; 0x7F and 0xFF are NaN; the largest magnitude is 448
// (0x7E). Subnormals are m * 2^-9. Conversion saturates: any |x| >= 448, infinity included,
// becomes +-448. This is the definition model/src/number_formats.h uses for checkpoints; the
// two are kept in step by hand (kvstore sits below model and cannot include it).

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace dserve::kvstore::internal {

inline constexpr float kE4m3Max = 448.0f;
inline constexpr uint8_t kE4m3MaxCode = 0x7E;
inline constexpr uint8_t kE4m3NaN = 0x7F;

// The fp32 value of every e4m3fn byte, straight from the definition.
inline std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    const int exp = (b >> 3) & 0xF;
    const int man = b & 0x7;
    float v = 0.0f;
    if (exp == 0xF && man == 0x7) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else if (exp == 0) {
      v = std::ldexp(static_cast<float>(man), -9);
    } else {
      v = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
    }
    table[static_cast<size_t>(b)] = (b & 0x80) ? -v : v;
  }
  return table;
}

inline float e4m3_to_f32(uint8_t code) {
  static const std::array<float, 256> table = make_e4m3_table();
  return table[code];
}

inline uint8_t f32_to_e4m3(float x) {
  if (std::isnan(x)) return kE4m3NaN;
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  const float a = std::bit_cast<float>(abs_bits);
  // Saturate: the next code up (480) would be the NaN pattern, and e4m3fn has no infinity.
  if (a >= kE4m3Max) return sign | kE4m3MaxCode;
  if (a < 0x1.0p-6f) {
    // Subnormal range: multiples of 2^-9 (code 8 is the smallest normal, so the rounding is
    // seamless at the boundary). a * 512 is exact; nearbyint rounds ties to even.
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  // Normal range: keep 3 of fp32's 23 mantissa bits, rounding the dropped 20 to nearest even
  // (a carry out of the mantissa correctly bumps the exponent), then rebias 127 -> 7.
  const uint32_t rounded = abs_bits + 0x7FFFFu + ((abs_bits >> 20) & 1u);
  const uint32_t code = (rounded >> 20) - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(code);
}

inline float bf16_to_f32(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

inline uint16_t f32_to_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  // Set a mantissa bit so that truncation cannot turn a NaN into an infinity.
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);  // ties to even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

}  // namespace dserve::kvstore::internal
