#pragma once
// Element types of safetensors files and the scalar conversions between them and fp32
// (internal to model/). Rounding from fp32 is always round-to-nearest-even; FP8 e4m3fn
// saturates at +-448 (it has no infinity), FP4 e2m1 at +-6.

#include <cstdint>
#include <optional>
#include <string_view>

namespace dserve::model {

enum class DType {
  kF32,
  kF16,
  kBF16,
  kF8E4M3,  // "F8_E4M3": e4m3fn, bias 7, max 448, NaN = 0x7F/0xFF, no infinity
  kF8E8M0,  // "F8_E8M0": a power-of-two scale 2^(e - 127); 0xFF is NaN
  kI8,      // also packed FP4 e2m1, two per byte, low nibble first
  kU8,
  kI32,
  kI64,
};

std::string_view dtype_name(DType dtype);  // the safetensors spelling, e.g. "BF16"
std::optional<DType> parse_dtype(std::string_view name);
int64_t dtype_size(DType dtype);   // bytes per element
bool is_float_dtype(DType dtype);  // F32, F16, BF16

float bf16_to_f32(uint16_t bits);
uint16_t f32_to_bf16(float value);
float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);
float e4m3_to_f32(uint8_t bits);
uint8_t f32_to_e4m3(float value);
float e8m0_to_f32(uint8_t bits);
// The smallest power of two 2^e with value <= 2^e * max_code, as an e8m0 byte; 127 (1.0) for
// value 0. The scale for block quantisation of a block whose largest magnitude is `value`.
uint8_t e8m0_scale_for(float value, float max_code);
float e2m1_to_f32(uint8_t nibble);  // low 4 bits: sign bit 3, magnitude code bits 0..2
uint8_t f32_to_e2m1(float value);   // a nibble in the low 4 bits

}  // namespace dserve::model
