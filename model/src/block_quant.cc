#include "block_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace dserve::model {

void quantize_fp8_block_row(const float* w, int64_t rows, int64_t cols, uint8_t* q,
                            uint8_t* scales) {
  for (int64_t c0 = 0, bj = 0; c0 < cols; c0 += kFp8Block, ++bj) {
    const int64_t c1 = std::min(cols, c0 + kFp8Block);
    float amax = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c)
        amax = std::max(amax, std::fabs(w[r * cols + c]));
    }
    const uint8_t s = e8m0_scale_for(amax, 448.0f);
    scales[bj] = s;
    const float inv = 1.0f / e8m0_to_f32(s);  // exact: a power of two
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c)
        q[r * cols + c] = f32_to_e4m3(w[r * cols + c] * inv);
    }
  }
}

void dequantize_fp8(const uint8_t* q, const uint8_t* scales, DType scale_dtype, int64_t row0,
                    int64_t rows, int64_t cols, float* out) {
  const int64_t scale_cols = ceil_div(cols, kFp8Block);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bi = (row0 + r) / kFp8Block;
    for (int64_t bj = 0; bj < scale_cols; ++bj) {
      float s;
      const int64_t idx = bi * scale_cols + bj;
      if (scale_dtype == DType::kF32) {
        std::memcpy(&s, scales + idx * 4, 4);
      } else {
        s = e8m0_to_f32(scales[idx]);
      }
      const int64_t c1 = std::min(cols, (bj + 1) * kFp8Block);
      for (int64_t c = bj * kFp8Block; c < c1; ++c) {
        out[r * cols + c] = e4m3_to_f32(q[r * cols + c]) * s;
      }
    }
  }
}

void quantize_fp4(const float* w, int64_t rows, int64_t cols, uint8_t* packed, uint8_t* scales) {
  const int64_t groups = cols / kFp4Group;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = w + r * cols;
    uint8_t* p = packed + r * (cols / 2);
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f;
      for (int64_t i = 0; i < kFp4Group; ++i)
        amax = std::max(amax, std::fabs(x[g * kFp4Group + i]));
      const uint8_t s = e8m0_scale_for(amax, 6.0f);
      scales[r * groups + g] = s;
      const float inv = 1.0f / e8m0_to_f32(s);
      for (int64_t i = 0; i < kFp4Group; i += 2) {
        const int64_t c = g * kFp4Group + i;
        const uint8_t lo = f32_to_e2m1(x[c] * inv);
        const uint8_t hi = f32_to_e2m1(x[c + 1] * inv);
        p[c / 2] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

void dequantize_fp4(const uint8_t* packed, const uint8_t* scales, int64_t rows, int64_t cols,
                    float* out) {
  const int64_t groups = cols / kFp4Group;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = packed + r * (cols / 2);
    float* o = out + r * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = e8m0_to_f32(scales[r * groups + g]);
      for (int64_t i = 0; i < kFp4Group; i += 2) {
        const int64_t c = g * kFp4Group + i;
        const uint8_t b = p[c / 2];
        o[c] = e2m1_to_f32(b & 0xF) * s;
        o[c + 1] = e2m1_to_f32(static_cast<uint8_t>(b >> 4)) * s;
      }
    }
  }
}

}  // namespace dserve::model
