#pragma once
// PrefillScheduler: the prefill worker's batching. Requests queue in arrival order; each step
// spends a token budget on them, first come first served: the oldest request gets as many of
// its remaining prompt tokens as the budget allows, the next one the rest, and so on, so that
// short prompts behind a long one still finish in the same step and a long prompt never holds
// a step for longer than the budget (chunked prefill). The chunks of one round run as one
// engine step (PrefixCache::advance_batch): several requests' rows, each weight read once. Every
// request goes through the prefix store: its longest stored prefix is restored when it is
// submitted, and the blocks it computes are stored for the next.
//
// A step is bounded in time as well as in tokens: attention over a long context makes a
// token late in a 100k-token prompt far dearer than an early one, so a fixed token budget
// alone lets one step run for seconds, and the worker (one actor) answers nothing meanwhile,
// health probes included. The step therefore computes in rounds (engine steps) of at most
// `slice_tokens` and ends after the round that passes `max_step_time` (it always computes at
// least one).
// Where a step ends changes nothing in the results: the forward is chunking-invariant.
//
// Not thread-safe: one owner (the worker's loop) calls it.

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/model/prefix_cache.h"

namespace dserve::prefill {

using Clock = std::chrono::steady_clock;

struct PrefillOptions {
  int64_t token_budget = 2048;  // prompt tokens computed per step, over all requests
  int64_t max_queued = 256;     // requests waiting or in progress
  // A step ends after the slice that passes this (0: no time bound, token_budget alone).
  std::chrono::milliseconds max_step_time{250};
  int64_t slice_tokens = 256;  // tokens computed between two looks at the clock
};

// A request that left the scheduler: its prefill (status ok) or why not.
struct PrefillOutcome {
  uint64_t id = 0;
  Status status;  // DeadlineExceeded, Cancelled (as Unavailable), or the forward's error
  std::optional<model::PrefillResult> result;
};

class PrefillScheduler {
 public:
  PrefillScheduler(model::PrefixCache& cache, PrefillOptions options);

  // Queues a prompt. ResourceExhausted when max_queued requests are queued; InvalidArgument
  // for a duplicate id, an empty prompt or a token outside the vocabulary (OutOfRange).
  Status submit(uint64_t id, std::span<const int32_t> prompt,
                std::optional<Clock::time_point> deadline = std::nullopt);
  // The request leaves at the next step with an error outcome; unknown ids are ignored.
  void cancel(uint64_t id);
  // One batch within the token budget; returns the requests that left in this step.
  std::vector<PrefillOutcome> step();

  size_t queued() const { return queue_.size(); }
  bool empty() const { return queue_.empty(); }
  // Prompt tokens computed by the last step (<= token_budget).
  int64_t last_step_tokens() const { return last_step_tokens_; }
  // Whether the last step ended on max_step_time rather than on its token budget or its work.
  bool last_step_timed_out() const { return last_step_timed_out_; }

 private:
  struct Entry {
    uint64_t id;
    model::PrefillJob job;
    std::optional<Clock::time_point> deadline;
    bool cancelled = false;
    Status status;  // set when the request fails or is ended; it leaves at the step's end
  };
  model::PrefixCache& cache_;
  PrefillOptions options_;
  std::deque<Entry> queue_;
  int64_t last_step_tokens_ = 0;
  bool last_step_timed_out_ = false;
};

}  // namespace dserve::prefill
