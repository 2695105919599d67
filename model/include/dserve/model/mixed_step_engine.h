#pragma once
// MixedStepEngine: one engine shared by the workers of a co-located process, each driving it
// through a session of its own (an Engine). Steps that sessions post at the same time run as
// one step of the engine over all their rows -- chunked prefill piggybacked on decode, as one
// scheduler would batch them:
//   - a decode session's rows all go in, whole (a decode row is one token a user waits for);
//   - prefill sessions' rows fill what is left of max_step_tokens, in the order posted; a chunk
//     that does not fit is split, and its remainder goes first in the next step.
// A poster gets its logits when all its rows have run. A step that fails for a reason one
// poster caused (a token outside the vocabulary) is run again for each poster alone, so only
// that poster sees the error; an INTERNAL error (a device fault) fails every poster in it. A
// prefill post split over several steps that fails in a later one has had its earlier parts
// run (its requests are advanced by them): a failed prefill is given up, not retried.
//
// Mixing needs both to be posting: the session that leads a step waits up to mix_wait for a
// session that took part in the previous step and has not posted yet (a decode worker posts
// again as soon as it has turned the last step's logits into tokens).
//
// Everything else a session does (new requests, hand-offs, releases) runs between steps. Thread-
// safe: sessions may be driven from different threads; each session by one at a time.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "dserve/model/engine.h"

namespace dserve::model {

struct MixedStepOptions {
  // Rows one step of the engine takes when prefill rows fill it (decode rows are never cut).
  int64_t max_step_tokens = 512;
  // How long the session leading a step waits for one that took part in the previous step.
  std::chrono::microseconds mix_wait{2000};
  // Called after each step with its decode and prefill rows (metrics); must not call back.
  std::function<void(int64_t decode_rows, int64_t prefill_rows)> on_step;
};

enum class StepPriority {
  kDecode,   // rows go in whole, first
  kPrefill,  // rows fill what is left, split where needed
};

struct MixedStepStats {
  int64_t steps = 0;          // steps of the engine
  int64_t mixed_steps = 0;    // of them, with decode and prefill rows both
  int64_t split_chunks = 0;   // prefill chunks cut at a step's budget
  int64_t rerun_steps = 0;    // failed steps run again poster by poster
  int64_t largest_step = 0;   // rows of the largest step
  int64_t waiting_posts = 0;  // posts not yet run (now)
};

class MixedStepEngine {
 public:
  MixedStepEngine(std::unique_ptr<Engine> engine, const MixedStepOptions& options);
  ~MixedStepEngine();
  MixedStepEngine(const MixedStepEngine&) = delete;
  MixedStepEngine& operator=(const MixedStepEngine&) = delete;

  // A session: an Engine whose steps mix with the other sessions'. Requests made through a
  // session belong to it and must be destroyed before this object.
  std::unique_ptr<Engine> session(StepPriority priority);

  MixedStepStats stats() const;
  const Engine& engine() const { return *engine_; }

 private:
  class Session;
  class SharedRequest;
  struct Post;
  struct Part;

  Result<std::vector<Tensor>> post_and_wait(Session& session, std::span<const StepRows> rows);
  // Runs `fn` on the engine between steps.
  template <typename Fn>
  auto exclusive(Fn&& fn) -> decltype(fn());
  // The leader's work: which rows go in the next step (under mu_), then running them.
  std::vector<Part> plan_step();
  void run_step(std::vector<Part>& parts);
  void settle(std::vector<Part>& parts);
  static void finish(Post& post, Status status);

  std::unique_ptr<Engine> engine_;
  MixedStepOptions options_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  bool busy_ = false;  // a step or an exclusive call has the engine
  int exclusive_waiting_ = 0;
  std::deque<Post*> pending_;
  std::vector<Session*> sessions_;
  MixedStepStats stats_;
};

}  // namespace dserve::model
