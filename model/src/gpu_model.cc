// GpuModel: Model::forward (model.cc and the sublayers in layers.h) as a sequence of CUDA
// launches on the default stream. Each step names its CPU twin; the order of operations inside
// every kernel follows the CPU code, so fp32 weights give the CPU's logits to rounding.

#include "gpu_model_impl.h"

namespace dserve::model {

GpuRequestState::GpuRequestState() = default;
GpuRequestState::~GpuRequestState() = default;
GpuRequestState::GpuRequestState(GpuRequestState&&) noexcept = default;
GpuRequestState& GpuRequestState::operator=(GpuRequestState&&) noexcept = default;
int64_t GpuRequestState::position() const {
  return impl_ ? impl_->position : 0;
}

GpuModel::GpuModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModel::~GpuModel() = default;
const ModelConfig& GpuModel::config() const {
  return impl_->config;
}

const GpuModelOptions& GpuModel::options() const {
  return impl_->options;
}

size_t GpuModel::weight_bytes() const {
  return impl_->weight_bytes;
}

size_t GpuModel::pool_bytes() const {
  return impl_->pool_bytes;
}

GpuRequestState::Impl::~Impl() {
  if (owner != nullptr) owner->release(*this);
}

Status GpuModel::Impl::check_tokens(std::span<const int32_t> input, int64_t position) const {
  if (input.empty()) return invalid_argument("forward: the chunk has no tokens");
  DSERVE_RETURN_IF_ERROR(detail::check_token_ids(input, config.vocab_size));
  const int64_t end = position + static_cast<int64_t>(input.size());
  if (end > options.max_positions) {
    return out_of_range("forward: the request would reach position " + std::to_string(end) +
                        ", past this GpuModel's max_positions " +
                        std::to_string(options.max_positions));
  }
  return Status::ok();
}

GpuRequestState::Impl& GpuModel::Impl::state_of(GpuRequestState& state) const {
  DSERVE_CHECK_MSG(state.impl_ != nullptr && state.impl_->owner == this,
                   "the GPU request state was made by another GpuModel");
  return *state.impl_;
}

// Checks one request's chunk, takes the pages it needs, then runs it in passes of at most
// `chunk` tokens, calling after_pass(first, len) after each (the pass's rows are still in the
// streams then).
template <typename AfterPass>
Status GpuModel::Impl::run_passes(std::span<const int32_t> input, GpuRequestState& state,
                                  AfterPass after_pass) {
  GpuRequestState::Impl& s = state_of(state);
  DSERVE_RETURN_IF_ERROR(check_tokens(input, s.position));
  const Segment whole{&s, input};
  DSERVE_RETURN_IF_ERROR(reserve_pages(std::span(&whole, 1)));
  const auto n = static_cast<int64_t>(input.size());
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t len = std::min(chunk, n - first);
    const Segment pass{&s, input.subspan(static_cast<size_t>(first), static_cast<size_t>(len))};
    DSERVE_RETURN_IF_ERROR(run_batch(std::span(&pass, 1)));
    DSERVE_RETURN_IF_ERROR(after_pass(first, len));
  }
  return Status::ok();
}

Result<Tensor> GpuModel::forward(std::span<const int32_t> tokens, GpuRequestState& state,
                                 LogitsFor which) {
  Impl& m = *impl_;
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t vocab = m.config.vocab_size;
  Tensor logits({which == LogitsFor::kLastToken ? 1 : n, vocab});
  int64_t written = 0;
  const Status status = m.run_passes(tokens, state, [&](int64_t first, int64_t len) -> Status {
    // Rows of this pass whose logits are wanted.
    const int64_t want_first =
        which == LogitsFor::kLastToken ? (first + len == n ? len - 1 : len) : 0;
    for (int64_t r = want_first; r < len; r += m.logits_tile) {
      const int64_t rows = std::min(m.logits_tile, len - r);
      DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
      DSERVE_RETURN_IF_ERROR(m.logits.copy_to_host(
          logits.data() + written * vocab, static_cast<size_t>(rows * vocab) * sizeof(float)));
      written += rows;
    }
    return Status::ok();
  });
  if (!status.is_ok()) return status;
  DSERVE_CHECK(written == logits.rows());
  return logits;
}

Result<int32_t> GpuModel::forward_greedy(std::span<const int32_t> tokens, GpuRequestState& state) {
  Impl& m = *impl_;
  int64_t last_len = 0;
  DSERVE_RETURN_IF_ERROR(m.run_passes(tokens, state, [&](int64_t, int64_t len) {
    last_len = len;
    return Status::ok();
  }));
  DSERVE_RETURN_IF_ERROR(m.final_rows(last_len - 1, 1, m.logits.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::argmax_rows(m.logits.as<float>(), 1, m.config.vocab_size,
                                           m.greedy.as<int32_t>(), m.stream_));
  int32_t token = 0;
  DSERVE_RETURN_IF_ERROR(m.greedy.copy_to_host(&token, sizeof(token)));
  return token;
}

Result<std::vector<Tensor>> GpuModel::step(std::span<const StepRequest> requests) {
  Impl& m = *impl_;
  if (requests.empty()) return invalid_argument("step: no requests");
  std::vector<Impl::Segment> whole;
  bool decode_only = static_cast<int64_t>(requests.size()) <= m.chunk;
  for (size_t i = 0; i < requests.size(); ++i) {
    const StepRequest& r = requests[i];
    const std::string who = "step: request " + std::to_string(i);
    if (r.state == nullptr) return invalid_argument(who + " has no state");
    GpuRequestState::Impl& s = m.state_of(*r.state);
    for (const Impl::Segment& seen : whole) {
      if (seen.state == &s) return invalid_argument(who + " appears twice in one step");
    }
    DSERVE_RETURN_IF_ERROR(m.check_tokens(r.tokens, s.position).with_context(who));
    whole.push_back(Impl::Segment{&s, r.tokens});
    decode_only = decode_only && r.tokens.size() == 1 && r.which == LogitsFor::kLastToken;
  }
  const int64_t vocab = m.config.vocab_size;
  std::vector<Tensor> out;
  out.reserve(requests.size());
  if (decode_only) {
    std::vector<GpuRequestState*> states;
    std::vector<int32_t> tokens;
    for (const StepRequest& r : requests) {
      states.push_back(r.state);
      tokens.push_back(r.tokens.front());
    }
    DSERVE_ASSIGN_OR_RETURN(Tensor logits, decode(states, tokens));
    for (int64_t i = 0; i < logits.rows(); ++i) {
      Tensor row({1, vocab});
      std::copy_n(logits.data() + i * vocab, vocab, row.data());
      out.push_back(std::move(row));
    }
    return out;
  }
  DSERVE_RETURN_IF_ERROR(m.reserve_pages(whole));
  std::vector<int64_t> consumed(requests.size(), 0), written(requests.size(), 0);
  for (const StepRequest& r : requests) {
    const auto n = static_cast<int64_t>(r.tokens.size());
    out.emplace_back(std::vector<int64_t>{r.which == LogitsFor::kLastToken ? 1 : n, vocab});
  }
  // Passes of at most `chunk` rows, requests in order, until every row has run.
  for (size_t next = 0; next < requests.size();) {
    std::vector<Impl::Segment> pass;
    std::vector<size_t> owner;
    int64_t rows = 0;
    for (size_t i = next; i < requests.size() && rows < m.chunk; ++i) {
      const auto n = static_cast<int64_t>(requests[i].tokens.size());
      const int64_t take = std::min(n - consumed[i], m.chunk - rows);
      pass.push_back(Impl::Segment{
          whole[i].state,
          requests[i].tokens.subspan(static_cast<size_t>(consumed[i]), static_cast<size_t>(take))});
      owner.push_back(i);
      rows += take;
    }
    DSERVE_RETURN_IF_ERROR(m.run_batch(pass));
    int64_t row0 = 0;
    for (size_t j = 0; j < pass.size(); ++j) {
      const size_t i = owner[j];
      const auto n = static_cast<int64_t>(requests[i].tokens.size());
      const auto len = static_cast<int64_t>(pass[j].tokens.size());
      const bool last_pass = consumed[i] + len == n;
      const int64_t want_first =
          requests[i].which == LogitsFor::kLastToken ? (last_pass ? len - 1 : len) : 0;
      for (int64_t r = want_first; r < len; r += m.logits_tile) {
        const int64_t tile = std::min(m.logits_tile, len - r);
        DSERVE_RETURN_IF_ERROR(m.final_rows(row0 + r, tile, m.logits.as<float>()));
        DSERVE_RETURN_IF_ERROR(m.logits.copy_to_host(
            out[i].data() + written[i] * vocab, static_cast<size_t>(tile * vocab) * sizeof(float)));
        written[i] += tile;
      }
      consumed[i] += len;
      row0 += len;
      if (last_pass && i == next) ++next;
    }
    while (next < requests.size() &&
           consumed[next] == static_cast<int64_t>(requests[next].tokens.size()))
      ++next;
  }
  for (size_t i = 0; i < requests.size(); ++i)
    DSERVE_CHECK(written[i] == out[i].rows());
  return out;
}

Result<int64_t> GpuModel::last_batch_distinct_experts() const {
  // Counted on the host for batches grouped there, on the device for the others.
  int32_t on_device = 0;
  DSERVE_RETURN_IF_ERROR(impl_->moe_active_total.copy_to_host(&on_device, sizeof(on_device)));
  return impl_->batch_distinct_experts + on_device;
}

}  // namespace dserve::model
