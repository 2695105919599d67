// The batch-invariant product: every row's bits are the same computed alone, among other rows,
// at any place in the batch, in any order of rows; every instruction set the machine has obeys
// the rule; results are close to a double-precision product.

#include "dserve/kernels/invariant_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace dserve::kernels::cpu {
namespace {

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v)
    f = dist(rng);
  return v;
}

std::vector<CpuIsa> available_isas() {
  std::vector<CpuIsa> isas = {CpuIsa::kPortable};
  if (cpu_isa() == CpuIsa::kAvx2 || cpu_isa() == CpuIsa::kAvx512) isas.push_back(CpuIsa::kAvx2);
  if (cpu_isa() == CpuIsa::kAvx512) isas.push_back(CpuIsa::kAvx512);
  return isas;
}

bool same_bits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

// Widths around every edge: below one vector, the tail of a vector, exactly a K block, one past
// it, several blocks with a tail; column counts that leave partial tiles.
TEST(InvariantGemm, EveryRowHasTheSameBitsAloneAndInAnyBatch) {
  for (CpuIsa isa : available_isas()) {
    for (const int64_t k : {int64_t{1}, int64_t{7}, int64_t{16}, int64_t{100}, int64_t{512},
                            int64_t{513}, int64_t{1500}}) {
      const int64_t m = 37;  // partial tiles for 4, 6 and 3 columns per tile
      const int64_t n = 70;  // panels of 64 rows and partial row tiles
      const auto x = random_floats(static_cast<size_t>(n * k), 1);
      const auto w = random_floats(static_cast<size_t>(m * k), 2);
      std::vector<float> all(static_cast<size_t>(n * m));
      invariant_matmul_with(isa, x.data(), n, k, w.data(), m, all.data(), m);
      // Alone, and as the last of a batch of 3 with its row in the middle.
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> one(static_cast<size_t>(m));
        invariant_matmul_with(isa, x.data() + i * k, 1, k, w.data(), m, one.data(), m);
        ASSERT_TRUE(same_bits(one.data(), all.data() + i * m, m))
            << cpu_isa_name(isa) << " k " << k << " row " << i;
      }
      // Rows in reverse order, into a wider output (ldy > m).
      std::vector<float> reversed_x(x.size());
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(reversed_x.data() + (n - 1 - i) * k, x.data() + i * k,
                    static_cast<size_t>(k) * sizeof(float));
      const int64_t ldy = m + 5;
      std::vector<float> reversed(static_cast<size_t>(n * ldy), -1.0f);
      invariant_matmul_with(isa, reversed_x.data(), n, k, w.data(), m, reversed.data(), ldy);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(same_bits(reversed.data() + (n - 1 - i) * ldy, all.data() + i * m, m))
            << cpu_isa_name(isa) << " k " << k << " row " << i << " reversed";
        EXPECT_EQ(reversed[static_cast<size_t>((n - 1 - i) * ldy + m)], -1.0f);  // untouched
      }
    }
  }
}

// Columns: an output column computed among others equals it computed with a weight of one row
// (the split across threads and tiles is by column).
TEST(InvariantGemm, EveryColumnHasTheSameBitsWhateverTheOtherColumns) {
  for (CpuIsa isa : available_isas()) {
    const int64_t n = 9, k = 777, m = 1000;  // enough work to run on several threads
    const auto x = random_floats(static_cast<size_t>(n * k), 3);
    const auto w = random_floats(static_cast<size_t>(m * k), 4);
    std::vector<float> all(static_cast<size_t>(n * m));
    invariant_matmul_with(isa, x.data(), n, k, w.data(), m, all.data(), m);
    for (const int64_t j : {int64_t{0}, int64_t{5}, int64_t{6}, int64_t{511}, int64_t{999}}) {
      std::vector<float> col(static_cast<size_t>(n));
      invariant_matmul_with(isa, x.data(), n, k, w.data() + j * k, 1, col.data(), 1);
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_TRUE(
            same_bits(&col[static_cast<size_t>(i)], &all[static_cast<size_t>(i * m + j)], 1))
            << cpu_isa_name(isa) << " column " << j << " row " << i;
      }
    }
  }
}

// The rule, written out for one element in plain C++ for each lane count, matches the kernels
// bit for bit (the FMA of the vector paths is std::fma here).
float rule(const float* x, const float* w, int64_t k, int lanes, bool fused) {
  float y = 0.0f;
  for (int64_t kb = 0; kb < k; kb += kInvariantKBlock) {
    const int64_t kc = std::min(kInvariantKBlock, k - kb);
    std::vector<float> acc(static_cast<size_t>(lanes), 0.0f);
    for (int64_t kk = 0; kk < kc; ++kk) {
      float& a = acc[static_cast<size_t>(kk % lanes)];
      a = fused ? std::fma(x[kb + kk], w[kb + kk], a) : a + x[kb + kk] * w[kb + kk];
    }
    for (int half = lanes / 2; half >= 1; half /= 2) {
      for (int l = 0; l < half; ++l)
        acc[static_cast<size_t>(l)] += acc[static_cast<size_t>(l + half)];
    }
    y = kb == 0 ? acc[0] : y + acc[0];
  }
  return y;
}

TEST(InvariantGemm, KernelsFollowTheDocumentedRule) {
  for (CpuIsa isa : available_isas()) {
    const int lanes = isa == CpuIsa::kAvx512 ? 16 : 8;
    const bool fused = isa != CpuIsa::kPortable;
    for (const int64_t k : {int64_t{5}, int64_t{33}, int64_t{512}, int64_t{1029}}) {
      const int64_t n = 5, m = 7;
      const auto x = random_floats(static_cast<size_t>(n * k), 5);
      const auto w = random_floats(static_cast<size_t>(m * k), 6);
      std::vector<float> y(static_cast<size_t>(n * m));
      invariant_matmul_with(isa, x.data(), n, k, w.data(), m, y.data(), m);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          const float want = rule(x.data() + i * k, w.data() + j * k, k, lanes, fused);
          EXPECT_TRUE(same_bits(&want, &y[static_cast<size_t>(i * m + j)], 1))
              << cpu_isa_name(isa) << " k " << k << " (" << i << ", " << j << "): " << want
              << " vs " << y[static_cast<size_t>(i * m + j)];
        }
      }
    }
  }
}

TEST(InvariantGemm, CloseToADoubleProduct) {
  const int64_t n = 3, k = 4096, m = 64;
  const auto x = random_floats(static_cast<size_t>(n * k), 7);
  const auto w = random_floats(static_cast<size_t>(m * k), 8);
  std::vector<float> y(static_cast<size_t>(n * m));
  invariant_matmul(x.data(), n, k, w.data(), m, y.data(), m);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      double exact = 0, magnitude = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        exact += double{x[static_cast<size_t>(i * k + kk)]} * w[static_cast<size_t>(j * k + kk)];
        magnitude += std::abs(double{x[static_cast<size_t>(i * k + kk)]} *
                              w[static_cast<size_t>(j * k + kk)]);
      }
      EXPECT_NEAR(y[static_cast<size_t>(i * m + j)], exact, 1e-5 * magnitude);
    }
  }
}

TEST(InvariantGemm, EmptyShapes) {
  std::vector<float> y(6, 5.0f);
  invariant_matmul(nullptr, 2, 0, nullptr, 3, y.data(), 3);  // k = 0: zeros
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  invariant_matmul(nullptr, 0, 4, nullptr, 3, y.data(), 3);  // nothing to do
  EXPECT_FALSE(cpu_isa_name(cpu_isa()).empty());
}

// Attention's weighted sum of values: every element is the scalar rule (from zero, in key
// order, fused multiply-adds, then beta * y), bit for bit, whether its row runs alone or among
// others, for widths around every vector edge; strided inputs are read in place.
TEST(WeightedRowSum, EveryElementFollowsTheRuleAloneAndInABatch) {
  for (const int64_t m :
       {int64_t{1}, int64_t{15}, int64_t{17}, int64_t{64}, int64_t{100}, int64_t{130}}) {
    for (const float beta : {0.0f, 1.0f, 0.5f}) {
      const int64_t n = 9, k = 37, lda = k + 3, ldb = m + 5, ldy = m + 2;
      const auto a = random_floats(static_cast<size_t>(n * lda), 11);
      const auto b = random_floats(static_cast<size_t>(k * ldb), 12);
      const auto y0 = random_floats(static_cast<size_t>(n * ldy), 13);
      std::vector<float> batch = y0;
      weighted_row_sum(a.data(), lda, n, k, b.data(), ldb, m, beta, batch.data(), ldy);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> alone(y0.begin() + i * ldy, y0.begin() + (i + 1) * ldy);
        weighted_row_sum(a.data() + i * lda, lda, 1, k, b.data(), ldb, m, beta, alone.data(), ldy);
        EXPECT_TRUE(same_bits(alone.data(), batch.data() + i * ldy, m))
            << "m " << m << " row " << i;
        for (int64_t j = 0; j < m; ++j) {
          float acc = 0.0f;
          for (int64_t kk = 0; kk < k; ++kk)
            acc = std::fma(a[static_cast<size_t>(i * lda + kk)],
                           b[static_cast<size_t>(kk * ldb + j)], acc);
          const float want = beta == 0.0f ? acc : beta * y0[static_cast<size_t>(i * ldy + j)] + acc;
          EXPECT_TRUE(same_bits(&want, &batch[static_cast<size_t>(i * ldy + j)], 1))
              << "m " << m << " beta " << beta << " (" << i << ", " << j << ")";
        }
        // the padding past m is not written
        EXPECT_TRUE(same_bits(batch.data() + i * ldy + m, y0.data() + i * ldy + m, ldy - m));
      }
    }
  }
}

}  // namespace
}  // namespace dserve::kernels::cpu
