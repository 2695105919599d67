#include "dserve/kernels/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dserve/core/check.h"
#include "dserve/kernels/invariant_gemm.h"

namespace dserve::kernels::cpu {
namespace {
// The cores are used by the products' own row and column splits (row_pool.h); OpenBLAS's own
// threads would only compete with them (measured: 2.2x slower prefill on 2 cores), so the BLAS
// that remains (gemm below) runs single-threaded.
void use_single_threaded_blas() {
  static const bool once = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}
}  // namespace

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
  // Row by row, as matmul_rows and for the same reason.
  use_single_threaded_blas();
  for (int64_t i = 0; i < n; ++i) {
    if (b_transposed) {  // y_i = B a_i, B [m, k]
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(m), static_cast<int>(k), 1.0f, b,
                  static_cast<int>(ldb), a + i * lda, 1, beta, y + i * ldy, 1);
    } else {  // y_i = B^T a_i, B [k, m]
      cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<int>(k), static_cast<int>(m), 1.0f, b,
                  static_cast<int>(ldb), a + i * lda, 1, beta, y + i * ldy, 1);
    }
  }
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
