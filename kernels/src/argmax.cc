// argmax_row (cpu_ops.h): the first index of the largest value, as std::max_element finds it,
// in two vector passes (the largest value, then where it first is) instead of one scalar pass
// with a dependent compare per element: a decode step takes it over every request's
// 129,280-wide logits row. Rows holding a NaN take std::max_element itself.

#include <immintrin.h>

#include <algorithm>

#include "dserve/core/check.h"
#include "dserve/kernels/cpu_ops.h"
#include "dserve/kernels/invariant_gemm.h"

namespace dserve::kernels::cpu {
namespace {

int64_t first_equal(const float* x, int64_t from, int64_t n, float value) {
  for (int64_t i = from; i < n; ++i) {
    if (x[i] == value) return i;
  }
  return -1;
}

int64_t scalar_argmax(const float* x, int64_t n) {
  return std::max_element(x, x + n) - x;
}

__attribute__((target("avx512f"))) int64_t argmax_avx512(const float* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  const int64_t whole = n / kLanes * kLanes;
  __m512 best = _mm512_set1_ps(x[0]);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < whole; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_mask_max_ps(best, 0xffff, best, v);  // GCC 12: _mm512_max_ps warns
  }
  // Lanes through memory: GCC 12's _mm512_reduce_max_ps trips its uninitialized warnings.
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, best);
  float m = lanes[0];
  for (const float v : lanes)
    m = std::max(m, v);
  for (int64_t i = whole; i < n; ++i) {
    if (x[i] != x[i]) nan = 1;
    m = std::max(m, x[i]);
  }
  if (nan != 0) return scalar_argmax(x, n);
  const __m512 target = _mm512_set1_ps(m);
  for (int64_t i = 0; i < whole; i += kLanes) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (hit != 0) return i + __builtin_ctz(hit);
  }
  return first_equal(x, whole, n, m);
}

__attribute__((target("avx2"))) int64_t argmax_avx2(const float* x, int64_t n) {
  constexpr int64_t kLanes = 8;
  const int64_t whole = n / kLanes * kLanes;
  __m256 best = _mm256_set1_ps(x[0]);
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < whole; i += kLanes) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, best);
  float m = lanes[0];
  for (const float v : lanes)
    m = std::max(m, v);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = whole; i < n; ++i) {
    any_nan = any_nan || x[i] != x[i];
    m = std::max(m, x[i]);
  }
  if (any_nan) return scalar_argmax(x, n);
  const __m256 target = _mm256_set1_ps(m);
  for (int64_t i = 0; i < whole; i += kLanes) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hit != 0) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  return first_equal(x, whole, n, m);
}

}  // namespace

int64_t argmax_row(const float* x, int64_t n) {
  DSERVE_CHECK(n >= 1);
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return argmax_avx512(x, n);
    case CpuIsa::kAvx2:
      return argmax_avx2(x, n);
    case CpuIsa::kPortable:
      break;
  }
  return scalar_argmax(x, n);
}

}  // namespace dserve::kernels::cpu
