// The per-token bodies the CUDA kernels run (kernels/cuda/v4_math.h) against the CPU reference
// (model/src), compiled for the host so that this runs on every machine: the mHC mix with
// Sinkhorn-Knopp against hyper_connection_in, routing and the clamped SwiGLU against moe()
// (through the layer's output, on hash and top-k layers and every scoring function), and the
// small softmax against cpu::softmax. A GPU adds nothing to these checks; the launch geometry
// around them is covered by gpu_forward_test where a GPU is present.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/kernels/cpu_ops.h"
#include "dserve/kvstore/row_format.h"
#include "dserve/model/model_init.h"
#include "layers.h"
#include "v4_math.h"

namespace dserve::model {
namespace {

namespace v4 = kernels::v4;

// Uniform in [-1, 1).
float symmetric(SplitMix64& rng) {
  return static_cast<float>(rng.uniform() * 2.0 - 1.0);
}

// A tensor of values uniform in [-scale, scale).
Tensor random_tensor(std::vector<int64_t> shape, SplitMix64& rng, float scale) {
  Tensor t(std::move(shape));
  for (float& v : t.span())
    v = symmetric(rng) * scale;
  return t;
}

ModelConfig tiny_config() {
  auto config = preset_config("tiny");
  EXPECT_TRUE(config.is_ok()) << config.status().to_string();
  return *config;
}

TEST(GpuMath, SoftmaxMatchesCpuBitForBit) {
  SplitMix64 rng(3);
  for (int n : {1, 4, 8, 33}) {
    std::vector<float> a(static_cast<size_t>(n));
    for (float& v : a)
      v = symmetric(rng) * 4.0f;
    if (n > 2) a[1] = -std::numeric_limits<float>::infinity();
    std::vector<float> b = a;
    kernels::cpu::softmax(a.data(), n);
    v4::softmax(b.data(), n);
    for (int i = 0; i < n; ++i)
      EXPECT_EQ(a[static_cast<size_t>(i)], b[static_cast<size_t>(i)]) << "n " << n << " i " << i;
  }
  std::vector<float> all_masked(4, -std::numeric_limits<float>::infinity());
  v4::softmax(all_masked.data(), 4);
  for (float v : all_masked)
    EXPECT_EQ(v, 0.0f);
}

// hyper_mix + the collapse over the streams give hyper_connection_in's post, comb and
// collapsed input exactly (same operations in the same order).
TEST(GpuMath, HyperMixMatchesHyperConnectionIn) {
  ModelConfig config = tiny_config();
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  const int64_t n = 5;
  const int64_t mix_width = (2 + hc) * hc;
  for (const int64_t iters : {int64_t{1}, int64_t{2}, config.hc_sinkhorn_iters}) {
    config.hc_sinkhorn_iters = iters;
    SplitMix64 rng(11 + static_cast<uint64_t>(iters));
    HyperConnectionWeights w;
    w.fn = random_tensor({mix_width, hc * hidden}, rng, 0.05f);
    w.base = random_tensor({mix_width}, rng, 0.5f);
    w.scale = random_tensor({3}, rng, 0.7f);
    const Tensor streams = random_tensor({n, hc, hidden}, rng, 1.0f);
    const detail::HyperMix cpu = detail::hyper_connection_in(streams.data(), n, config, w);

    // The mix logits as hyper_connection.cc makes them (the GPU makes them with rms_norm_to
    // and a linear; those are checked op by op in backend_parity_test).
    std::vector<float> flat(streams.span().begin(), streams.span().end());
    kernels::cpu::rms_norm(flat.data(), n, hc * hidden, {},
                           static_cast<float>(config.rms_norm_eps));
    std::vector<float> logits(static_cast<size_t>(n * mix_width));
    kernels::cpu::matmul(flat.data(), n, hc * hidden, w.fn, logits.data());
    for (int64_t t = 0; t < n; ++t) {
      std::vector<float> pre(static_cast<size_t>(hc)), post(static_cast<size_t>(hc)),
          comb(static_cast<size_t>(hc * hc));
      v4::hyper_mix(logits.data() + t * mix_width, w.base.data(), w.scale.data(),
                    static_cast<int>(hc), static_cast<int>(iters),
                    static_cast<float>(config.hc_eps), pre.data(), post.data(), comb.data());
      for (int64_t k = 0; k < hc; ++k) {
        EXPECT_EQ(post[static_cast<size_t>(k)], cpu.post[static_cast<size_t>(t * hc + k)])
            << "iters " << iters << " token " << t << " stream " << k;
      }
      for (int64_t i = 0; i < hc * hc; ++i) {
        EXPECT_EQ(comb[static_cast<size_t>(i)], cpu.comb[static_cast<size_t>(t * hc * hc + i)])
            << "iters " << iters << " token " << t << " comb entry " << i;
      }
      // The collapse as hyper_collapse computes it.
      for (int64_t d = 0; d < hidden; ++d) {
        float acc = 0.0f;
        for (int64_t k = 0; k < hc; ++k)
          acc += pre[static_cast<size_t>(k)] * streams.data()[(t * hc + k) * hidden + d];
        ASSERT_EQ(acc, cpu.collapsed[static_cast<size_t>(t * hidden + d)])
            << "iters " << iters << " token " << t << " channel " << d;
      }
    }
  }
}

struct MoeCase {
  RoutingKind routing;
  ScoringFunc scoring;
  bool bias;
};

// moe() of the CPU reference against the GPU's recipe built from the same bodies: routing by
// v4::route_token, experts as gate/up GEMMs with v4::swiglu, contributions added in expert id
// order, then the shared expert (gpu_model.cc's moe()). Any difference in the chosen experts,
// their weights or the activation shows in the output.
TEST(GpuMath, RoutingAndSwigluReproduceMoe) {
  ModelConfig config = tiny_config();
  config.hidden_size = 24;
  config.n_routed_experts = 12;
  config.experts_per_token = 3;
  config.moe_intermediate_size = 16;
  config.swiglu_limit = 1.5;  // low, so that the clamps bite
  const int64_t hidden = config.hidden_size;
  const int64_t experts = config.n_routed_experts;
  const int64_t k = config.experts_per_token;
  const int64_t inter = config.moe_intermediate_size;
  const int64_t vocab = 50;
  const int64_t n = 9;
  for (const MoeCase c : {MoeCase{RoutingKind::kTopK, ScoringFunc::kSqrtSoftplus, true},
                          MoeCase{RoutingKind::kTopK, ScoringFunc::kSigmoid, false},
                          MoeCase{RoutingKind::kTopK, ScoringFunc::kSoftmax, true},
                          MoeCase{RoutingKind::kHash, ScoringFunc::kSqrtSoftplus, false}}) {
    config.scoring_func = c.scoring;
    SplitMix64 rng(100 + static_cast<uint64_t>(c.scoring) * 7 +
                   (c.routing == RoutingKind::kHash ? 1 : 0));
    MoeWeights w;
    w.gate = random_tensor({experts, hidden}, rng, 0.5f);
    if (c.bias) w.bias = random_tensor({experts}, rng, 0.3f);
    if (c.routing == RoutingKind::kHash) {
      for (int64_t i = 0; i < vocab * k; ++i)
        w.tid2eid.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(experts))));
    }
    auto expert = [&](int64_t width) {
      ExpertWeights e;
      e.w1 = random_tensor({width, hidden}, rng, 0.6f);
      e.w2 = random_tensor({hidden, width}, rng, 0.3f);
      e.w3 = random_tensor({width, hidden}, rng, 0.6f);
      return e;
    };
    for (int64_t e = 0; e < experts; ++e)
      w.experts.push_back(expert(inter));
    w.shared = expert(inter);
    const Tensor x = random_tensor({n, hidden}, rng, 1.0f);
    std::vector<int32_t> tokens;
    for (int64_t t = 0; t < n; ++t)
      tokens.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));

    std::vector<float> cpu_out(static_cast<size_t>(n * hidden));
    detail::moe(x.data(), tokens, config, w, c.routing, cpu_out.data());

    const auto limit = static_cast<float>(config.swiglu_limit);
    auto run_expert = [&](const ExpertWeights& e, const float* row, std::vector<float>& y) {
      const int64_t width = e.w1.dim(0);
      std::vector<float> gate(static_cast<size_t>(width)), up(static_cast<size_t>(width));
      kernels::cpu::matmul(row, 1, hidden, e.w1, gate.data());
      kernels::cpu::matmul(row, 1, hidden, e.w3, up.data());
      for (size_t i = 0; i < gate.size(); ++i)
        gate[i] = v4::swiglu(gate[i], up[i], limit);
      y.assign(static_cast<size_t>(hidden), 0.0f);
      kernels::cpu::matmul(gate.data(), 1, width, e.w2, y.data());
    };
    std::vector<float> scores(static_cast<size_t>(n * experts));
    kernels::cpu::matmul(x.data(), n, hidden, w.gate, scores.data());
    for (int64_t t = 0; t < n; ++t) {
      std::vector<int32_t> ids(static_cast<size_t>(k));
      std::vector<float> weights(static_cast<size_t>(k));
      const int32_t* hash = c.routing == RoutingKind::kHash
                                ? w.tid2eid.data() + static_cast<int64_t>(tokens[t]) * k
                                : nullptr;
      v4::route_token(scores.data() + t * experts, w.bias.empty() ? nullptr : w.bias.data(), hash,
                      static_cast<int>(experts), static_cast<int>(k),
                      static_cast<v4::Scoring>(static_cast<int>(c.scoring)),
                      static_cast<float>(config.routed_scaling_factor), ids.data(), weights.data());
      std::vector<int64_t> order(static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i)
        order[static_cast<size_t>(i)] = i;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return ids[static_cast<size_t>(a)] < ids[static_cast<size_t>(b)];
      });
      std::vector<float> out(static_cast<size_t>(hidden), 0.0f);
      std::vector<float> y;
      for (int64_t i : order) {
        run_expert(w.experts[static_cast<size_t>(ids[static_cast<size_t>(i)])],
                   x.data() + t * hidden, y);
        for (int64_t d = 0; d < hidden; ++d)
          out[static_cast<size_t>(d)] +=
              weights[static_cast<size_t>(i)] * y[static_cast<size_t>(d)];
      }
      run_expert(w.shared, x.data() + t * hidden, y);
      for (int64_t d = 0; d < hidden; ++d) {
        const float expected = cpu_out[static_cast<size_t>(t * hidden + d)];
        const float got = out[static_cast<size_t>(d)] + y[static_cast<size_t>(d)];
        ASSERT_NEAR(got, expected, 1e-5f * std::max(1.0f, std::abs(expected)))
            << "scoring " << static_cast<int>(c.scoring) << " hash "
            << (c.routing == RoutingKind::kHash) << " token " << t << " channel " << d;
      }
    }
  }
}

// The top-k tie rule: equal biased scores go to the lower expert id, as moe.cc's partial_sort.
TEST(GpuMath, RouteTokenBreaksTiesByLowerId) {
  std::vector<float> logits = {0.5f, 2.0f, 2.0f, 1.0f, 2.0f, -1.0f};
  std::vector<int32_t> ids(3);
  std::vector<float> weights(3);
  v4::route_token(logits.data(), nullptr, nullptr, 6, 3, v4::Scoring::kSigmoid, 1.0f, ids.data(),
                  weights.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 4}));
  EXPECT_FLOAT_EQ(weights[0] + weights[1] + weights[2], 1.0f);
}

// The KV rounding the GPU applies where it writes (fp8 entries, fp4 keys and queries) is what
// kvstore's encode then decode gives, bit for bit, over magnitudes from subnormal to huge.
TEST(GpuMath, KvRoundingMatchesTheRowFormats) {
  SplitMix64 rng(41);
  auto row_of = [&](int width) {
    std::vector<float> row(static_cast<size_t>(width));
    for (int i = 0; i < width; ++i) {
      const int octave = static_cast<int>(rng.below(40)) - 30;  // 2^-30 .. 2^9
      row[static_cast<size_t>(i)] = symmetric(rng) * std::ldexp(1.0f, octave);
    }
    if (rng.below(4) == 0) row[rng.below(static_cast<uint64_t>(width))] = -0.0f;
    if (rng.below(4) == 0) std::fill(row.begin(), row.begin() + width / 2, 0.0f);
    return row;
  };
  for (auto [width, rope] : {std::pair{512, 64}, std::pair{128, 32}, std::pair{64, 16}}) {
    const auto format = kvstore::RowFormat::entry(kvstore::KvDtype::kFp8, width, rope);
    for (int r = 0; r < 200; ++r) {
      auto want = row_of(width);
      auto got = want;
      kvstore::round_trip_rows(format, want.data(), 1);
      v4::round_fp8_entry(got.data(), width, rope);
      ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
          << "fp8 entry of " << width << " channels, row " << r;
    }
  }
  for (int width : {32, 64, 128}) {
    const auto format = kvstore::RowFormat::index_key(kvstore::KvDtype::kFp8, width);
    for (int r = 0; r < 200; ++r) {
      auto want = row_of(width);
      auto got = want;
      kvstore::round_trip_rows(format, want.data(), 1);
      v4::round_fp4_key(got.data(), width);
      ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
          << "fp4 key of " << width << " channels, row " << r;
    }
  }
}

}  // namespace
}  // namespace dserve::model
