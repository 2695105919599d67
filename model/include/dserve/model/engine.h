#pragma once
// Engine: the one interface every worker computes through, whatever the device. A request's
// state is an opaque handle the engine makes; one step() takes rows from many requests at once
// (a prefill chunk of any length, a decode token, several rows to verify) and returns the
// logits each request asks for. The hand-off between workers and the prefix store see a
// request's state as the host's RequestState (export_state / import_state), one format for
// every backend.
//
//   engine        backend                      batch-invariant
//   cpu           Model (model.h), fp32         yes: a row's logits are bit-identical whatever
//                                               else is in the step (kernels/README.md)
//   cuda:N        GpuModel (gpu_model.h), bf16  no: cuBLAS picks kernels by the number of rows;
//                                               logits match a request run alone to bf16
//                                               rounding
//
// Not thread-safe: one owner (a worker's loop) drives an engine and its requests; a co-located
// process serialises its workers' calls.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kernels/tensor.h"
#include "dserve/model/config.h"
#include "dserve/model/model.h"
#include "dserve/model/request_state.h"

namespace dserve::model {

// Where an engine computes: "cpu", or "cuda:N" ("cuda" alone is cuda:0).
struct Device {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;

  std::string name() const;
  bool operator==(const Device&) const = default;
};
// INVALID_ARGUMENT naming what was expected for anything but cpu, cuda, cuda:N (N in 0..255).
Result<Device> parse_device(std::string_view text);

// One request's state inside an engine. Made by Engine::new_request or import_state; must not
// outlive its engine.
class EngineRequest {
 public:
  virtual ~EngineRequest() = default;
  // Tokens consumed so far: the position the next token takes.
  virtual int64_t position() const = 0;
};
using RequestHandle = std::unique_ptr<EngineRequest>;

// One request's rows in a step.
struct StepRows {
  EngineRequest* request = nullptr;
  std::span<const int32_t> tokens;  // at positions request->position() onwards
  LogitsFor which = LogitsFor::kLastToken;
  // The rows after the first may be taken back with Engine::rewind (speculative decoding's
  // draft tokens): the engine keeps what that needs until the request's next step.
  bool rewindable = false;
};

// One request's drafting (speculative decoding): the token at its position, sampled and not
// yet run, and how many tokens to propose after it.
struct DraftRows {
  EngineRequest* request = nullptr;
  int32_t next_token = 0;
  int64_t count = 0;
};

struct EngineOptions {
  Device device;
  // cuda: the longest request (prompt and output), the requests held at once, and the rows one
  // pass over the layers takes (longer steps run as several passes).
  int64_t max_positions = 16384;
  int64_t max_requests = 64;
  int64_t max_step_tokens = 2048;
  // Keep the MTP block's state beside every request, so that draft() can propose tokens
  // (speculative decoding). Needs a checkpoint with the block.
  bool draft = false;
};

// The most tokens one draft() call proposes per request, and so the most rows a speculative
// decode step verifies per request (one more).
inline constexpr int64_t kMaxDraftTokens = 8;

class Engine {
 public:
  virtual ~Engine() = default;

  virtual const ModelConfig& config() const = 0;
  virtual const Device& device() const = 0;
  // What the engine runs on, for logs: "cpu (avx512, 2 threads)", "cuda:0 (NVIDIA H100 ...)".
  virtual std::string describe() const = 0;

  // A fresh request at position 0. RESOURCE_EXHAUSTED when the engine holds all it can.
  virtual Result<RequestHandle> new_request() = 0;

  // Runs every request's rows and advances it. Element i of the result holds rows[i]'s logits:
  // [1, vocab] for kLastToken, [rows, vocab] for kAllTokens. Errors (an empty chunk, a token
  // outside the vocabulary, a request twice in one step, a full pool) name the request and
  // leave every state as it was, except INTERNAL (a device fault), which leaves them unusable.
  virtual Result<std::vector<Tensor>> step(std::span<const StepRows> rows) = 0;

  // The request's state as a host RequestState whose pages come from page_pools(): a deep copy
  // (the request goes on unchanged), for a prefix-store snapshot or a hand-off.
  virtual Result<RequestState> export_state(const EngineRequest& request) const = 0;
  // The same, giving the request up: no copy where the state already lives on the host.
  virtual Result<RequestState> release_state(RequestHandle request) = 0;
  // A request continuing from `state` (a hand-off, a restored prefix). INVALID_ARGUMENT when it
  // is not a state of this engine's model.
  virtual Result<RequestHandle> import_state(RequestState state) = 0;

  // Takes a request back to `position`, which lies within the rows of its last step, run
  // rewindable: the state is then, bit for bit, that of a run that never saw the later rows, and
  // the pages only they took are free. INVALID_ARGUMENT when the last step was not
  // rewindable or the position is outside it; UNIMPLEMENTED where the backend cannot.
  virtual Status rewind(EngineRequest& request, int64_t position) = 0;
  // Whether draft() proposes tokens: the checkpoint has an MTP block, the engine runs it and was
  // made with EngineOptions::draft.
  virtual bool can_draft() const = 0;
  // For each request, up to rows[i].count (<= kMaxDraftTokens) tokens the MTP block proposes
  // after rows[i].next_token (Model::draft); fewer, or none, where the block has not yet seen
  // the request's last position (a state imported without the block's). Only ids below
  // `sampleable_ids` are proposed (0: any).
  virtual Result<std::vector<std::vector<int32_t>>> draft(std::span<const DraftRows> rows,
                                                          int64_t sampleable_ids) = 0;

  // The host pools states of this engine draw their pages from (shared with a prefix store).
  virtual const KvPagePools& page_pools() const = 0;
  // Where a state lives in host memory (the CPU engine), or null: lets the prefix store read a
  // block's pages without a copy. The state stays owned by the engine.
  virtual const RequestState* host_state(const EngineRequest& request) const = 0;
};

// A request's state as state_packing.h's bytes (the hand-off), and a request from them (DataLoss
// when the bytes are not a state of this engine's model). No copy of the state on the CPU.
Result<std::vector<uint8_t>> pack_request(const Engine& engine, const EngineRequest& request);
Result<RequestHandle> unpack_request(Engine& engine, std::span<const uint8_t> bytes);

// The engine for options.device over a loaded model: the CPU engine computes with `model`
// itself, the CUDA engine uploads its weights (the host copy may then be dropped). UNAVAILABLE
// with the probe's reason for a CUDA device this build or machine cannot use; the errors of
// GpuModel::create.
Result<std::unique_ptr<Engine>> make_engine(std::shared_ptr<const Model> model,
                                            const EngineOptions& options);

}  // namespace dserve::model
