#pragma once
// The CPU's ops of the layer sequence (layer_sequence.h) over the rows of one step: the main
// model's layers (Model::run_step, model.cc), or the MTP block's one layer over its rows
// (Model::mtp_step, mtp.cc). Internal to the model module.

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include "dserve/kernels/cpu_ops.h"
#include "dserve/model/model.h"
#include "layer_sequence.h"
#include "layers.h"

namespace dserve::model {

struct Model::Tables {
  detail::RopeTables rope;
};

struct Model::CpuStepOps {
  const Model& model;
  std::span<const StepRequest> requests;
  const std::vector<int64_t>& first_row;
  const std::vector<int64_t>& first_pos;
  const std::vector<int32_t>& tokens;  // every row's token, in step order (hash routing)
  const ForwardObserver& observe;
  std::vector<float>& streams;  // the residual, [n, hc, hidden]
  // The MTP block instead of the main layers: its one layer over the requests' MtpStates, its
  // rows' input the main model's hidden states [n, hidden] with the tokens.
  const MtpWeights* mtp = nullptr;
  const float* mtp_hidden = nullptr;
  detail::HyperMix mix{};
  detail::AttentionRows rows{};
  std::vector<float> sublayer_out{};

  const ModelConfig& config() const { return model.config_; }
  int64_t n() const { return static_cast<int64_t>(tokens.size()); }
  const LayerWeights& layer(int64_t l) const {
    return mtp != nullptr ? mtp->layer : model.weights_.layers[static_cast<size_t>(l)];
  }
  LayerState& layer_state(size_t request, int64_t l) const {
    RequestState& state = *requests[request].state;
    return mtp != nullptr ? state.mtp().layer : state.layers()[static_cast<size_t>(l)];
  }
  RoutingKind routing(int64_t l) const {
    return mtp != nullptr ? RoutingKind::kTopK : config().mlp_types[static_cast<size_t>(l)];
  }

  Status embed() {
    const int64_t hidden = config().hidden_size, hc = config().hc_mult;
    if (mtp != nullptr) return embed_mtp();
    for (int64_t t = 0; t < n(); ++t) {
      const float* e = model.weights_.embed.row(tokens[static_cast<size_t>(t)]);
      for (int64_t k = 0; k < hc; ++k)
        std::copy(e, e + hidden, streams.data() + (t * hc + k) * hidden);
    }
    if (observe) {
      std::vector<float> embed(static_cast<size_t>(n() * hidden));
      for (int64_t t = 0; t < n(); ++t)
        std::copy_n(streams.data() + t * hc * hidden, hidden, embed.data() + t * hidden);
      observe({"embed", {n(), hidden}, embed});
    }
    sublayer_out.assign(static_cast<size_t>(n() * hidden), 0.0f);
    return Status::ok();
  }
  // The MTP block's input (MODEL-V4.md): e_proj(enorm(embed(token))) + h_proj(hnorm(h)), copied
  // to the hc_mult streams.
  Status embed_mtp() {
    namespace cpu = kernels::cpu;
    const int64_t hidden = config().hidden_size, hc = config().hc_mult;
    const auto eps = static_cast<float>(config().rms_norm_eps);
    const auto size = static_cast<size_t>(n() * hidden);
    std::vector<float> e(size), h(mtp_hidden, mtp_hidden + size), x(size), y(size);
    for (int64_t t = 0; t < n(); ++t) {
      const float* row = model.weights_.embed.row(tokens[static_cast<size_t>(t)]);
      std::copy(row, row + hidden, e.data() + t * hidden);
    }
    cpu::rms_norm(e.data(), n(), hidden, mtp->enorm.span(), eps);
    cpu::rms_norm(h.data(), n(), hidden, mtp->hnorm.span(), eps);
    cpu::matmul(e.data(), n(), hidden, mtp->e_proj, x.data());
    cpu::matmul(h.data(), n(), hidden, mtp->h_proj, y.data());
    for (int64_t t = 0; t < n(); ++t) {
      for (int64_t c = 0; c < hidden; ++c)
        x[static_cast<size_t>(t * hidden + c)] += y[static_cast<size_t>(t * hidden + c)];
      for (int64_t k = 0; k < hc; ++k)
        std::copy_n(x.data() + t * hidden, hidden, streams.data() + (t * hc + k) * hidden);
    }
    sublayer_out.assign(size, 0.0f);
    return Status::ok();
  }
  Status mix_in(int64_t l, detail::Sublayer sublayer) {
    const LayerWeights& lw = layer(l);
    const bool attn = sublayer == detail::Sublayer::kAttention;
    mix = detail::hyper_connection_in(streams.data(), n(), config(), attn ? lw.hc_attn : lw.hc_ffn);
    kernels::cpu::rms_norm(mix.collapsed.data(), n(), config().hidden_size,
                           (attn ? lw.attn_norm : lw.ffn_norm).span(),
                           static_cast<float>(config().rms_norm_eps));
    return Status::ok();
  }
  Status attention(int64_t l) {
    const LayerWeights& lw = layer(l);
    rows = detail::attention_project(mix.collapsed.data(), n(), config(), lw.attn);
    const auto core = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto i = static_cast<size_t>(r);
        StepUndo* undo = mtp == nullptr ? requests[i].undo : nullptr;
        detail::attention_core(first_row[i], static_cast<int64_t>(requests[i].tokens.size()),
                               first_pos[i], config(), lw.attn, model.tables_->rope,
                               layer_state(i, l), rows,
                               undo ? &undo->layers[static_cast<size_t>(l)] : nullptr);
      }
    };
    // Requests touch only their own state and rows: many short ones (decode) run on the cores
    // side by side; a long one splits its own queries over them instead.
    size_t longest = 0;
    for (const StepRequest& q : requests)
      longest = std::max(longest, q.tokens.size());
    const auto count = static_cast<int64_t>(requests.size());
    if (count > 1 && static_cast<int64_t>(longest) * 2 <= n()) {
      kernels::cpu::parallel_rows(count, 1, core);
    } else {
      core(0, count);
    }
    detail::attention_output(rows, n(), config(), lw.attn, sublayer_out.data());
    return Status::ok();
  }
  Status ffn(int64_t l) {
    detail::moe(mix.collapsed.data(), tokens, config(), layer(l).moe, routing(l),
                sublayer_out.data());
    return Status::ok();
  }
  Status mix_out(int64_t, detail::Sublayer) {
    detail::hyper_connection_out(streams.data(), sublayer_out.data(), mix, n(), config());
    return Status::ok();
  }
  Status layer_done(int64_t l) {
    if (observe) {
      observe(
          {"layer" + std::to_string(l), {n(), config().hc_mult, config().hidden_size}, streams});
    }
    return Status::ok();
  }
};

}  // namespace dserve::model
