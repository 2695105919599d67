#pragma once
// Model: the DeepSeek-V4 forward pass on the CPU reference backend. One call consumes a chunk
// of tokens of one request (forward) or of several (forward_batch), updates their
// RequestStates and returns logits. Prefill
// in chunks of any size and one-token decode are the same call: the result does not depend on
// how a prompt is split (tests/model/forward_test.cc).
//
// The Model is immutable after construction and may be shared by threads, each with its own
// RequestState.

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kernels/tensor.h"
#include "dserve/model/config.h"
#include "dserve/model/request_state.h"
#include "dserve/model/weights.h"

namespace dserve::model {

enum class LogitsFor {
  kAllTokens,  // logits for every token of the chunk: [n, vocab]
  kLastToken,  // only the last token's: [1, vocab] (prefill before sampling)
};

// One stage of a forward pass as it was computed, for comparing ours with another
// implementation layer by layer (`dserve model trace`, tools/oracle/compare.py). Stages, in
// order: "embed" [n, hidden], "layer0".. [n, hc_mult, hidden] (the residual streams after each
// decoder layer), "hc_head" [n_out, hidden], "final_norm" [n_out, hidden] (lm_head's input).
// `values` is valid only during the call.
struct ForwardStage {
  std::string name;
  std::vector<int64_t> shape;
  std::span<const float> values;
};
using ForwardObserver = std::function<void(const ForwardStage&)>;

class Model {
 public:
  Model(ModelConfig config, ModelWeights weights);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }

  // Runs `tokens` at positions state.position() .. + tokens.size() - 1 and advances the state.
  // Errors: an empty chunk or a token id outside [0, vocab_size) (InvalidArgument /
  // OutOfRange); the state is left untouched then. `observe`, when given, sees every stage.
  Result<Tensor> forward(std::span<const int32_t> tokens, RequestState& state,
                         LogitsFor which = LogitsFor::kAllTokens,
                         const ForwardObserver& observe = {}) const;

  // One request's part of a batched step: its tokens (a prefill chunk, or one decode token)
  // at positions state->position() onwards, and which of their logits it wants.
  struct StepRequest {
    std::span<const int32_t> tokens;
    RequestState* state = nullptr;
    LogitsFor which = LogitsFor::kLastToken;
  };
  // Runs the tokens of several requests in one step: the row-wise work (embedding, mHC, norms,
  // MoE, hc_head, lm_head) over every row of the step at once, so each weight is read once per
  // step, and attention and the compressors per request over that request's rows. Element i of
  // the result is bit-identical to forward(requests[i].tokens, *requests[i].state,
  // requests[i].which): a request's logits do not depend on the others in the step or its place
  // among them (kernels/invariant_gemm.h). Errors as forward(), naming the request; no state
  // moves then. Each state at most once per step.
  Result<std::vector<Tensor>> forward_batch(std::span<const StepRequest> requests) const;

  // A fresh state for one request; its pages come from the model's pools.
  RequestState new_state() const { return RequestState(config_, pools_); }
  // The page pools every request of this model draws from (shared with a prefix store).
  const KvPagePools& page_pools() const { return pools_; }

 private:
  Result<std::vector<Tensor>> run_step(std::span<const StepRequest> requests,
                                       const ForwardObserver& observe) const;
  struct Tables;
  struct CpuStepOps;  // the layer sequence's ops (model.cc)
  ModelConfig config_;
  ModelWeights weights_;
  KvPagePools pools_;
  std::unique_ptr<Tables> tables_;  // RoPE tables, built once
};

}  // namespace dserve::model
