#pragma once
// The per-token arithmetic of the V4 forward pass that the CUDA kernels run one thread per
// token (or per element): scalar activations, the mHC stream mix with Sinkhorn-Knopp, MoE
// routing, the clamped SwiGLU. Plain C++ that nvcc compiles for the device and g++ for the
// host, so that tests/model/gpu_math_test checks these bodies against the CPU reference
// (model/src) on every machine, GPU or not. Every function mirrors its CPU twin's operation
// order, so that results match to the last bit where the math library does.

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSERVE_HD __host__ __device__
#else
#define DSERVE_HD
#endif

namespace dserve::kernels::v4 {

// The largest hc_mult the per-token mix supports (V4 uses 4).
constexpr int kMaxHyperStreams = 8;
// The largest experts_per_token the per-token router supports (V4 uses 6).
constexpr int kMaxRoutedPerToken = 16;

DSERVE_HD inline float silu(float x) {
  return x / (1.0f + expf(-x));
}
DSERVE_HD inline float sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}
DSERVE_HD inline float softplus(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

// In-place softmax of x[0..n); -inf entries get 0 and an all -inf row becomes all zeros
// (cpu::softmax).
DSERVE_HD inline void softmax(float* x, int n) {
  float max_v = -INFINITY;
  for (int i = 0; i < n; ++i)
    max_v = fmaxf(max_v, x[i]);
  if (max_v == -INFINITY) {
    for (int i = 0; i < n; ++i)
      x[i] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    x[i] = expf(x[i] - max_v);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i)
    x[i] *= inv;
}

// The mHC mix of one token (MODEL-V4.md, "One decoder layer" step 1): from the (2 + hc) * hc
// mix logits `m`, the learned `base` and the three `scale`s (pre, post, comb), writes
// pre[hc] = sigmoid + eps, post[hc] = 2 sigmoid, and comb[hc * hc] (comb[j * hc + k]: stream
// j -> k), softmax by rows plus eps, then Sinkhorn-Knopp: a column normalisation and
// (iters - 1) rounds of rows then columns. hc <= kMaxHyperStreams.
DSERVE_HD inline void hyper_mix(const float* m, const float* base, const float* scale, int hc,
                                int iters, float eps, float* pre, float* post, float* comb) {
  for (int k = 0; k < hc; ++k) {
    pre[k] = sigmoid(m[k] * scale[0] + base[k]) + eps;
    post[k] = 2.0f * sigmoid(m[hc + k] * scale[1] + base[hc + k]);
  }
  for (int j = 0; j < hc; ++j) {
    float* row = comb + j * hc;
    for (int k = 0; k < hc; ++k)
      row[k] = m[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k];
    softmax(row, hc);
    for (int k = 0; k < hc; ++k)
      row[k] += eps;
  }
  const int rounds = iters < 1 ? 1 : iters;  // the first column normalisation always runs
  for (int it = 0; it < rounds; ++it) {
    if (it > 0) {
      for (int j = 0; j < hc; ++j) {
        float sum = 0.0f;
        for (int k = 0; k < hc; ++k)
          sum += comb[j * hc + k];
        for (int k = 0; k < hc; ++k)
          comb[j * hc + k] /= (sum + eps);
      }
    }
    for (int k = 0; k < hc; ++k) {
      float sum = 0.0f;
      for (int j = 0; j < hc; ++j)
        sum += comb[j * hc + k];
      for (int j = 0; j < hc; ++j)
        comb[j * hc + k] /= (sum + eps);
    }
  }
}

// The hc_head collapse weights of one token: pre[k] = sigmoid(m[k] * scale + base[k]) + eps.
DSERVE_HD inline void hyper_head_weights(const float* m, const float* base, float scale, int hc,
                                         float eps, float* pre) {
  for (int k = 0; k < hc; ++k)
    pre[k] = sigmoid(m[k] * scale + base[k]) + eps;
}

// Scoring functions of the router, in the order of model::ScoringFunc.
enum class Scoring : int { kSqrtSoftplus = 0, kSigmoid = 1, kSoftmax = 2 };

// Routes one token (MODEL-V4.md step 4). `scores` holds the router logits of the
// `experts` experts and is overwritten with their scores. The chosen experts are, on a hash
// layer (`hash_ids` not null), hash_ids[0..k); otherwise the k best by score + bias[e] (bias
// may be null), highest first, the lower id winning a tie. Writes their ids and weights
// (score / sum of the chosen scores * routed_scale), in the order chosen.
// k <= kMaxRoutedPerToken.
DSERVE_HD inline void route_token(float* scores, const float* bias, const int32_t* hash_ids,
                                  int experts, int k, Scoring scoring, float routed_scale,
                                  int32_t* ids, float* weights) {
  switch (scoring) {
    case Scoring::kSqrtSoftplus:
      for (int e = 0; e < experts; ++e)
        scores[e] = sqrtf(softplus(scores[e]));
      break;
    case Scoring::kSigmoid:
      for (int e = 0; e < experts; ++e)
        scores[e] = sigmoid(scores[e]);
      break;
    case Scoring::kSoftmax:
      softmax(scores, experts);
      break;
  }
  if (hash_ids != nullptr) {
    for (int i = 0; i < k; ++i)
      ids[i] = hash_ids[i];
  } else {
    // k passes, each taking the best expert not yet chosen: the order partial_sort gives.
    for (int i = 0; i < k; ++i) {
      int best = -1;
      float best_v = 0.0f;
      for (int e = 0; e < experts; ++e) {
        bool taken = false;
        for (int j = 0; j < i; ++j)
          taken = taken || ids[j] == e;
        if (taken) continue;
        const float v = scores[e] + (bias != nullptr ? bias[e] : 0.0f);
        if (best < 0 || v > best_v) {
          best = e;
          best_v = v;
        }
      }
      ids[i] = best;
    }
  }
  float sum = 0.0f;
  for (int i = 0; i < k; ++i)
    sum += scores[ids[i]];
  const float denominator = sum + 1e-20f;
  for (int i = 0; i < k; ++i)
    weights[i] = scores[ids[i]] / denominator * routed_scale;
}

// One element of the clamped SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit).
DSERVE_HD inline float swiglu(float gate, float up, float limit) {
  return silu(fminf(gate, limit)) * fmaxf(-limit, fminf(up, limit));
}

}  // namespace dserve::kernels::v4
