#pragma once
// Sampler: picks the next token from a row of logits. First the logits are adjusted: the
// request's logit_bias is added, and each token this sampler has already picked loses
// presence_penalty once and frequency_penalty per time picked (OpenAI's definitions, over the
// generated tokens). Then greedy at temperature 0; otherwise temperature, then top-k, then
// top-p (nucleus) filtering, then a draw from a seeded generator, so that the same seed gives
// the same tokens on every machine. One Sampler per request; not thread-safe.

#include <cstdint>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/core/sampling_params.h"
#include "dserve/core/status.h"

namespace dserve::model {

using dserve::kMaxLogitBias;
using dserve::kMaxLogitBiasEntries;
using dserve::kMaxPenalty;
using dserve::SamplingParams;
using dserve::validate_sampling_params;

class Sampler {
 public:
  explicit Sampler(SamplingParams params) : params_(std::move(params)), rng_(params_.seed) {}
  int32_t sample(std::span<const float> logits);
  // Counts `tokens` as generated already (for the penalties): a request placed again after a
  // failure continues with the tokens it had delivered.
  void add_history(std::span<const int32_t> tokens);

 private:
  int32_t pick(std::span<const float> logits);
  SamplingParams params_;
  SplitMix64 rng_;
  std::map<int32_t, int32_t> generated_;  // id -> times picked (only with a penalty)
  std::vector<float> adjusted_;           // the logits after bias and penalties
};

// Index of the largest value; the lowest index among equals.
int32_t argmax(std::span<const float> logits);

// The logits of the ids that may be sampled: the first `sampleable_ids`, the tokenizer's
// vocabulary, which a model's embedding may pad past (V4: 128,815 ids in 129,280 rows; a
// padding id could not be decoded to text nor sent back as a prompt). 0: all of them.
std::span<const float> sampleable_logits(std::span<const float> logits, int64_t sampleable_ids);

}  // namespace dserve::model
