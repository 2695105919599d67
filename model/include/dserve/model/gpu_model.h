#pragma once
// GpuModel: the DeepSeek-V4 forward pass on the CUDA backend (kernels/cuda_model_ops.h), the
// device twin of Model (model.h): the same call consumes a chunk of tokens of one request,
// advances that request's GpuRequestState and returns the same logits, to fp32 rounding with
// fp32 weights and to bf16 rounding with bf16 weights (tests/model/gpu_forward_test.cc).
//
// Weights live on the device: Linear weights in the chosen WeightType, everything small (norms,
// mHC, the router, biases, sinks, position biases) in fp32. A request's state lives on the
// device too: its sliding-window ring, compressor buffers, and its compressed entries and
// indexer keys in pages of per-layer page pools, read through per-request block tables.
//
// In a build without the CUDA backend, or on a machine without a usable GPU, create() fails
// with UNAVAILABLE and the reason (kernels::probe_cuda_device()). Not thread-safe: one host
// thread drives a GpuModel and all its states.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kernels/tensor.h"
#include "dserve/model/config.h"
#include "dserve/model/model.h"
#include "dserve/model/request_state.h"
#include "dserve/model/weights.h"

namespace dserve::model {

enum class GpuWeights { kFp32, kBf16 };

// How attention multiplies. kAuto: bf16 on tensor cores in forward() and forward_greedy()
// passes when the weights are bf16 and head_dim is a multiple of 64; fp32 on CUDA cores
// otherwise and in decode() and decode_greedy() steps, whose small batches the 16-head
// tensor-core blocks would leave mostly idle. The choice follows the call, not its length, so
// a prompt gives the same logits however it is split. kTensorCores everywhere needs head_dim
// a multiple of 64.
enum class GpuAttention { kAuto, kCudaCores, kTensorCores };

struct GpuModelOptions {
  // The CUDA device (cuda:N) the model lives on; made current on the creating thread.
  int device = 0;
  GpuWeights weights = GpuWeights::kBf16;
  // The longest request (tokens, prompt and output): sizes the RoPE tables and a request's
  // block tables. Forward calls past it fail with OUT_OF_RANGE.
  int64_t max_positions = 16384;
  // Requests whose pages the page pools can hold at once, each at max_positions.
  int64_t max_requests = 4;
  // Tokens one pass over the layers takes; longer chunks run as several passes (the result
  // does not depend on the split). Sizes the activation scratch.
  int64_t max_chunk_tokens = 1024;
  // decode() and decode_greedy() replay each batch size's step as a captured CUDA graph (the
  // first step of a size runs as plain launches, the second captures). Off: every launch is
  // made anew.
  bool decode_graphs = true;
  GpuAttention attention = GpuAttention::kAuto;
};

class GpuModel;

// The device-resident state of one request. Move-only; returns its pages to the model's pools
// when destroyed, so it must not outlive its GpuModel.
class GpuRequestState {
 public:
  GpuRequestState();
  ~GpuRequestState();
  GpuRequestState(GpuRequestState&&) noexcept;
  GpuRequestState& operator=(GpuRequestState&&) noexcept;

  // Tokens consumed so far.
  int64_t position() const;

 private:
  friend class GpuModel;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class GpuModel {
 public:
  // Uploads the weights. Fails with UNAVAILABLE when there is no usable GPU (the reason says
  // why), RESOURCE_EXHAUSTED when the weights, pools or scratch do not fit, INVALID_ARGUMENT
  // for options out of range or a tid2eid entry naming no expert, UNIMPLEMENTED for hc_mult
  // above 8, experts_per_token above 16, a head_dim that is not a multiple of 4 up to 512 (of
  // 64 with GpuAttention::kTensorCores), or a hidden_size or moe_intermediate_size that is not a
  // multiple of 8.
  static Result<std::unique_ptr<GpuModel>> create(const ModelConfig& config,
                                                  const ModelWeights& weights,
                                                  GpuModelOptions options = {});
  // A model of the config's shapes with seeded weights generated on the device (uniform,
  // scaled by 1 / sqrt(fan-in); norms 1, biases 0): for benchmarks at widths whose weights
  // could not be made on the host. Errors as create().
  static Result<std::unique_ptr<GpuModel>> create_random(const ModelConfig& config,
                                                         GpuModelOptions options, uint64_t seed);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const ModelConfig& config() const;
  const GpuModelOptions& options() const;

  // A fresh request state in one of the max_requests slots (RESOURCE_EXHAUSTED when all are
  // taken); its pages come as the request grows.
  Result<GpuRequestState> new_state();

  // Runs `tokens` at positions state.position() .. and advances the state, as Model::forward.
  // Errors: an empty chunk, a token outside the vocabulary, a request past max_positions, the
  // page pools full (RESOURCE_EXHAUSTED); the state is unchanged then, except after a device
  // fault (INTERNAL), which leaves it unusable.
  Result<Tensor> forward(std::span<const int32_t> tokens, GpuRequestState& state,
                         LogitsFor which = LogitsFor::kAllTokens);
  // The same pass, returning only the greedy choice after the last token (argmax on the device,
  // the lowest id on ties, as model::argmax).
  Result<int32_t> forward_greedy(std::span<const int32_t> tokens, GpuRequestState& state);

  // One decode step for several requests at once: tokens[i] is states[i]'s next token (one
  // row per request; distinct states, at most max_chunk_tokens). Returns the logits [B, vocab]
  // of each request's new position. Errors as forward(), checked for every request before any
  // runs.
  Result<Tensor> decode(std::span<GpuRequestState* const> states, std::span<const int32_t> tokens);
  // The same step, returning each request's greedy choice (argmax on the device).
  Result<std::vector<int32_t>> decode_greedy(std::span<GpuRequestState* const> states,
                                             std::span<const int32_t> tokens);

  // One step over the rows of several requests at once (Model::forward_batch's contract): a
  // prefill chunk of any length, one decode token, or several rows to verify, per request.
  // Element i of the result holds requests[i]'s logits (its last row, or all its rows). A step
  // of one-row requests that want their last logits runs as decode() (captured graphs); any
  // other packs the rows into passes of at most max_chunk_tokens, a request's rows splitting
  // across passes when they must. Errors as forward(), checked for every request before any
  // runs; the states are unchanged then. Not batch-invariant (cuBLAS picks its kernels by the
  // number of rows): a request's logits match it run alone to the weight format's rounding.
  struct StepRequest {
    std::span<const int32_t> tokens;
    GpuRequestState* state = nullptr;
    LogitsFor which = LogitsFor::kLastToken;
  };
  Result<std::vector<Tensor>> step(std::span<const StepRequest> requests);

  // A request's state copied to the host: the RequestState Model::forward would hold at the
  // same position (its pages drawn from `pools`), for the hand-off and the prefix store. The
  // device state is unchanged. INTERNAL after a device fault.
  Result<RequestState> export_state(const GpuRequestState& state, const KvPagePools& pools) const;
  // A new device state holding `host`: a slot and its pages taken, everything uploaded.
  // INVALID_ARGUMENT when `host` is not a state of this model's shapes, OUT_OF_RANGE past
  // max_positions, RESOURCE_EXHAUSTED when no slot or pages are free.
  Result<GpuRequestState> import_state(const RequestState& host);

  // Benchmarks: makes a fresh state of a create_random() model stand at position `tokens`, its
  // pages taken and its window, compressor buffers and entries the generated values, without
  // running the tokens (INVALID_ARGUMENT for other models or states).
  Status assume_context(GpuRequestState& state, int64_t tokens);

  // Whether decode steps of `batch` requests replay a captured graph: OK when they do, the
  // capture's error when it failed (those steps then run eagerly), NOT_FOUND before the
  // capture (the second step of that size).
  Status decode_graph_status(int64_t batch) const;

  // Routed experts that got rows in the last batch, summed over the layers (the expert weights
  // that batch had to read).
  Result<int64_t> last_batch_distinct_experts() const;
  // Bytes of the pages a request holds in one layer's pools (compressed entries and indexer
  // keys, fp32 rows; whole pages).
  size_t kv_bytes(const GpuRequestState& state, int64_t layer) const;

  // Device bytes held by weights, and by the page pools of compressed entries and indexer keys.
  size_t weight_bytes() const;
  size_t pool_bytes() const;

  struct Impl;  // defined in gpu_model.cc; named here so request states can point at it

 private:
  static Result<std::unique_ptr<GpuModel>> create_on_device(const ModelConfig& config,
                                                            const ModelWeights* weights,
                                                            GpuModelOptions options,
                                                            std::optional<uint64_t> seed);
  explicit GpuModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dserve::model
