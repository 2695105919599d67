// mHC on the GPU: the per-token stream mix (v4::hyper_mix, one thread per token: hc_mult is 4,
// so the Sinkhorn iterations are a few hundred flops), the collapse of the streams into the
// sublayer input and their expansion back, one thread per (token, channel).

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"
#include "v4_math.h"

namespace dserve::kernels::cuda {

static_assert(v4_limits::kMaxHyperStreams == v4::kMaxHyperStreams,
              "cuda_model_ops.h and v4_math.h disagree");

Status hyper_mix(const float* logits, const float* base, const float* scale, int64_t n, int64_t hc,
                 int64_t sinkhorn_iters, float eps, float* pre, float* post, float* comb,
                 CudaStream stream) {
  DSERVE_CHECK(n >= 0 && hc >= 1 && hc <= v4::kMaxHyperStreams);
  const int ihc = static_cast<int>(hc);
  const int iters = static_cast<int>(sinkhorn_iters);
  const int64_t width = (2 + hc) * hc;
  return for_each_index(
      n,
      [=] __device__(int64_t t) {
        v4::hyper_mix(logits + t * width, base, scale, ihc, iters, eps, pre + t * ihc,
                      post + t * ihc, comb + t * ihc * ihc);
      },
      stream, "hyper_mix launch");
}

Status hyper_collapse(const float* streams, const float* pre, int64_t n, int64_t hc, int64_t hidden,
                      float* out, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && hc >= 1 && hidden >= 0);
  return for_each_index(
      n * hidden,
      [=] __device__(int64_t i) {
        const int64_t t = i / hidden;
        const int64_t d = i % hidden;
        const float* s = streams + t * hc * hidden + d;
        float acc = 0.0f;
        for (int64_t k = 0; k < hc; ++k)
          acc += pre[t * hc + k] * s[k * hidden];
        out[i] = acc;
      },
      stream, "hyper_collapse launch");
}

Status hyper_expand(float* streams, const float* out, const float* post, const float* comb,
                    int64_t n, int64_t hc, int64_t hidden, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && hc >= 1 && hc <= v4::kMaxHyperStreams && hidden >= 0);
  return for_each_index(
      n * hidden,
      [=] __device__(int64_t i) {
        const int64_t t = i / hidden;
        const int64_t d = i % hidden;
        float* s = streams + t * hc * hidden + d;
        const float* c = comb + t * hc * hc;
        float old[v4::kMaxHyperStreams];
        for (int64_t j = 0; j < hc; ++j)
          old[j] = s[j * hidden];
        const float o = out[i];
        for (int64_t k = 0; k < hc; ++k) {
          float acc = post[t * hc + k] * o;
          for (int64_t j = 0; j < hc; ++j)
            acc += c[j * hc + k] * old[j];
          s[k * hidden] = acc;
        }
      },
      stream, "hyper_expand launch");
}

Status hyper_head_weights(const float* logits, const float* base, const float* scale, int64_t n,
                          int64_t hc, float eps, float* pre, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && hc >= 1);
  const int ihc = static_cast<int>(hc);
  return for_each_index(
      n,
      [=] __device__(int64_t t) {
        v4::hyper_head_weights(logits + t * ihc, base, scale[0], ihc, eps, pre + t * ihc);
      },
      stream, "hyper_head_weights launch");
}

}  // namespace dserve::kernels::cuda
