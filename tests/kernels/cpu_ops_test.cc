// The CPU reference backend against values computed by hand: it is the oracle every other
// backend is tested against (backend_parity_test), so it is checked first, on its own.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "dserve/kernels/cpu_ops.h"
#include "dserve/kernels/device.h"
#include "dserve/kernels/rope.h"

namespace dserve::kernels {
namespace {

// The vector argmax answers what std::max_element answers: the first of equal largest values
// (+0 and -0 are equal), at every length around the vector widths, and on rows with a NaN.
TEST(CpuOps, ArgmaxRowIsTheFirstLargestAsMaxElement) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> value(-8.0f, 8.0f);
  std::uniform_int_distribution<int> small(-3, 3);
  for (const int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 129280}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x)
        v = trial % 2 == 0 ? value(rng) : static_cast<float>(small(rng));  // odd: many ties
      if (trial == 4) std::fill(x.begin(), x.end(), -0.0f);
      if (trial == 5 && n > 3) x[2] = 0.0f, x[1] = -0.0f, std::fill(x.begin() + 3, x.end(), -1.0f);
      if (trial == 6) x[static_cast<size_t>(n / 2)] = std::numeric_limits<float>::quiet_NaN();
      if (trial == 7) x[static_cast<size_t>(n - 1)] = std::numeric_limits<float>::infinity();
      const int64_t want = std::max_element(x.begin(), x.end()) - x.begin();
      EXPECT_EQ(cpu::argmax_row(x.data(), n), want) << "n " << n << " trial " << trial;
    }
  }
}

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(CpuRmsNorm, UnweightedKnownVector) {
  // mean(x^2) = (1 + 4 + 9 + 16) / 4 = 7.5, so every entry is divided by sqrt(7.5).
  std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f};
  cpu::rms_norm(x.data(), 1, 4, {}, 0.0f);
  const float s = std::sqrt(7.5f);
  EXPECT_FLOAT_EQ(x[0], 1.0f / s);
  EXPECT_FLOAT_EQ(x[1], 2.0f / s);
  EXPECT_FLOAT_EQ(x[2], 3.0f / s);
  EXPECT_FLOAT_EQ(x[3], 4.0f / s);
}

TEST(CpuRmsNorm, WeightedRowsAreIndependentAndEpsCounts) {
  // Row 0: mean(x^2) = (9 + 16) / 2 = 12.5, plus eps 0.5 = 13. Row 1 is all zeros: stays 0.
  std::vector<float> x = {3.0f, -4.0f, 0.0f, 0.0f};
  const std::vector<float> weight = {2.0f, 0.5f};
  cpu::rms_norm(x.data(), 2, 2, weight, 0.5f);
  const float s = std::sqrt(13.0f);
  EXPECT_FLOAT_EQ(x[0], 2.0f * 3.0f / s);
  EXPECT_FLOAT_EQ(x[1], 0.5f * -4.0f / s);
  EXPECT_EQ(x[2], 0.0f);
  EXPECT_EQ(x[3], 0.0f);
}

TEST(CpuRope, NinetyDegreesRotatesOnlyTheLastChannels) {
  // dim 6 with 2 rope pairs: channels 0-1 are left alone; each pair (a, b) becomes (-b, a).
  std::vector<float> x = {7.0f, 8.0f, 1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<float> cos = {0.0f, 0.0f};
  const std::vector<float> sin = {1.0f, 1.0f};
  cpu::rope_interleaved(x.data(), 6, cos, sin, /*inverse=*/false);
  EXPECT_EQ(x, (std::vector<float>{7.0f, 8.0f, -2.0f, 1.0f, -4.0f, 3.0f}));
  cpu::rope_interleaved(x.data(), 6, cos, sin, /*inverse=*/true);
  EXPECT_EQ(x, (std::vector<float>{7.0f, 8.0f, 1.0f, 2.0f, 3.0f, 4.0f}));
}

TEST(CpuRope, InverseUndoesRope) {
  // V4's query head: 512 channels, the last 64 rotate; a position far from zero.
  const RopeTable table(64, 10000.0, std::nullopt);
  std::vector<float> cos(32), sin(32);
  table.angles(12345, cos.data(), sin.data());
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(512);
  for (float& v : x)
    v = dist(rng);
  const std::vector<float> original = x;
  cpu::rope_interleaved(x.data(), 512, cos, sin, false);
  EXPECT_NE(x, original);
  cpu::rope_interleaved(x.data(), 512, cos, sin, true);
  for (size_t i = 0; i < x.size(); ++i)
    EXPECT_NEAR(x[i], original[i], 1e-6f) << "channel " << i;
}

TEST(CpuSoftmax, MaskedEntriesGetZero) {
  std::vector<float> x = {0.0f, -kInf, 0.0f, -kInf};
  cpu::softmax(x.data(), 4);
  EXPECT_EQ(x, (std::vector<float>{0.5f, 0.0f, 0.5f, 0.0f}));

  // e^0 : e^ln3 = 1 : 3.
  std::vector<float> y = {0.0f, std::log(3.0f), -kInf};
  cpu::softmax(y.data(), 3);
  EXPECT_FLOAT_EQ(y[0], 0.25f);
  EXPECT_FLOAT_EQ(y[1], 0.75f);
  EXPECT_EQ(y[2], 0.0f);
}

TEST(CpuSoftmax, AllMaskedRowIsZeroAndLargeValuesAreStable) {
  std::vector<float> masked = {-kInf, -kInf, -kInf};
  cpu::softmax(masked.data(), 3);
  EXPECT_EQ(masked, (std::vector<float>{0.0f, 0.0f, 0.0f}));

  std::vector<float> large = {1000.0f, 1000.0f};  // exp(1000) overflows without the max shift
  cpu::softmax(large.data(), 2);
  EXPECT_EQ(large, (std::vector<float>{0.5f, 0.5f}));
}

// y[n, m] = x[n, k] . w[m, k]^T, accumulated in double in index order.
std::vector<double> naive_matmul(const std::vector<float>& x, int64_t n, int64_t k,
                                 const std::vector<float>& w, int64_t m) {
  std::vector<double> y(static_cast<size_t>(n * m), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < m; ++c) {
      double s = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        s += static_cast<double>(x[static_cast<size_t>(r * k + i)]) *
             static_cast<double>(w[static_cast<size_t>(c * k + i)]);
      }
      y[static_cast<size_t>(r * m + c)] = s;
    }
  }
  return y;
}

TEST(CpuMatmul, MatchesNaiveLoop) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  // n = 1 takes the GEMV path, the others GEMM; odd sizes on purpose.
  for (const int64_t n : {int64_t{1}, int64_t{5}}) {
    const int64_t k = 33;
    const int64_t m = 17;
    std::vector<float> x(static_cast<size_t>(n * k));
    std::vector<float> wv(static_cast<size_t>(m * k));
    for (float& v : x)
      v = dist(rng);
    for (float& v : wv)
      v = dist(rng);
    const Tensor w({m, k}, wv);
    std::vector<float> y(static_cast<size_t>(n * m), kInf);
    cpu::matmul(x.data(), n, k, w, y.data());
    const std::vector<double> expected = naive_matmul(x, n, k, wv, m);
    for (size_t i = 0; i < y.size(); ++i) {
      EXPECT_NEAR(y[i], expected[i], 1e-5) << "n " << n << ", element " << i;
    }
  }
}

TEST(CpuMatmul, RowBlockWritesOnlyItsColumns) {
  // Rows 2..4 of a 6-row weight into columns 0..2 of a 5-wide output.
  const int64_t n = 3, k = 4, m = 3, stride = 5;
  std::vector<float> x(static_cast<size_t>(n * k));
  std::vector<float> w(static_cast<size_t>(6 * k));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = static_cast<float>(i % 5) - 2.0f;
  for (size_t i = 0; i < w.size(); ++i)
    w[i] = static_cast<float>(i % 7) * 0.5f - 1.0f;
  std::vector<float> y(static_cast<size_t>(n * stride), -7.0f);
  cpu::matmul_rows(x.data(), n, k, w.data() + 2 * k, m, y.data(), stride);
  const std::vector<float> block(w.begin() + 2 * k, w.begin() + 5 * k);
  const std::vector<double> expected = naive_matmul(x, n, k, block, m);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < stride; ++c) {
      const float got = y[static_cast<size_t>(r * stride + c)];
      if (c < m) {
        EXPECT_NEAR(got, expected[static_cast<size_t>(r * m + c)], 1e-5);
      } else {
        EXPECT_EQ(got, -7.0f) << "column " << c << " is outside the block";
      }
    }
  }
}

TEST(RopeTable, PlainTableIsThetaPowers) {
  const RopeTable table(64, 10000.0, std::nullopt);
  ASSERT_EQ(table.inv_freq().size(), 32u);
  EXPECT_FLOAT_EQ(table.inv_freq()[0], 1.0f);
  EXPECT_FLOAT_EQ(table.inv_freq()[16], 0.01f);  // 10000^(-32/64)
  std::vector<float> cos(32), sin(32);
  table.angles(0, cos.data(), sin.data());
  EXPECT_EQ(cos[5], 1.0f);
  EXPECT_EQ(sin[5], 0.0f);
}

TEST(RopeTable, YarnWithFactorOneIsThePlainTable) {
  const RopeTable plain(64, 160000.0, std::nullopt);
  const RopeTable yarn(64, 160000.0, YarnParams{1.0, 65536.0, 32.0, 1.0});
  for (size_t i = 0; i < plain.inv_freq().size(); ++i) {
    EXPECT_FLOAT_EQ(yarn.inv_freq()[i], plain.inv_freq()[i]) << "pair " << i;
  }
}

TEST(RopeTable, YarnFactor16KeepsFastPairsAndSlowsSlowOnes) {
  // V4's compress rope: theta 160000, 64 channels, factor 16 over 65536 original positions,
  // beta_fast 32, beta_slow 1. YaRN's correction range (arXiv 2309.00071 eq. 17):
  //   d(r) = 64 * ln(65536 / (2 pi r)) / (2 ln 160000);  d(32) = 15.45 -> 15, d(1) = 24.7 -> 25.
  // Pairs 0..15 keep their frequency, pairs 25..31 are divided by 16, the ramp lies between.
  const RopeTable plain(64, 160000.0, std::nullopt);
  const RopeTable yarn(64, 160000.0, YarnParams{16.0, 65536.0, 32.0, 1.0});
  const std::vector<float>& p = plain.inv_freq();
  const std::vector<float>& y = yarn.inv_freq();
  for (size_t i = 0; i <= 15; ++i)
    EXPECT_FLOAT_EQ(y[i], p[i]) << "pair " << i;
  for (size_t i = 25; i < 32; ++i)
    EXPECT_FLOAT_EQ(y[i], p[i] / 16.0f) << "pair " << i;
  for (size_t i = 16; i < 25; ++i) {
    EXPECT_LT(y[i], p[i]) << "pair " << i;
    EXPECT_GT(y[i], p[i] / 16.0f) << "pair " << i;
  }
}

TEST(Device, ProbeNeverCrashesAndExplainsAbsence) {
  const DeviceInfo info = probe_cuda_device();
  if (info.available) {
    EXPECT_TRUE(cuda_backend_built());
    EXPECT_FALSE(info.name.empty());
    EXPECT_GT(info.compute_major, 0);
    EXPECT_GT(info.memory_bytes, 0u);
    EXPECT_TRUE(info.why_unavailable.empty());
  } else {
    EXPECT_FALSE(info.why_unavailable.empty());
    if (!cuda_backend_built()) {
      EXPECT_EQ(info.why_unavailable, "built without the CUDA backend");
    }
  }
  // Asking twice gives the same answer (a failed runtime call leaves nothing behind).
  const DeviceInfo again = probe_cuda_device();
  EXPECT_EQ(again.available, info.available);
  EXPECT_EQ(again.why_unavailable, info.why_unavailable);
}

}  // namespace
}  // namespace dserve::kernels
