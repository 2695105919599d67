// Model::forward: embedding -> hc_mult residual streams -> decoder layers (mHC around
// attention and MoE) -> hc_head collapse -> final RMSNorm -> lm_head (MODEL-V4.md).

#include "dserve/model/model.h"

#include <algorithm>
#include <string>

#include "cpu_step_ops.h"
#include "dserve/kernels/cpu_ops.h"

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

Model::Model(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      pools_(KvPagePools::create(config_)) {
  DSERVE_CHECK_MSG(static_cast<int64_t>(weights_.layers.size()) == config_.num_layers,
                   "weights and config disagree on the number of layers");
  tables_ = std::make_unique<Tables>(Tables{detail::rope_tables(config_)});
  // The angles of the first positions once, instead of cos and sin per pair, row and layer in
  // every step (~10% of a decode step); the same values either way.
  constexpr int64_t kCachedRopePositions = 32768;
  const int64_t cached = std::min(config_.max_position_embeddings, kCachedRopePositions);
  tables_->rope.main.precompute(cached);
  tables_->rope.compress.precompute(cached);
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Result<Tensor> Model::forward(std::span<const int32_t> tokens, RequestState& state, LogitsFor which,
                              const ForwardObserver& observe) const {
  const StepRequest one{tokens, &state, which};
  auto logits = run_step(std::span(&one, 1), observe);
  if (!logits.is_ok()) return logits.status();
  return std::move(logits->front());
}

Result<std::vector<Tensor>> Model::forward_batch(std::span<const StepRequest> requests) const {
  return run_step(requests, {});
}

Result<std::vector<Tensor>> Model::run_step(std::span<const StepRequest> requests,
                                            const ForwardObserver& observe) const {
  if (requests.empty()) return invalid_argument("forward: the step has no requests");
  // Every request is checked before any state moves: a bad one fails the step untouched.
  int64_t n = 0;
  std::vector<int64_t> first_row, first_pos;
  for (size_t r = 0; r < requests.size(); ++r) {
    const StepRequest& q = requests[r];
    const std::string which = requests.size() > 1 ? "request " + std::to_string(r) + ": " : "";
    if (q.tokens.empty()) return invalid_argument("forward: " + which + "the chunk has no tokens");
    if (Status ids = detail::check_token_ids(q.tokens, config_.vocab_size); !ids.is_ok()) {
      return which.empty() ? ids : ids.with_context("forward: request " + std::to_string(r));
    }
    DSERVE_CHECK_MSG(
        q.state != nullptr && static_cast<int64_t>(q.state->layers().size()) == config_.num_layers,
        "the request state was made for another model");
    for (size_t o = 0; o < r; ++o) {
      DSERVE_CHECK_MSG(requests[o].state != q.state, "one request state twice in a step");
    }
    first_row.push_back(n);
    first_pos.push_back(q.state->position());
    n += static_cast<int64_t>(q.tokens.size());
  }
  const int64_t hidden = config_.hidden_size;
  const int64_t hc = config_.hc_mult;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  std::vector<int32_t> tokens;  // every row's token, in step order (hash routing)
  tokens.reserve(static_cast<size_t>(n));
  for (const StepRequest& q : requests)
    tokens.insert(tokens.end(), q.tokens.begin(), q.tokens.end());

  // Row-wise work runs over every row of the step at once (each row's bits do not depend on
  // the others: kernels/invariant_gemm.h), attention's projections included; the attention
  // itself, the compressors and the indexer run per request over its own rows.
  for (const StepRequest& q : requests) {
    if (q.undo == nullptr) continue;
    q.undo->first_position = q.state->position();
    q.undo->rows = static_cast<int64_t>(q.tokens.size());
    q.undo->layers.assign(static_cast<size_t>(config_.num_layers), LayerUndo{});
  }
  std::vector<float> streams(static_cast<size_t>(n * hc * hidden));  // [n, hc, hidden]
  CpuStepOps ops{*this, requests, first_row, first_pos, tokens, observe, streams};
  DSERVE_RETURN_IF_ERROR(detail::run_layer_sequence(ops, config_.num_layers));
  for (size_t r = 0; r < requests.size(); ++r) {
    if (requests[r].state->has_mtp()) keep_mtp_inputs(requests[r], first_row[r], streams.data());
    requests[r].state->advance(static_cast<int64_t>(requests[r].tokens.size()));
  }

  // The rows whose logits are asked for, gathered: [n_out, hc, hidden].
  std::vector<int64_t> out_rows;
  std::vector<int64_t> out_count;
  for (size_t r = 0; r < requests.size(); ++r) {
    const auto len = static_cast<int64_t>(requests[r].tokens.size());
    const int64_t from = requests[r].which == LogitsFor::kLastToken ? len - 1 : 0;
    for (int64_t t = from; t < len; ++t)
      out_rows.push_back(first_row[r] + t);
    out_count.push_back(len - from);
  }
  const auto n_out = static_cast<int64_t>(out_rows.size());
  // Gathered only when they are not already one run of rows (one request's, as forward() asks).
  const float* head_in = streams.data() + out_rows.front() * hc * hidden;
  std::vector<float> out_streams;
  if (out_rows.back() - out_rows.front() + 1 != n_out) {
    out_streams.resize(static_cast<size_t>(n_out * hc * hidden));
    for (int64_t o = 0; o < n_out; ++o) {
      std::copy_n(streams.data() + out_rows[static_cast<size_t>(o)] * hc * hidden, hc * hidden,
                  out_streams.data() + o * hc * hidden);
    }
    head_in = out_streams.data();
  }
  std::vector<float> final_hidden(static_cast<size_t>(n_out * hidden));
  detail::hyper_head(head_in, n_out, config_, weights_.hc_head, final_hidden.data());
  if (observe) observe({"hc_head", {n_out, hidden}, final_hidden});
  cpu::rms_norm(final_hidden.data(), n_out, hidden, weights_.norm.span(), eps);
  if (observe) observe({"final_norm", {n_out, hidden}, final_hidden});
  Tensor all({n_out, config_.vocab_size});
  cpu::matmul(final_hidden.data(), n_out, hidden, weights_.head, all.data());
  if (requests.size() == 1) return std::vector<Tensor>{std::move(all)};
  std::vector<Tensor> logits;
  int64_t at = 0;
  for (const int64_t count : out_count) {
    Tensor t({count, config_.vocab_size});
    std::copy_n(all.data() + at * config_.vocab_size, count * config_.vocab_size, t.data());
    logits.push_back(std::move(t));
    at += count;
  }
  return logits;
}

void Model::rewind(RequestState& state, StepUndo& undo, int64_t position) const {
  DSERVE_CHECK_MSG(undo.recorded() && state.position() == undo.first_position + undo.rows,
                   "a rewind without the undo of the state's last step");
  DSERVE_CHECK_MSG(position >= undo.first_position && position <= state.position(),
                   "a rewind outside the rows of the last step");
  const int64_t keep = position - undo.first_position;
  if (keep < undo.rows) {
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      const auto i = static_cast<size_t>(l);
      detail::rewind_attention(undo.layers[i], keep, config_, weights_.layers[i].attn,
                               tables_->rope, state.layers()[i]);
    }
    if (state.has_mtp()) {
      MtpState& m = state.mtp();
      // The block's inputs of the dropped positions go too: hidden states from position on,
      // tokens from position on.
      const int64_t hidden_kept = position - (m.next_position - 1);
      DSERVE_CHECK_MSG(hidden_kept >= 0, "the MTP block ran rows of the rows taken back");
      m.hidden.resize(
          std::min(m.hidden.size(), static_cast<size_t>(hidden_kept * config_.hidden_size)));
      m.tokens.resize(
          std::min(m.tokens.size(), static_cast<size_t>(std::max<int64_t>(0, hidden_kept - 1))));
    }
    state.rewind_position(position);
  }
  undo = StepUndo{};
}

}  // namespace dserve::model
