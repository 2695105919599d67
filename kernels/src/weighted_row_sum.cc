// weighted_row_sum (invariant_gemm.h): per output row, the rows of b weighted by that row of a,
// accumulated in order with fused multiply-adds, 64 columns held in registers at a time.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dserve/core/check.h"
#include "dserve/kernels/invariant_gemm.h"
#include "row_pool.h"

namespace dserve::kernels::cpu {
namespace {

// acc[j] = sum over kk of a[kk] * b[kk * ldb + j], j < m.
void row_portable(const float* a, int64_t k, const float* b, int64_t ldb, int64_t m, float* acc) {
  std::fill(acc, acc + m, 0.0f);
  for (int64_t kk = 0; kk < k; ++kk) {
    const float w = a[kk];
    const float* row = b + kk * ldb;
    for (int64_t j = 0; j < m; ++j)
      acc[j] = std::fma(w, row[j], acc[j]);
  }
}

__attribute__((target("avx2,fma"))) void row_avx2(const float* a, int64_t k, const float* b,
                                                  int64_t ldb, int64_t m, float* acc) {
  int64_t j = 0;
  for (; j + 32 <= m; j += 32) {
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
    for (int64_t kk = 0; kk < k; ++kk) {
      const __m256 w = _mm256_set1_ps(a[kk]);
      const float* row = b + kk * ldb + j;
#pragma GCC unroll 4
      for (int64_t v = 0; v < 4; ++v)
        s[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * v), s[v]);
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < 4; ++v)
      _mm256_storeu_ps(acc + j + 8 * v, s[v]);
  }
  if (j < m) row_portable(a, k, b + j, ldb, m - j, acc + j);  // the same fused operations
}

__attribute__((target("avx512f"))) void row_avx512(const float* a, int64_t k, const float* b,
                                                   int64_t ldb, int64_t m, float* acc) {
  for (int64_t j = 0; j < m; j += 64) {
    const int64_t cols = std::min<int64_t>(64, m - j);
    __mmask16 mask[4];
#pragma GCC unroll 4
    for (int64_t v = 0; v < 4; ++v) {
      const int64_t left = std::clamp<int64_t>(cols - 16 * v, 0, 16);
      mask[v] = static_cast<__mmask16>((1u << left) - 1u);
    }
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    for (int64_t kk = 0; kk < k; ++kk) {
      const __m512 w = _mm512_set1_ps(a[kk]);
      const float* row = b + kk * ldb + j;
#pragma GCC unroll 4
      for (int64_t v = 0; v < 4; ++v)
        s[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask[v], row + 16 * v), s[v]);
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < 4; ++v)
      _mm512_mask_storeu_ps(acc + j + 16 * v, mask[v], s[v]);
  }
}

}  // namespace

void weighted_row_sum(const float* a, int64_t lda, int64_t n, int64_t k, const float* b,
                      int64_t ldb, int64_t m, float beta, float* y, int64_t ldy) {
  DSERVE_CHECK_MSG(n >= 0 && k >= 0 && m >= 0 && lda >= k && ldb >= m && ldy >= m,
                   "weighted_row_sum: bad shape");
  if (n == 0 || m == 0) return;
  const auto row = cpu_isa() == CpuIsa::kAvx512 ? row_avx512
                   : cpu_isa() == CpuIsa::kAvx2 ? row_avx2
                                                : row_portable;
  const int64_t min_rows =
      std::max<int64_t>(1, detail::kMinMacsPerPart / std::max<int64_t>(1, k * m));
  detail::for_each_row_part(n, min_rows, [&](int64_t begin, int64_t end) {
    // beta 0 writes the sums straight into y; otherwise they go through a buffer of the thread's
    // that outlives the call (attention runs this per query and layer).
    thread_local std::vector<float> sums;
    if (beta != 0.0f) sums.resize(static_cast<size_t>(m));
    for (int64_t i = begin; i < end; ++i) {
      float* out = y + i * ldy;
      if (beta == 0.0f) {
        row(a + i * lda, k, b, ldb, m, out);
        continue;
      }
      row(a + i * lda, k, b, ldb, m, sums.data());
      for (int64_t j = 0; j < m; ++j)
        out[j] = beta * out[j] + sums[static_cast<size_t>(j)];
    }
  });
}

}  // namespace dserve::kernels::cpu
