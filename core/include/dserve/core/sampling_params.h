#pragma once
// SamplingParams: how a request's next tokens are picked (model/sampler.h's Sampler applies
// them), with the limits every entry point checks (the gRPC and OpenAI APIs, the decode
// worker) before a request runs. Here, below every module, so that the API checks a request
// without linking the model.

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "dserve/core/status.h"

namespace dserve {

inline constexpr size_t kMaxLogitBiasEntries = 300;  // as OpenAI's API
inline constexpr float kMaxPenalty = 2.0f;           // penalties lie in [-2, 2]
inline constexpr float kMaxLogitBias = 100.0f;       // biases lie in [-100, 100]

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // 1: no limit; keep the smallest set with mass >= top_p
  uint64_t seed = 0;
  float presence_penalty = 0.0f;   // subtracted from a generated token's logit once
  float frequency_penalty = 0.0f;  // subtracted per time the token was generated
  std::vector<std::pair<int32_t, float>> logit_bias{};  // (id, added to its logit)
};

// InvalidArgument naming every parameter out of range. `vocab` > 0 also bounds logit_bias ids.
Status validate_sampling_params(const SamplingParams& params, int64_t vocab = 0);

}  // namespace dserve
