#pragma once
// DecodeBatch: the decode worker's continuous batch. Requests join between steps (with the
// state a prefill left them in and the logits of their prompt's last token), and every step
// makes one token for each of them; they leave when they sample the end-of-sequence token,
// reach their token limit or deadline, are cancelled, or fail. A request that leaves drops
// its state at once, so its pages go back to the model's pools before the next step.
//
// A step samples every request's next token, then runs one batched forward over all the
// requests that go on (Engine::step: each weight read once per step, attention per request).
// On the CPU engine a request's logits are bit-identical to a forward of it alone, so its tokens
// are the same as a `dserve generate` of the same prompt with the same sampling parameters,
// whoever else is in the batch. Not thread-safe: one owner (the worker's loop) calls it.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/decode/speculation.h"
#include "dserve/kernels/tensor.h"
#include "dserve/model/engine.h"
#include "dserve/model/sampler.h"

namespace dserve::decode {

using Clock = std::chrono::steady_clock;

struct DecodeRequest {
  uint64_t id = 0;
  model::RequestHandle request;  // the engine's request, after the prompt
  Tensor prompt_logits;          // [1, vocab]: the prompt's last token
  model::SamplingParams sampling;
  // Tokens the request generated before it was placed here (a replay): the penalties count them.
  std::vector<int32_t> generated;
  int64_t max_tokens = 64;  // tokens to sample at most, the end-of-sequence token included
  std::optional<Clock::time_point> deadline;
};

enum class FinishReason { kNone, kEndOfSequence, kMaxTokens, kCancelled, kDeadline, kError };
std::string_view finish_reason_name(FinishReason reason);

// What one step produced for one request: a token, or the request's end, or both (the last
// token and its end). A token is never the end-of-sequence token itself. With speculation a
// step may give a request several tokens: one event each, in order.
struct TokenEvent {
  uint64_t request_id = 0;
  std::optional<int32_t> token;
  int64_t index = 0;  // the token's position in the request's output (0 = first)
  FinishReason finished = FinishReason::kNone;
  Status error;  // set when finished == kError
};

struct DecodeOptions {
  int64_t max_batch = 64;  // requests decoding at once
  // Only ids below this are sampled (model::sampleable_logits): the tokenizer's vocabulary.
  // 0: every row of the logits.
  int64_t sampleable_ids = 0;
  // Speculative decoding (speculation.h): draft tokens per request per step, at most (0: off,
  // up to model::kMaxDraftTokens). The tokens are the same with it on or off.
  int64_t speculative_tokens = 0;
  // Choose each step's draft count (down to 0) from the measured acceptance and step cost;
  // false: always speculative_tokens.
  bool adaptive_speculation = true;
  // Who drafts: null for the engine's MTP block (the engine must be made with
  // EngineOptions::draft). Must outlive the batch.
  Drafter* drafter = nullptr;
  // Called for each request that goes on, once the last step's rows are sampled and the
  // rejected ones taken back: its state then holds every token it committed but the newest
  // (which the next step runs). Tests compare states here. Must not call back into the batch.
  std::function<void(uint64_t id, const model::EngineRequest& request)> on_committed = {};
};

class DecodeBatch {
 public:
  DecodeBatch(model::Engine& engine, const DecodeOptions& options);

  // ResourceExhausted when max_batch requests are decoding; InvalidArgument for an id that is
  // already in the batch, a state of another position than its logits' prompt, or bad
  // sampling parameters.
  Status add(DecodeRequest request);
  // Ends a request at the next step (a kCancelled event); unknown ids are ignored (it may
  // have finished already).
  void cancel(uint64_t id);
  // At least one token for every request in the batch (more where drafts were accepted), in
  // the order they joined.
  std::vector<TokenEvent> step();

  size_t size() const { return slots_.size(); }
  bool empty() const { return slots_.empty(); }
  const SpeculationStats& speculation() const { return control_.stats(); }
  // Draft tokens per request the last step verified, at most (the adaptive k in effect).
  int64_t last_draft_tokens() const { return last_step_.k; }

 private:
  struct Slot {
    DecodeRequest request;
    model::Sampler sampler;
    Tensor logits;  // [1 + drafts, vocab]: the rows of the last step
    int64_t produced = 0;
    bool cancelled = false;
    std::vector<int32_t> fed;  // the last step's rows: the next token, then its drafts
    bool stepped = false;      // ran in the last step (not just joined)
  };
  // Samples a request's rows of the last step (speculation.h "Acceptance"); its events go to
  // `events`. Returns the next token to run, or nothing when the request ends.
  std::optional<int32_t> sample_rows(Slot& s, std::vector<TokenEvent>& events);

  model::Engine& engine_;
  DecodeOptions options_;
  std::unique_ptr<Drafter> own_drafter_;
  Drafter* drafter_ = nullptr;
  SpeculationControl control_;
  std::vector<std::unique_ptr<Slot>> slots_;
  // The last step, measured when its tokens are sampled: requests, drafts each, seconds.
  struct LastStep {
    int64_t batch = 0;
    int64_t k = 0;
    double seconds = 0.0;
  } last_step_;
};

}  // namespace dserve::decode
