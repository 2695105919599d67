#pragma once
// The CPU reference backend: plain, single-precision implementations of every operation the
// DeepSeek-V4 forward pass needs. This is the numerical oracle of the project: other backends
// are tested against it, op by op (tests/kernels). All tensors are row-major fp32; shapes are
// given as [rows, cols]. Functions are thread-compatible (no shared state); matmul may use
// several threads internally (OpenBLAS).

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "dserve/kernels/tensor.h"

namespace dserve::kernels::cpu {

// y[n, m] = x[n, k] . w[m, k]^T  (a Linear layer with weight [out, in]); y is overwritten.
void matmul(const float* x, int64_t n, int64_t k, const Tensor& w, float* y);
// Same, with the weight given as m rows of k floats at `w` (a block of a larger weight) and
// output rows `y_stride` apart.
void matmul_rows(const float* x, int64_t n, int64_t k, const float* w, int64_t m, float* y,
                 int64_t y_stride);

// General product y[n, m] = a[n, k] . op(b) + beta * y, with op(b) = b[k, m] or, when
// `b_transposed`, b[m, k]^T. Leading dimensions (row strides) are explicit so that slices of
// larger buffers can be used in place.
void gemm(bool b_transposed, int64_t n, int64_t m, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* y, int64_t ldy);

// Calls body(begin, end) over contiguous parts of [0, rows) on the machine's cores (the CPU
// backend's row pool; the caller takes a part) and returns when all are done. Inline for less
// than two parts of min_rows, and when called from inside another part. Work that gives each
// row the same bits whichever thread runs it stays batch-invariant.
void parallel_rows(int64_t rows, int64_t min_rows,
                   const std::function<void(int64_t, int64_t)>& body);

// x[n, d] <- x * rsqrt(mean(x^2) + eps) * weight, row by row, in place. `weight` may be empty
// (the unweighted RMSNorm of mHC and of the per-head query norm).
void rms_norm(float* x, int64_t n, int64_t d, std::span<const float> weight, float eps);

// Interleaved partial RoPE on the LAST 2 * cos.size() channels of one vector of `dim`
// channels: pairs (2i, 2i+1) of that slice rotate by the angle whose cos/sin are given.
// `inverse` rotates by the negative angle (the V4 attention output's de-rotation).
void rope_interleaved(float* x, int64_t dim, std::span<const float> cos, std::span<const float> sin,
                      bool inverse);

// In-place softmax of x[0..n). Entries equal to -inf get probability 0.
void softmax(float* x, int64_t n);

float silu(float x);
float sigmoid(float x);
float softplus(float x);  // log(1 + e^x), linear above 20 as torch does

// Dot product of two vectors of length n, accumulated in fp32 in order.
float dot(const float* a, const float* b, int64_t n);

// The first index of the largest of x[0..n) (n >= 1): std::max_element's answer, found with the
// CPU's vector instructions (argmax.cc).
int64_t argmax_row(const float* x, int64_t n);

}  // namespace dserve::kernels::cpu
