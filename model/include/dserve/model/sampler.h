#pragma once
// Sampler: picks the next token from a row of logits. Greedy at temperature 0; otherwise
// temperature, then top-k, then top-p (nucleus) filtering, then a draw from a seeded
// generator, so that the same seed gives the same tokens on every machine.
// One Sampler per request; not thread-safe.

#include <cstdint>
#include <span>

#include "dserve/core/random.h"
#include "dserve/core/status.h"

namespace dserve::model {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // 1: no limit; keep the smallest set with mass >= top_p
  uint64_t seed = 0;
};

Status validate_sampling_params(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(SamplingParams params) : params_(params), rng_(params.seed) {}
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  SplitMix64 rng_;
};

// Index of the largest value; the lowest index among equals.
int32_t argmax(std::span<const float> logits);

// The logits of the ids that may be sampled: the first `sampleable_ids`, the tokenizer's
// vocabulary, which a model's embedding may pad past (V4: 128,815 ids in 129,280 rows; a
// padding id could not be decoded to text nor sent back as a prompt). 0: all of them.
std::span<const float> sampleable_logits(std::span<const float> logits, int64_t sampleable_ids);

}  // namespace dserve::model
