#pragma once
// The per-token arithmetic of the V4 forward pass that the CUDA kernels run one thread per
// token (or per element): scalar activations, the mHC stream mix with Sinkhorn-Knopp, MoE
// routing, the clamped SwiGLU. Plain C++ that nvcc compiles for the device and g++ for the
// host, so that tests/model/gpu_math_test checks these bodies against the CPU reference
// (model/src) on every machine, GPU or not. Every function mirrors its CPU twin's operation
// order, so that results match to the last bit where the math library does.

#include <cmath>
#include <cstdint>
#include <cstring>

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

// ---- fp8 KV (kvstore/row_format.h): what a value becomes once stored and read back ----------
// The same arithmetic as kvstore's encode then decode, bit for bit (tests/model/gpu_math_test
// checks it): the GPU keeps fp32 pages holding these values, the host encodes them.

DSERVE_HD inline bool sign_bit(float x) {
  uint32_t u = 0;
  memcpy(&u, &x, 4);
  return (u >> 31) != 0;
}
DSERVE_HD inline bool is_finite(float x) {
  return x - x == 0.0f;  // inf - inf and NaN - NaN are NaN
}

// e4m3fn, round to nearest even, saturating at +-448; NaN stays NaN.
DSERVE_HD inline float round_e4m3(float x) {
  if (x != x) return x;
  const float a = fabsf(x);
  float r;
  if (a >= 448.0f) {
    r = 448.0f;
  } else if (a < 0x1.0p-6f) {
    r = rintf(a * 512.0f) * 0x1.0p-9f;  // subnormal steps of 2^-9; rint: ties to even
  } else {
    int e = 0;
    frexpf(a, &e);                           // a = m * 2^e, m in [0.5, 1)
    const float step = ldexpf(1.0f, e - 4);  // 3 mantissa bits below the leading one
    r = rintf(a / step) * step;
  }
  return sign_bit(x) ? -r : r;
}

// bf16, round to nearest even (NaN stays NaN).
DSERVE_HD inline float round_bf16(float x) {
  if (x != x) return x;
  uint32_t u = 0;
  memcpy(&u, &x, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float r = 0.0f;
  memcpy(&r, &u, 4);
  return r;
}

// e2m1 (0, 0.5, 1, 1.5, 2, 3, 4, 6), nearest with ties to the even code, saturating; NaN -> 0.
DSERVE_HD inline float round_e2m1(float x) {
  if (x != x) return 0.0f;
  const float a = fabsf(x);
  const float r = a <= 0.25f   ? 0.0f
                  : a < 0.75f  ? 0.5f
                  : a <= 1.25f ? 1.0f
                  : a < 1.75f  ? 1.5f
                  : a <= 2.5f  ? 2.0f
                  : a < 3.5f   ? 3.0f
                  : a <= 5.0f  ? 4.0f
                               : 6.0f;
  return sign_bit(x) ? -r : r;
}

// The e8m0 scale of a block whose largest finite |x| is `amax`: the power of two at or above
// max(amax, 1e-4) / top, its exponent clamped to [-127, 127].
DSERVE_HD inline float e8m0_scale(float amax, float top) {
  const float s = fmaxf(amax, 1e-4f) / top;
  int e = 0;
  const float m = frexpf(s, &e);
  if (m == 0.5f) e -= 1;
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  return ldexpf(1.0f, e);
}

DSERVE_HD inline float finite_amax(const float* x, int n) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (is_finite(x[i])) amax = fmaxf(amax, fabsf(x[i]));
  }
  return amax;
}

// One compressed entry or window row in place: the first width - rope channels through e4m3
// with one scale per 64, the last rope channels through bf16.
DSERVE_HD inline void round_fp8_entry(float* row, int width, int rope) {
  const int nope = width - rope;
  for (int first = 0; first < nope; first += 64) {
    const int n = nope - first < 64 ? nope - first : 64;
    const float scale = e8m0_scale(finite_amax(row + first, n), 448.0f);
    const float inverse = 1.0f / scale;  // a power of two: exact
    for (int i = first; i < first + n; ++i)
      row[i] = round_e4m3(row[i] * inverse) * scale;
  }
  for (int i = nope; i < width; ++i)
    row[i] = round_bf16(row[i]);
}

// One indexer key or query in place: rotated by the normalised Walsh-Hadamard transform (width
// a power of two), then through e2m1 with one scale per 32. The result is in the rotated basis.
DSERVE_HD inline void round_fp4_key(float* row, int width) {
  for (int h = 1; h < width; h *= 2) {
    for (int i = 0; i < width; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = row[j];
        const float b = row[j + h];
        row[j] = a + b;
        row[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / sqrtf(static_cast<float>(width));
  for (int i = 0; i < width; ++i)
    row[i] *= norm;
  for (int first = 0; first < width; first += 32) {
    const float scale = e8m0_scale(finite_amax(row + first, 32), 6.0f);
    const float inverse = 1.0f / scale;
    for (int i = first; i < first + 32; ++i)
      row[i] = round_e2m1(row[i] * inverse) * scale;
  }
}

}  // namespace dserve::kernels::v4
