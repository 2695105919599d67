#pragma once
// Speculative decoding on a decode batch: who proposes the draft tokens (Drafter), and how many
// to propose each step (SpeculationControl).
//
// Acceptance. A step feeds each request its next token and k draft tokens; the engine returns
// the logits of every row. The request's own sampler then samples the rows in order, exactly as
// it would without speculation, and a draft is accepted while it equals the token sampled at its
// row; the first token that differs is kept as the next token and the rest is taken back
// (Engine::rewind). Drafts are point guesses (the MTP block's argmax), for which this is
// speculative (rejection) sampling itself: a draft d is accepted with probability p(d), and a
// rejection leaves the token drawn from p given that it is not d, the residual distribution.
// So the output is the target's distribution, and more: the same seed gives the same tokens
// with speculation on or off (greedy or sampled, penalties included), since each committed
// token consumes the sampler's draws in the same order.
//
// How many. Speculation pays when the tokens it commits per step outgrow what the extra rows
// cost: at batch 1 a step reads every weight for one row and verifying four costs little more;
// at a large batch the step is compute-bound and every rejected row is lost work. The control
// measures the acceptance (the chance that a draft is accepted after an accepted one) and, per
// batch size (powers of two), the time of a step (drafting included) with each k it has run,
// and picks the k with the most expected committed tokens per second: k = 0 when nothing pays.
// It probes upwards from k = 0 only while more drafts keep paying, and probes a neighbour of the
// best now and then, less often each time that changes nothing (every 32 steps, doubling to
// 1,024), so that a k that never pays costs almost nothing.

#include <array>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/core/status.h"
#include "dserve/model/engine.h"

namespace dserve::decode {

// Proposes draft tokens for requests of a batch.
class Drafter {
 public:
  virtual ~Drafter() = default;
  struct Request {
    uint64_t id = 0;
    model::EngineRequest* request = nullptr;
    int32_t next_token = 0;  // sampled, not yet run: the drafts follow it
    int64_t index = 0;       // next_token's place in the request's output (0 = first)
    int64_t count = 0;       // drafts wanted (<= model::kMaxDraftTokens)
  };
  // Element i: at most requests[i].count tokens (fewer or none is allowed).
  virtual Result<std::vector<std::vector<int32_t>>> draft(std::span<const Request> requests,
                                                          int64_t sampleable_ids) = 0;
};

// The engine's MTP block (Engine::draft).
class MtpDrafter final : public Drafter {
 public:
  explicit MtpDrafter(model::Engine& engine) : engine_(engine) {}
  Result<std::vector<std::vector<int32_t>>> draft(std::span<const Request> requests,
                                                  int64_t sampleable_ids) override;

 private:
  model::Engine& engine_;
};

// Proposes a known continuation of each request (its output from index 0, by request id), each
// draft right with probability p and otherwise a wrong token, from a seeded generator. It knows
// the answer, so it is no drafter for serving: it measures what the verify path allows at a
// given acceptance (benchmarks, tests).
class ContinuationDrafter final : public Drafter {
 public:
  ContinuationDrafter(std::map<uint64_t, std::vector<int32_t>> continuations, double p,
                      uint64_t seed)
      : continuations_(std::move(continuations)), p_(p), rng_(seed) {}
  Result<std::vector<std::vector<int32_t>>> draft(std::span<const Request> requests,
                                                  int64_t sampleable_ids) override;

 private:
  std::map<uint64_t, std::vector<int32_t>> continuations_;
  double p_;
  SplitMix64 rng_;
};

// What speculation did, for status, metrics and benchmarks.
struct SpeculationStats {
  int64_t steps = 0;          // steps that verified drafts
  int64_t request_steps = 0;  // requests in those steps, summed
  int64_t drafted = 0;        // draft tokens verified
  int64_t accepted = 0;       // of them, accepted
  int64_t tokens = 0;         // tokens those request-steps committed (accepted + one each)
  double acceptance = 0.0;    // the control's current estimate of the chance per draft
  // Mean tokens committed per request per verify step (1 = nothing accepted).
  double acceptance_length() const {
    return request_steps == 0 ? 0.0 : static_cast<double>(tokens) / request_steps;
  }
  // Per batch-size bucket (1, 2-3, 4-7, ...) and k: committed tokens per second measured (0:
  // not measured), the speed with and without speculation.
  static constexpr size_t kBuckets = 8;
  std::array<std::array<double, model::kMaxDraftTokens + 1>, kBuckets> tokens_per_second{};
};

class SpeculationControl {
 public:
  // max_tokens: the most drafts per request per step (0: off); adaptive: choose per step, else
  // always max_tokens.
  SpeculationControl(int64_t max_tokens, bool adaptive);

  // The draft count for the next step of a batch of `batch` requests.
  int64_t choose(int64_t batch);
  // A step of `batch` requests that ran with `k` drafts each: its time (drafting and verifying)
  // and the tokens it committed.
  void record_step(int64_t batch, int64_t k, double seconds, int64_t committed);
  // One request's verification: drafts verified, and how many were accepted.
  void record_verify(int64_t drafted, int64_t accepted);

  const SpeculationStats& stats() const { return stats_; }
  int64_t max_tokens() const { return max_tokens_; }

 private:
  static size_t bucket(int64_t batch);
  // Expected tokens committed per request with k drafts at acceptance a.
  static double expected_tokens(double a, int64_t k);

  int64_t max_tokens_;
  bool adaptive_;
  // Per batch-size bucket: per k a moving average of step seconds per request and whether it
  // was measured; the best k and when to probe next to it.
  struct Bucket {
    std::array<double, model::kMaxDraftTokens + 1> seconds_per_request{};
    std::array<bool, model::kMaxDraftTokens + 1> measured{};
    int64_t best = -1;
    int64_t probe_every = 0;
    int64_t until_probe = 0;
    bool probe_up = false;
  };
  std::array<Bucket, SpeculationStats::kBuckets> buckets_{};
  // The acceptance: moving sums of accepted drafts and of trials (accepted, plus one for a
  // rejection), with a prior of 1 in 2.
  double accepted_ = 1.0;
  double trials_ = 2.0;
  SpeculationStats stats_;
};

}  // namespace dserve::decode
