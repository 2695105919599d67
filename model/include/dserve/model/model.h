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
#include "dserve/model/step_undo.h"
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
    // Set: what the step changes in the state is kept here, so that rewind() can take its last
    // rows back (speculative decoding's verify rows).
    StepUndo* undo = nullptr;
  };
  // Runs the tokens of several requests in one step: the row-wise work (embedding, mHC, norms,
  // MoE, hc_head, lm_head) over every row of the step at once, so each weight is read once per
  // step, and attention and the compressors per request over that request's rows. Element i of
  // the result is bit-identical to forward(requests[i].tokens, *requests[i].state,
  // requests[i].which): a request's logits do not depend on the others in the step or its place
  // among them (kernels/invariant_gemm.h). Errors as forward(), naming the request; no state
  // moves then. Each state at most once per step.
  Result<std::vector<Tensor>> forward_batch(std::span<const StepRequest> requests) const;

  // Takes a state back to `position`, within the rows of the step `undo` recorded (the last
  // step the state ran): afterwards the state is, bit for bit, that of a run that only ever saw
  // the rows before `position`. The pages the dropped rows alone took go back to the pools.
  void rewind(RequestState& state, StepUndo& undo, int64_t position) const;

  // --- The MTP block (speculative decoding) ---------------------------------------------
  // Whether the checkpoint has one (the official layout's `mtp.0.*`).
  bool has_mtp() const { return !weights_.mtp.empty(); }
  // One request's drafting: the token at its position (sampled, not yet run) and how many
  // tokens to propose after it.
  struct DraftRequest {
    RequestState* state = nullptr;  // with an MtpState (RequestState::enable_mtp)
    int32_t next_token = 0;
    int64_t count = 0;
  };
  // For each request, up to `count` tokens the MTP block proposes after next_token: it first
  // runs the block's rows that wait for their token (MtpState), the last of them reading
  // next_token, then drafts a chain, each draft the argmax over the first `sampleable_ids`
  // logits (0: all) of the block reading its own last hidden state and the previous draft. The
  // chain's rows are taken back afterwards: the block's state keeps only rows of known tokens.
  // A request whose block has no row to run (its main state has not run since the block's
  // last draft) gets no drafts. Requests run together; each weight is read once per row set.
  Result<std::vector<std::vector<int32_t>>> draft(std::span<const DraftRequest> requests,
                                                  int64_t sampleable_ids) const;

  // A fresh state for one request; its pages come from the model's pools.
  RequestState new_state() const { return RequestState(config_, pools_); }
  // The page pools every request of this model draws from (shared with a prefix store).
  const KvPagePools& page_pools() const { return pools_; }

 private:
  Result<std::vector<Tensor>> run_step(std::span<const StepRequest> requests,
                                       const ForwardObserver& observe) const;
  // Keeps the main model's hidden states and tokens of a step's rows that MTP rows will read.
  void keep_mtp_inputs(const StepRequest& request, int64_t first_row, const float* streams) const;
  // The MTP block's rows of several requests (each request's rows at its MtpState's
  // next_position ..): the logits of each request's last row and that row's hidden state.
  struct MtpRows {
    RequestState* state = nullptr;
    std::span<const float> hidden;    // [n, hidden]
    std::span<const int32_t> tokens;  // [n]
    int64_t first_position = 0;
  };
  struct MtpOutput {
    std::vector<float> logits;  // [vocab]: the last row's
    std::vector<float> hidden;  // [hidden]: the last row's, before the block's norm
  };
  std::vector<MtpOutput> mtp_step(std::span<const MtpRows> rows) const;
  // Parts of it: the keys of rows whose output nobody reads, into the block's window; and the
  // block's layer and head over rows whose output is read.
  void mtp_window_keys(std::span<const MtpRows> rows) const;
  std::vector<MtpOutput> mtp_layer(std::span<const MtpRows> rows) const;
  struct MtpStepRows;  // mtp.cc
  MtpStepRows gather_mtp_rows(std::span<const MtpRows> rows) const;
  struct Tables;
  struct CpuStepOps;  // the layer sequence's ops (model.cc)
  ModelConfig config_;
  ModelWeights weights_;
  KvPagePools pools_;
  std::unique_ptr<Tables> tables_;  // RoPE tables, built once
};

}  // namespace dserve::model
