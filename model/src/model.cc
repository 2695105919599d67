// Model::forward: embedding -> hc_mult residual streams -> decoder layers (mHC around
// attention and MoE) -> hc_head collapse -> final RMSNorm -> lm_head (MODEL-V4.md).

#include "dserve/model/model.h"

#include <string>

#include "dserve/kernels/cpu_ops.h"
#include "layers.h"

namespace dserve::model {
namespace cpu = kernels::cpu;

namespace detail {

RopeTables rope_tables(const ModelConfig& c) {
  std::optional<kernels::YarnParams> yarn;
  if (c.compress_yarn) {
    yarn =
        kernels::YarnParams{c.compress_yarn->factor,
                            static_cast<double>(c.compress_yarn->original_max_position_embeddings),
                            c.compress_yarn->beta_fast, c.compress_yarn->beta_slow};
  }
  return RopeTables{kernels::RopeTable(c.rope_head_dim, c.rope_theta, std::nullopt),
                    kernels::RopeTable(c.rope_head_dim, c.compress_rope_theta, yarn)};
}

Status check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return out_of_range("token id " + std::to_string(tokens[i]) + " at index " +
                          std::to_string(i) + " is outside the vocabulary [0, " +
                          std::to_string(vocab_size) + ")");
    }
  }
  return Status::ok();
}

}  // namespace detail

struct Model::Tables {
  detail::RopeTables rope;
};

Model::Model(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      pools_(KvPagePools::create(config_)) {
  DSERVE_CHECK_MSG(static_cast<int64_t>(weights_.layers.size()) == config_.num_layers,
                   "weights and config disagree on the number of layers");
  tables_ = std::make_unique<Tables>(Tables{detail::rope_tables(config_)});
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Result<Tensor> Model::forward(std::span<const int32_t> tokens, RequestState& state, LogitsFor which,
                              const ForwardObserver& observe) const {
  const auto n = static_cast<int64_t>(tokens.size());
  if (n == 0) return invalid_argument("forward: the chunk has no tokens");
  DSERVE_RETURN_IF_ERROR(detail::check_token_ids(tokens, config_.vocab_size));
  DSERVE_CHECK_MSG(static_cast<int64_t>(state.layers().size()) == config_.num_layers,
                   "the request state was made for another model");
  const int64_t hidden = config_.hidden_size;
  const int64_t hc = config_.hc_mult;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  const int64_t first_pos = state.position();

  // The residual: the token embedding copied into hc_mult streams, [n, hc, hidden].
  std::vector<float> streams(static_cast<size_t>(n * hc * hidden));
  for (int64_t t = 0; t < n; ++t) {
    const float* e = weights_.embed.row(tokens[static_cast<size_t>(t)]);
    for (int64_t k = 0; k < hc; ++k)
      std::copy(e, e + hidden, streams.data() + (t * hc + k) * hidden);
  }
  if (observe) {
    std::vector<float> embed(static_cast<size_t>(n * hidden));
    for (int64_t t = 0; t < n; ++t)
      std::copy_n(streams.data() + t * hc * hidden, hidden, embed.data() + t * hidden);
    observe({"embed", {n, hidden}, embed});
  }

  std::vector<float> sublayer_out(static_cast<size_t>(n * hidden));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerWeights& lw = weights_.layers[static_cast<size_t>(l)];
    LayerState& ls = state.layers()[static_cast<size_t>(l)];

    detail::HyperMix mix = detail::hyper_connection_in(streams.data(), n, config_, lw.hc_attn);
    cpu::rms_norm(mix.collapsed.data(), n, hidden, lw.attn_norm.span(), eps);
    detail::attention(mix.collapsed.data(), n, first_pos, config_, lw.attn, tables_->rope, ls,
                      sublayer_out.data());
    detail::hyper_connection_out(streams.data(), sublayer_out.data(), mix, n, config_);

    mix = detail::hyper_connection_in(streams.data(), n, config_, lw.hc_ffn);
    cpu::rms_norm(mix.collapsed.data(), n, hidden, lw.ffn_norm.span(), eps);
    detail::moe(mix.collapsed.data(), tokens, config_, lw.moe,
                config_.mlp_types[static_cast<size_t>(l)], sublayer_out.data());
    detail::hyper_connection_out(streams.data(), sublayer_out.data(), mix, n, config_);
    if (observe) observe({"layer" + std::to_string(l), {n, hc, hidden}, streams});
  }
  state.advance(n);

  const int64_t first_out = which == LogitsFor::kLastToken ? n - 1 : 0;
  const int64_t n_out = n - first_out;
  std::vector<float> final_hidden(static_cast<size_t>(n_out * hidden));
  detail::hyper_head(streams.data() + first_out * hc * hidden, n_out, config_, weights_.hc_head,
                     final_hidden.data());
  if (observe) observe({"hc_head", {n_out, hidden}, final_hidden});
  cpu::rms_norm(final_hidden.data(), n_out, hidden, weights_.norm.span(), eps);
  if (observe) observe({"final_norm", {n_out, hidden}, final_hidden});
  Tensor logits({n_out, config_.vocab_size});
  cpu::matmul(final_hidden.data(), n_out, hidden, weights_.head, logits.data());
  return logits;
}

}  // namespace dserve::model
