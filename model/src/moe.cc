// DeepSeek-V4 mixture of experts (MODEL-V4.md "One decoder layer", step 4; paper §2.1):
// a shared expert plus top-k routed experts. The router scores experts with sqrt(softplus)
// (or sigmoid / softmax), chooses them by score + e_score_correction_bias (or, on hash layers,
// from the frozen tid2eid table), weights them by the un-biased scores normalised over the
// chosen ones, times routed_scaling_factor. Experts are SwiGLU with the gate clamped above and
// the up projection clamped on both sides at swiglu_limit.

#include <algorithm>
#include <cmath>
#include <numeric>

#include "dserve/core/check.h"
#include "dserve/kernels/cpu_ops.h"
#include "layers.h"

namespace dserve::model::detail {
namespace cpu = kernels::cpu;

namespace {

// out[rows, hidden] += scale_r * expert(x[rows]) for the given rows of x.
void run_expert(const float* x, std::span<const int64_t> rows, std::span<const float> row_weights,
                const ExpertWeights& e, float limit, int64_t hidden, float* out) {
  const auto n = static_cast<int64_t>(rows.size());
  if (n == 0) return;
  const int64_t inter = e.w1.dim(0);
  std::vector<float> xs(static_cast<size_t>(n * hidden));
  for (int64_t i = 0; i < n; ++i) {
    std::copy(x + rows[static_cast<size_t>(i)] * hidden,
              x + (rows[static_cast<size_t>(i)] + 1) * hidden, xs.data() + i * hidden);
  }
  std::vector<float> gate(static_cast<size_t>(n * inter)), up(static_cast<size_t>(n * inter));
  cpu::matmul(xs.data(), n, hidden, e.w1, gate.data());
  cpu::matmul(xs.data(), n, hidden, e.w3, up.data());
  for (size_t i = 0; i < gate.size(); ++i) {
    gate[i] = cpu::silu(std::min(gate[i], limit)) * std::clamp(up[i], -limit, limit);
  }
  std::vector<float> y(static_cast<size_t>(n * hidden));
  cpu::matmul(gate.data(), n, inter, e.w2, y.data());
  for (int64_t i = 0; i < n; ++i) {
    float* dst = out + rows[static_cast<size_t>(i)] * hidden;
    const float wgt = row_weights[static_cast<size_t>(i)];
    for (int64_t d = 0; d < hidden; ++d)
      dst[d] += wgt * y[static_cast<size_t>(i * hidden + d)];
  }
}

void score_experts(float* logits, int64_t count, ScoringFunc func) {
  switch (func) {
    case ScoringFunc::kSqrtSoftplus:
      for (int64_t e = 0; e < count; ++e)
        logits[e] = std::sqrt(cpu::softplus(logits[e]));
      return;
    case ScoringFunc::kSigmoid:
      for (int64_t e = 0; e < count; ++e)
        logits[e] = cpu::sigmoid(logits[e]);
      return;
    case ScoringFunc::kSoftmax:
      cpu::softmax(logits, count);
      return;
  }
}

}  // namespace

void moe(const float* x, std::span<const int32_t> tokens, const ModelConfig& config,
         const MoeWeights& w, RoutingKind routing, float* out) {
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t hidden = config.hidden_size;
  const int64_t n_experts = config.n_routed_experts;
  const int64_t k = config.experts_per_token;
  const auto limit = static_cast<float>(config.swiglu_limit);

  std::vector<float> scores(static_cast<size_t>(n * n_experts));
  cpu::matmul(x, n, hidden, w.gate, scores.data());
  // Per expert: the rows routed to it and their weights.
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(n_experts));
  std::vector<std::vector<float>> row_weights(static_cast<size_t>(n_experts));
  std::vector<int64_t> order(static_cast<size_t>(n_experts));
  std::vector<float> biased(static_cast<size_t>(n_experts));
  std::vector<int64_t> chosen(static_cast<size_t>(k));
  for (int64_t t = 0; t < n; ++t) {
    float* s = scores.data() + t * n_experts;
    score_experts(s, n_experts, config.scoring_func);
    if (routing == RoutingKind::kHash) {
      const int32_t* ids =
          w.tid2eid.data() + static_cast<int64_t>(tokens[static_cast<size_t>(t)]) * k;
      for (int64_t i = 0; i < k; ++i)
        chosen[static_cast<size_t>(i)] = ids[i];
    } else {
      for (int64_t e = 0; e < n_experts; ++e) {
        biased[static_cast<size_t>(e)] = s[e] + (w.bias.empty() ? 0.0f : w.bias.data()[e]);
      }
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        const float ba = biased[static_cast<size_t>(a)], bb = biased[static_cast<size_t>(b)];
        return ba > bb || (ba == bb && a < b);
      });
      std::copy(order.begin(), order.begin() + k, chosen.begin());
    }
    float sum = 0.0f;
    for (int64_t e : chosen)
      sum += s[e];
    // V4 always normalises the chosen weights (the config refuses norm_topk_prob false).
    const float denominator = sum + 1e-20f;
    for (int64_t e : chosen) {
      DSERVE_CHECK_MSG(e >= 0 && e < n_experts, "routed expert id out of range");
      rows[static_cast<size_t>(e)].push_back(t);
      row_weights[static_cast<size_t>(e)].push_back(
          s[e] / denominator * static_cast<float>(config.routed_scaling_factor));
    }
  }

  std::fill(out, out + n * hidden, 0.0f);
  for (int64_t e = 0; e < n_experts; ++e) {
    run_expert(x, rows[static_cast<size_t>(e)], row_weights[static_cast<size_t>(e)],
               w.experts[static_cast<size_t>(e)], limit, hidden, out);
  }
  std::vector<int64_t> all_rows(static_cast<size_t>(n));
  std::iota(all_rows.begin(), all_rows.end(), 0);
  const std::vector<float> ones(static_cast<size_t>(n), 1.0f);
  run_expert(x, all_rows, ones, w.shared, limit, hidden, out);
}

}  // namespace dserve::model::detail
