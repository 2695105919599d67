// Manifold-constrained hyper-connections (mHC): the residual is hc_mult parallel streams,
// collapsed into one sublayer input and expanded back, with a doubly-stochastic stream mix
// obtained by Sinkhorn-Knopp normalisation (MODEL-V4.md, "One decoder layer" 1 and 3).

#include <cmath>

#include "dserve/kernels/cpu_ops.h"
#include "layers.h"

namespace dserve::model::detail {
namespace cpu = kernels::cpu;

namespace {
// Unweighted RMSNorm of the flattened streams, then the mixing projection.
std::vector<float> stream_mix_logits(const float* streams, int64_t n, int64_t width,
                                     const Tensor& fn, float eps) {
  std::vector<float> flat(streams, streams + n * width);
  cpu::rms_norm(flat.data(), n, width, {}, eps);
  std::vector<float> mix(static_cast<size_t>(n * fn.dim(0)));
  cpu::matmul(flat.data(), n, width, fn, mix.data());
  return mix;
}
}  // namespace

HyperMix hyper_connection_in(const float* streams, int64_t n, const ModelConfig& config,
                             const HyperConnectionWeights& w) {
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  const auto eps = static_cast<float>(config.hc_eps);
  const int64_t mix_width = (2 + hc) * hc;
  std::vector<float> mix =
      stream_mix_logits(streams, n, hc * hidden, w.fn, static_cast<float>(config.rms_norm_eps));
  const float* base = w.base.data();
  const float pre_scale = w.scale.data()[0];
  const float post_scale = w.scale.data()[1];
  const float comb_scale = w.scale.data()[2];

  HyperMix out;
  out.post.resize(static_cast<size_t>(n * hc));
  out.comb.resize(static_cast<size_t>(n * hc * hc));
  out.collapsed.assign(static_cast<size_t>(n * hidden), 0.0f);
  std::vector<float> pre(static_cast<size_t>(hc));
  for (int64_t t = 0; t < n; ++t) {
    const float* m = mix.data() + t * mix_width;
    for (int64_t k = 0; k < hc; ++k) {
      pre[static_cast<size_t>(k)] = cpu::sigmoid(m[k] * pre_scale + base[k]) + eps;
      out.post[static_cast<size_t>(t * hc + k)] =
          2.0f * cpu::sigmoid(m[hc + k] * post_scale + base[hc + k]);
    }
    // comb: softmax by rows, then Sinkhorn-Knopp: one column normalisation, then
    // (iters - 1) rounds of row and column normalisation.
    float* comb = out.comb.data() + t * hc * hc;
    for (int64_t j = 0; j < hc; ++j) {
      float* row = comb + j * hc;
      for (int64_t k = 0; k < hc; ++k)
        row[k] = m[2 * hc + j * hc + k] * comb_scale + base[2 * hc + j * hc + k];
      cpu::softmax(row, hc);
      for (int64_t k = 0; k < hc; ++k)
        row[k] += eps;
    }
    auto normalise_columns = [&] {
      for (int64_t k = 0; k < hc; ++k) {
        float sum = 0.0f;
        for (int64_t j = 0; j < hc; ++j)
          sum += comb[j * hc + k];
        for (int64_t j = 0; j < hc; ++j)
          comb[j * hc + k] /= (sum + eps);
      }
    };
    auto normalise_rows = [&] {
      for (int64_t j = 0; j < hc; ++j) {
        float sum = 0.0f;
        for (int64_t k = 0; k < hc; ++k)
          sum += comb[j * hc + k];
        for (int64_t k = 0; k < hc; ++k)
          comb[j * hc + k] /= (sum + eps);
      }
    };
    normalise_columns();
    for (int64_t it = 1; it < config.hc_sinkhorn_iters; ++it) {
      normalise_rows();
      normalise_columns();
    }
    float* collapsed = out.collapsed.data() + t * hidden;
    const float* s = streams + t * hc * hidden;
    for (int64_t k = 0; k < hc; ++k) {
      const float p = pre[static_cast<size_t>(k)];
      for (int64_t d = 0; d < hidden; ++d)
        collapsed[d] += p * s[k * hidden + d];
    }
  }
  return out;
}

void hyper_connection_out(float* streams, const float* out, const HyperMix& mix, int64_t n,
                          const ModelConfig& config) {
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  std::vector<float> mixed(static_cast<size_t>(hc * hidden));
  for (int64_t t = 0; t < n; ++t) {
    float* s = streams + t * hc * hidden;
    const float* comb = mix.comb.data() + t * hc * hc;
    const float* post = mix.post.data() + t * hc;
    const float* o = out + t * hidden;
    for (int64_t k = 0; k < hc; ++k) {
      float* dst = mixed.data() + k * hidden;
      for (int64_t d = 0; d < hidden; ++d)
        dst[d] = post[k] * o[d];
      for (int64_t j = 0; j < hc; ++j) {
        const float c = comb[j * hc + k];
        for (int64_t d = 0; d < hidden; ++d)
          dst[d] += c * s[j * hidden + d];
      }
    }
    std::copy(mixed.begin(), mixed.end(), s);
  }
}

void hyper_head(const float* streams, int64_t n, const ModelConfig& config,
                const HyperHeadWeights& w, float* out) {
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  std::vector<float> mix =
      stream_mix_logits(streams, n, hc * hidden, w.fn, static_cast<float>(config.rms_norm_eps));
  const float scale = w.scale.data()[0];
  for (int64_t t = 0; t < n; ++t) {
    float* o = out + t * hidden;
    std::fill(o, o + hidden, 0.0f);
    const float* s = streams + t * hc * hidden;
    for (int64_t k = 0; k < hc; ++k) {
      const float pre =
          cpu::sigmoid(mix[static_cast<size_t>(t * hc + k)] * scale + w.base.data()[k]) +
          static_cast<float>(config.hc_eps);
      for (int64_t d = 0; d < hidden; ++d)
        o[d] += pre * s[k * hidden + d];
    }
  }
}

}  // namespace dserve::model::detail
