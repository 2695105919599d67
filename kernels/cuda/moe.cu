// MoE pieces that are not GEMMs: routing (v4::route_token, one thread per token), gathering the
// rows routed to each expert, the clamped SwiGLU, and the weighted combine of the experts'
// outputs with the shared expert's, in a fixed order per token.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"
#include "v4_math.h"

namespace dserve::kernels::cuda {

static_assert(v4_limits::kMaxRoutedPerToken == v4::kMaxRoutedPerToken,
              "cuda_model_ops.h and v4_math.h disagree");

Status route_tokens(float* logits, const float* bias, const int32_t* tid2eid, const int32_t* tokens,
                    int64_t n, int64_t experts, int64_t k, int scoring, float routed_scale,
                    int32_t* ids, float* weights, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && experts >= 1 && k >= 1 && k <= v4::kMaxRoutedPerToken && k <= experts);
  DSERVE_CHECK(scoring >= 0 && scoring <= 2);
  DSERVE_CHECK_MSG((tid2eid == nullptr) == (tokens == nullptr),
                   "hash routing needs both tid2eid and the tokens");
  const int ie = static_cast<int>(experts);
  const int ik = static_cast<int>(k);
  const auto how = static_cast<v4::Scoring>(scoring);
  return for_each_index(
      n,
      [=] __device__(int64_t t) {
        const int32_t* hash =
            tid2eid != nullptr ? tid2eid + static_cast<int64_t>(tokens[t]) * ik : nullptr;
        v4::route_token(logits + t * ie, bias, hash, ie, ik, how, routed_scale, ids + t * ik,
                        weights + t * ik);
      },
      stream, "route_tokens launch");
}

Status swiglu(const float* gate_up, int64_t rows, int64_t inter, float limit, float* out,
              CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && inter >= 0);
  return for_each_index(
      rows * inter,
      [=] __device__(int64_t i) {
        const int64_t r = i / inter;
        const int64_t c = i % inter;
        const float* row = gate_up + r * 2 * inter;
        out[i] = v4::swiglu(row[c], row[inter + c], limit);
      },
      stream, "swiglu launch");
}

Status gather_token_rows(const float* x, const int32_t* rows, int64_t count, int64_t hidden,
                         float* xs, CudaStream stream) {
  DSERVE_CHECK(count >= 0 && hidden >= 0);
  return for_each_index(
      count * hidden,
      [=] __device__(int64_t i) {
        xs[i] = x[static_cast<int64_t>(rows[i / hidden]) * hidden + i % hidden];
      },
      stream, "gather_token_rows launch");
}

Status moe_combine(const float* ys, const int32_t* slots, const float* weights, const float* shared,
                   int64_t n, int64_t k, int64_t hidden, float* out, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && k >= 0 && hidden >= 0);
  return for_each_index(
      n * hidden,
      [=] __device__(int64_t i) {
        const int64_t t = i / hidden;
        const int64_t d = i % hidden;
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          acc += weights[t * k + j] * ys[static_cast<int64_t>(slots[t * k + j]) * hidden + d];
        }
        out[i] = acc + shared[i];
      },
      stream, "moe_combine launch");
}

}  // namespace dserve::kernels::cuda
