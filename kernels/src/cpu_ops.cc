#include "dserve/kernels/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dserve/core/check.h"
#include "dserve/kernels/invariant_gemm.h"
#include "row_pool.h"

namespace dserve::kernels::cpu {

void matmul(const float* x, int64_t n, int64_t k, const Tensor& w, float* y) {
  DSERVE_CHECK_MSG(
      w.rank() == 2 && w.dim(1) == k,
      "matmul: weight " + w.shape_string() + " does not take inputs of width " + std::to_string(k));
  matmul_rows(x, n, k, w.data(), w.dim(0), y, w.dim(0));
}

void matmul_rows(const float* x, int64_t n, int64_t k, const float* w, int64_t m, float* y,
                 int64_t y_stride) {
  DSERVE_CHECK_MSG(n <= INT32_MAX && m <= INT32_MAX && k <= INT32_MAX && y_stride <= INT32_MAX,
                   "matmul sizes exceed the BLAS integer range");
  // Never a BLAS GEMM: its results depend on the number of rows and on a row's place among
  // them (its kernels block and split differently), so a token's output would depend on which
  // other tokens shared the call. The batch-invariant product (invariant_gemm.h) gives a
  // token the same bits alone, in any chunk, or in any batch, the property every serving
  // path's equality with the plain forward rests on, and reads each weight once for all rows.
  // It handles the empty shapes (k = 0: zeros) itself.
  invariant_matmul(x, n, k, w, m, y, y_stride);
}

void gemm(bool b_transposed, int64_t n, int64_t m, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* y, int64_t ldy) {
  if (n == 0 || m == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j)
        y[i * ldy + j] = beta == 0.0f ? 0.0f : beta * y[i * ldy + j];
    }
    return;
  }
  // Neither is left to a BLAS: its kernels (and, for OpenBLAS, its guess of the core type)
  // change a row's bits with the call's shape, and run on one core here.
  if (!b_transposed) {  // y_i = B^T a_i, B [k, m]: rows of B weighted by a_i
    weighted_row_sum(a, lda, n, k, b, ldb, m, beta, y, ldy);
    return;
  }
  // y_i = B a_i, B [m, k]: the batch-invariant product
  if (beta == 0.0f) {
    invariant_matmul_with(cpu_isa(), a, n, k, b, m, y, ldy, lda, ldb);
    return;
  }
  std::vector<float> product(static_cast<size_t>(n * m));
  invariant_matmul_with(cpu_isa(), a, n, k, b, m, product.data(), m, lda, ldb);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j)
      y[i * ldy + j] = beta * y[i * ldy + j] + product[static_cast<size_t>(i * m + j)];
  }
}

void parallel_rows(int64_t rows, int64_t min_rows,
                   const std::function<void(int64_t, int64_t)>& body) {
  detail::for_each_row_part(rows, min_rows, body);
}

void rms_norm(float* x, int64_t n, int64_t d, std::span<const float> weight, float eps) {
  DSERVE_CHECK(weight.empty() || static_cast<int64_t>(weight.size()) == d);
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * d;
    // The mean square is accumulated in double: rows are up to hc_mult * hidden (16384) wide,
    // and the reference's blocked fp32 reduction is closer to the exact sum than a serial one.
    double sum_sq = 0.0;
    for (int64_t i = 0; i < d; ++i)
      sum_sq += static_cast<double>(row[i]) * static_cast<double>(row[i]);
    const float mean_sq = static_cast<float>(sum_sq / static_cast<double>(d));
    const float inv = 1.0f / std::sqrt(mean_sq + eps);
    if (weight.empty()) {
      for (int64_t i = 0; i < d; ++i)
        row[i] *= inv;
    } else {
      for (int64_t i = 0; i < d; ++i)
        row[i] = weight[static_cast<size_t>(i)] * (row[i] * inv);
    }
  }
}

void rope_interleaved(float* x, int64_t dim, std::span<const float> cos, std::span<const float> sin,
                      bool inverse) {
  const int64_t half = static_cast<int64_t>(cos.size());
  DSERVE_CHECK(2 * half <= dim && sin.size() == cos.size());
  float* rope = x + (dim - 2 * half);
  for (int64_t i = 0; i < half; ++i) {
    const float c = cos[static_cast<size_t>(i)];
    const float s = inverse ? -sin[static_cast<size_t>(i)] : sin[static_cast<size_t>(i)];
    const float a = rope[2 * i];
    const float b = rope[2 * i + 1];
    rope[2 * i] = a * c - b * s;
    rope[2 * i + 1] = b * c + a * s;
  }
}

void softmax(float* x, int64_t n) {
  float max_v = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i)
    max_v = std::max(max_v, x[i]);
  if (max_v == -std::numeric_limits<float>::infinity()) {
    std::fill(x, x + n, 0.0f);
    return;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max_v);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i)
    x[i] *= inv;
}

float silu(float x) {
  return x / (1.0f + std::exp(-x));
}
float sigmoid(float x) {
  return 1.0f / (1.0f + std::exp(-x));
}
float softplus(float x) {
  return x > 20.0f ? x : std::log1p(std::exp(x));
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    s += a[i] * b[i];
  return s;
}

}  // namespace dserve::kernels::cpu
