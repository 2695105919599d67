#pragma once
// Block-scaled quantisation of weight matrices, as the official DeepSeek-V4 checkpoint stores
// them (internal to model/):
// - FP8: e4m3fn values [rows, cols] with one power-of-two scale per 128x128 block
//   ([ceil(rows/128), ceil(cols/128)], F8_E8M0, or F32 in the DeepSeek-V3 `weight_scale_inv`
//   style); value = e4m3(q) * scale.
// - MXFP4: e2m1 values packed two per byte, low nibble first ([rows, cols/2]), with one e8m0
//   scale per 32 consecutive values of a row ([rows, cols/32]).
// Quantisation picks the smallest power-of-two scale that keeps the block's largest magnitude
// representable, then rounds to nearest even.

#include <cstdint>

#include "number_formats.h"

namespace dserve::model {

inline constexpr int64_t kFp8Block = 128;
inline constexpr int64_t kFp4Group = 32;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Quantises `rows` (<= 128) rows of width `cols` that form one row of 128x128 blocks: writes
// rows*cols e4m3 bytes to `q` and ceil(cols/128) e8m0 scales to `scales`.
void quantize_fp8_block_row(const float* w, int64_t rows, int64_t cols, uint8_t* q,
                            uint8_t* scales);
// Dequantises rows [row0, row0 + rows) of an FP8 matrix of width `cols`. `q` points at row
// `row0`; `scales` at the whole scale matrix ([ceil(total_rows/128), ceil(cols/128)]) whose
// elements have type `scale_dtype` (F8_E8M0 or F32; raw, unaligned bytes).
void dequantize_fp8(const uint8_t* q, const uint8_t* scales, DType scale_dtype, int64_t row0,
                    int64_t rows, int64_t cols, float* out);

// Quantises `rows` rows of width `cols` (a multiple of 32): rows*cols/2 packed bytes and
// rows*cols/32 e8m0 scales.
void quantize_fp4(const float* w, int64_t rows, int64_t cols, uint8_t* packed, uint8_t* scales);
// The inverse, for `rows` rows whose packed bytes and scales start at `packed` / `scales`.
void dequantize_fp4(const uint8_t* packed, const uint8_t* scales, int64_t rows, int64_t cols,
                    float* out);

}  // namespace dserve::model
