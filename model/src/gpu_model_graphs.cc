// Decode steps: one row per request, replayed as a captured CUDA graph per batch size.

#include "gpu_model_impl.h"

namespace dserve::model {

// One batch of one token per request.
Status GpuModel::Impl::decode_rows(std::span<GpuRequestState* const> states,
                                   std::span<const int32_t> next) {
  if (states.size() != next.size() || states.empty()) {
    return invalid_argument("decode: " + std::to_string(states.size()) + " states and " +
                            std::to_string(next.size()) +
                            " tokens; one token per state, at least one");
  }
  if (static_cast<int64_t>(states.size()) > chunk) {
    return invalid_argument("decode: " + std::to_string(states.size()) +
                            " requests in one step, past GpuModelOptions.max_chunk_tokens " +
                            std::to_string(chunk));
  }
  std::vector<Segment> segments;
  std::vector<int32_t> seen_slots;
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i] == nullptr) {
      return invalid_argument("decode: request " + std::to_string(i) + " has no state");
    }
    GpuRequestState::Impl& s = state_of(*states[i]);
    if (std::find(seen_slots.begin(), seen_slots.end(), s.slot) != seen_slots.end()) {
      return invalid_argument("decode: request " + std::to_string(i) +
                              " appears twice in one step");
    }
    seen_slots.push_back(s.slot);
    const Status valid = check_tokens(next.subspan(i, 1), s.position);
    if (!valid.is_ok()) return valid.with_context("decode: request " + std::to_string(i));
    segments.push_back(Segment{&s, next.subspan(i, 1)});
  }
  DSERVE_RETURN_IF_ERROR(reserve_pages(segments));
  decode_batch = true;
  Status stepped = decode_step(segments);
  decode_batch = false;
  return stepped;
}

Status GpuModel::Impl::decode_step(std::span<const Segment> segments) {
  // Graphs need the device-side MoE grouping (no copy back inside the step).
  const auto rows = static_cast<int64_t>(segments.size());
  if (!options.decode_graphs ||
      rows * config.experts_per_token > device_grouping_pairs(config.n_routed_experts)) {
    return run_batch(segments);
  }
  // A captured step per batch size: the host's part runs as usual, the launches replay.
  DSERVE_ASSIGN_OR_RETURN(const int64_t n, prepare_batch(segments));
  auto graph = decode_graphs.find(n);
  // The first step of a size runs eagerly: every kernel it uses is then loaded before any
  // capture (lazy module loading), and the second step captures.
  const bool first_of_size = eager_sizes.insert(n).second;
  if (graph == decode_graphs.end() && !first_of_size && !graph_failures.contains(n)) {
    graph_batch = true;
    auto captured = cuda::CapturedGraph::capture(stream_, [&] { return run_layers(n); });
    graph_batch = false;
    if (captured.is_ok()) {
      graph = decode_graphs.emplace(n, std::move(captured).value()).first;
    } else {
      // Nothing ran; this batch size runs eagerly from now on (graph_failure() says why).
      graph_failures.emplace(n, captured.status().with_context("capturing the decode step of " +
                                                               std::to_string(n) + " requests"));
    }
  }
  if (graph != decode_graphs.end()) {
    DSERVE_RETURN_IF_ERROR(graph->second.launch(stream_));
  } else {
    DSERVE_RETURN_IF_ERROR(run_layers(n));
  }
  for (const Segment& seg : segments)
    seg.state->position += static_cast<int64_t>(seg.tokens.size());
  return Status::ok();
}

Status GpuModel::decode_graph_status(int64_t batch) const {
  const auto failed = impl_->graph_failures.find(batch);
  if (failed != impl_->graph_failures.end()) return failed->second;
  if (impl_->decode_graphs.contains(batch)) return Status::ok();
  return not_found("no decode step of " + std::to_string(batch) + " requests was captured");
}

Result<Tensor> GpuModel::decode(std::span<GpuRequestState* const> states,
                                std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  DSERVE_RETURN_IF_ERROR(m.decode_rows(states, tokens));
  const auto b = static_cast<int64_t>(states.size());
  const int64_t vocab = m.config.vocab_size;
  Tensor logits({b, vocab});
  for (int64_t r = 0; r < b; r += m.logits_tile) {
    const int64_t rows = std::min(m.logits_tile, b - r);
    DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
    DSERVE_RETURN_IF_ERROR(m.logits.copy_to_host(
        logits.data() + r * vocab, static_cast<size_t>(rows * vocab) * sizeof(float)));
  }
  return logits;
}

Result<std::vector<int32_t>> GpuModel::decode_greedy(std::span<GpuRequestState* const> states,
                                                     std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  DSERVE_RETURN_IF_ERROR(m.decode_rows(states, tokens));
  const auto b = static_cast<int64_t>(states.size());
  std::vector<int32_t> out(static_cast<size_t>(b));
  for (int64_t r = 0; r < b; r += m.logits_tile) {
    const int64_t rows = std::min(m.logits_tile, b - r);
    DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
    DSERVE_RETURN_IF_ERROR(cuda::argmax_rows(m.logits.as<float>(), rows, m.config.vocab_size,
                                             m.greedy.as<int32_t>(), m.stream_));
    DSERVE_RETURN_IF_ERROR(
        m.greedy.copy_to_host(out.data() + r, static_cast<size_t>(rows) * sizeof(int32_t)));
  }
  return out;
}

}  // namespace dserve::model
