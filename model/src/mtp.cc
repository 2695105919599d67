// The MTP block on the CPU (MODEL-V4.md "Served numerics"): the main model's hidden states kept
// for it, its rows, and drafting a chain of tokens for speculative decoding.

#include <algorithm>
#include <string>

#include "cpu_step_ops.h"
#include "dserve/model/sampler.h"

namespace dserve::model {
namespace cpu = kernels::cpu;

void Model::keep_mtp_inputs(const StepRequest& request, int64_t first_row,
                            const float* streams) const {
  MtpState& m = request.state->mtp();
  const int64_t hidden = config_.hidden_size, hc = config_.hc_mult;
  const int64_t first_pos = request.state->position();
  const auto n = static_cast<int64_t>(request.tokens.size());
  const int64_t end = first_pos + n;
  const int64_t window = config_.sliding_window;
  const auto held = static_cast<int64_t>(m.hidden.size()) / hidden;
  DSERVE_CHECK_MSG(m.next_position - 1 + held == first_pos || held == 0,
                   "the MTP block's inputs do not end where the step begins");
  // Hidden states of positions >= next_position - 1 are read by block rows; of those only the
  // last `window` ever matter (MtpState). Past a gap, the block starts over after it.
  const int64_t from = std::max({first_pos, m.next_position - 1, end - window});
  if (from >= end) return;
  if (from > m.next_position - 1 + held) {
    m.hidden.clear();
    m.tokens.clear();
    m.next_position = from + 1;
  }
  const int64_t count = end - from;
  std::vector<float> h(static_cast<size_t>(count * hidden));
  detail::hyper_head(streams + (first_row + from - first_pos) * hc * hidden, count, config_,
                     weights_.hc_head, h.data());
  m.hidden.insert(m.hidden.end(), h.begin(), h.end());
  for (int64_t t = std::max<int64_t>(0, m.next_position - first_pos); t < n; ++t)
    m.tokens.push_back(request.tokens[static_cast<size_t>(t)]);
  const int64_t drop = static_cast<int64_t>(m.hidden.size()) / hidden - window;
  if (drop > 0) {
    m.hidden.erase(m.hidden.begin(), m.hidden.begin() + drop * hidden);
    m.tokens.erase(m.tokens.begin(), m.tokens.begin() + drop);
    m.next_position += drop;
  }
}

// The rows of several requests' MTP rows as one step's: its requests, where each begins, and
// the rows' tokens and main-model hidden states in step order.
struct Model::MtpStepRows {
  std::vector<StepRequest> requests;
  std::vector<int64_t> first_row, first_pos;
  std::vector<int32_t> tokens;
  std::vector<float> hidden;
  int64_t n = 0;
};

Model::MtpStepRows Model::gather_mtp_rows(std::span<const MtpRows> rows) const {
  MtpStepRows out;
  for (const MtpRows& r : rows) {
    DSERVE_CHECK(r.state != nullptr && r.state->has_mtp() && !r.tokens.empty() &&
                 r.hidden.size() == r.tokens.size() * static_cast<size_t>(config_.hidden_size));
    out.requests.push_back({r.tokens, r.state, LogitsFor::kLastToken, nullptr});
    out.first_row.push_back(out.n);
    out.first_pos.push_back(r.first_position);
    out.tokens.insert(out.tokens.end(), r.tokens.begin(), r.tokens.end());
    out.hidden.insert(out.hidden.end(), r.hidden.begin(), r.hidden.end());
    out.n += static_cast<int64_t>(r.tokens.size());
  }
  return out;
}

std::vector<Model::MtpOutput> Model::mtp_step(std::span<const MtpRows> rows) const {
  // A request's rows before its last are read by nobody but the window: their keys go there (no
  // attention, MoE or head for them); its last row runs the block's layer and the head.
  const int64_t hidden = config_.hidden_size;
  std::vector<MtpRows> keys_only, last;
  for (const MtpRows& r : rows) {
    const size_t n = r.tokens.size();
    DSERVE_CHECK(n > 0 && r.hidden.size() == n * static_cast<size_t>(hidden));
    const auto before = static_cast<size_t>(hidden) * (n - 1);
    if (n > 1) {
      keys_only.push_back(
          {r.state, r.hidden.first(before), r.tokens.first(n - 1), r.first_position});
    }
    last.push_back({r.state, r.hidden.subspan(before), r.tokens.subspan(n - 1),
                    r.first_position + static_cast<int64_t>(n) - 1});
  }
  if (!keys_only.empty()) mtp_window_keys(keys_only);
  return mtp_layer(last);
}

void Model::mtp_window_keys(std::span<const MtpRows> rows) const {
  MtpStepRows step = gather_mtp_rows(rows);
  std::vector<float> streams(static_cast<size_t>(step.n * config_.hc_mult * config_.hidden_size));
  const ForwardObserver no_observer;
  CpuStepOps ops{*this,       step.requests, step.first_row,        step.first_pos,    step.tokens,
                 no_observer, streams,       &weights_.mtp.front(), step.hidden.data()};
  // The ops of the layer sequence up to attention's projections; the same bits as a full row.
  Status ran = ops.embed();
  if (ran.is_ok()) ran = ops.mix_in(0, detail::Sublayer::kAttention);
  DSERVE_CHECK_MSG(ran.is_ok(), "the MTP block's ops failed: " + ran.to_string());
  const detail::AttentionRows projected = detail::attention_project(
      ops.mix.collapsed.data(), step.n, config_, weights_.mtp.front().layer.attn);
  for (size_t i = 0; i < rows.size(); ++i) {
    detail::append_window_keys(step.first_row[i], static_cast<int64_t>(rows[i].tokens.size()),
                               step.first_pos[i], config_, tables_->rope,
                               rows[i].state->mtp().layer, projected);
  }
}

std::vector<Model::MtpOutput> Model::mtp_layer(std::span<const MtpRows> rows) const {
  const int64_t hidden = config_.hidden_size, hc = config_.hc_mult;
  MtpStepRows step = gather_mtp_rows(rows);
  std::vector<float> streams(static_cast<size_t>(step.n * hc * hidden));
  const ForwardObserver no_observer;
  CpuStepOps ops{*this,       step.requests, step.first_row,        step.first_pos,    step.tokens,
                 no_observer, streams,       &weights_.mtp.front(), step.hidden.data()};
  const Status ran = detail::run_layer_sequence(ops, 1);
  DSERVE_CHECK_MSG(ran.is_ok(), "the MTP block's ops failed: " + ran.to_string());

  // Each request's last row: the block's hc_head, its norm, the shared lm_head.
  const auto count = static_cast<int64_t>(rows.size());
  std::vector<float> last(static_cast<size_t>(count * hc * hidden));
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = step.first_row[static_cast<size_t>(r)] +
                        static_cast<int64_t>(rows[static_cast<size_t>(r)].tokens.size()) - 1;
    std::copy_n(streams.data() + row * hc * hidden, hc * hidden, last.data() + r * hc * hidden);
  }
  const MtpWeights& w = weights_.mtp.front();
  std::vector<float> out_hidden(static_cast<size_t>(count * hidden));
  detail::hyper_head(last.data(), count, config_, w.hc_head, out_hidden.data());
  std::vector<float> normed = out_hidden;
  cpu::rms_norm(normed.data(), count, hidden, w.norm.span(),
                static_cast<float>(config_.rms_norm_eps));
  std::vector<float> logits(static_cast<size_t>(count * config_.vocab_size));
  cpu::matmul(normed.data(), count, hidden, weights_.head, logits.data());
  std::vector<MtpOutput> out(rows.size());
  for (int64_t r = 0; r < count; ++r) {
    MtpOutput& o = out[static_cast<size_t>(r)];
    o.logits.assign(logits.begin() + r * config_.vocab_size,
                    logits.begin() + (r + 1) * config_.vocab_size);
    o.hidden.assign(out_hidden.begin() + r * hidden, out_hidden.begin() + (r + 1) * hidden);
  }
  return out;
}

Result<std::vector<std::vector<int32_t>>> Model::draft(std::span<const DraftRequest> requests,
                                                       int64_t sampleable_ids) const {
  if (!has_mtp()) return unimplemented("draft: the checkpoint has no MTP block");
  const int64_t hidden = config_.hidden_size;
  std::vector<std::vector<int32_t>> drafts(requests.size());
  // The block's waiting rows, the last reading next_token: they are the request's own.
  std::vector<std::vector<int32_t>> tokens(requests.size());
  std::vector<MtpRows> rows;
  std::vector<size_t> who;
  for (size_t i = 0; i < requests.size(); ++i) {
    const DraftRequest& q = requests[i];
    DSERVE_CHECK_MSG(q.state != nullptr && q.state->has_mtp(),
                     "a draft for a state without the MTP block's");
    const int32_t next[] = {q.next_token};
    DSERVE_RETURN_IF_ERROR(detail::check_token_ids(next, config_.vocab_size)
                               .with_context("draft: request " + std::to_string(i)));
    MtpState& m = q.state->mtp();
    const auto held = static_cast<int64_t>(m.hidden.size()) / hidden;
    if (q.count <= 0 || held == 0) continue;
    DSERVE_CHECK_MSG(static_cast<int64_t>(m.tokens.size()) == held - 1 &&
                         m.next_position - 1 + held == q.state->position(),
                     "the MTP block's inputs do not match the request's position");
    tokens[i] = m.tokens;
    tokens[i].push_back(q.next_token);
    rows.push_back({q.state, m.hidden, tokens[i], m.next_position});
    who.push_back(i);
  }
  if (rows.empty()) return drafts;
  std::vector<MtpOutput> outs = mtp_step(rows);
  // Those rows are of known tokens: the block keeps them. The chain's rows are taken back: the
  // window is put back as it is now where a chain runs.
  std::vector<std::vector<float>> windows(who.size());
  int64_t longest = 0;
  for (size_t j = 0; j < who.size(); ++j) {
    const DraftRequest& q = requests[who[j]];
    MtpState& m = q.state->mtp();
    m.next_position += static_cast<int64_t>(tokens[who[j]].size());
    m.hidden.clear();
    m.tokens.clear();
    if (q.count > 1) windows[j] = m.layer.window;
    drafts[who[j]].push_back(argmax(sampleable_logits(outs[j].logits, sampleable_ids)));
    longest = std::max(longest, q.count);
  }
  for (int64_t d = 1; d < longest; ++d) {
    std::vector<MtpRows> chain;
    std::vector<size_t> chain_of;  // index into who / outs
    for (size_t j = 0; j < who.size(); ++j) {
      const DraftRequest& q = requests[who[j]];
      if (q.count <= d) continue;
      chain.push_back({q.state, outs[j].hidden, std::span(&drafts[who[j]].back(), 1),
                       q.state->mtp().next_position + d - 1});
      chain_of.push_back(j);
    }
    std::vector<MtpOutput> next = mtp_step(chain);
    for (size_t c = 0; c < chain_of.size(); ++c) {
      const size_t j = chain_of[c];
      drafts[who[j]].push_back(argmax(sampleable_logits(next[c].logits, sampleable_ids)));
      outs[j] = std::move(next[c]);
    }
  }
  for (size_t j = 0; j < who.size(); ++j) {
    if (requests[who[j]].count > 1)
      requests[who[j]].state->mtp().layer.window = std::move(windows[j]);
  }
  return drafts;
}

}  // namespace dserve::model
