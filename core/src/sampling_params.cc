#include "dserve/core/sampling_params.h"

#include <cmath>
#include <string>

namespace dserve {

Status validate_sampling_params(const SamplingParams& p, int64_t vocab) {
  std::string problems;
  for (const auto& [name, value] : {std::pair{"presence_penalty", p.presence_penalty},
                                    std::pair{"frequency_penalty", p.frequency_penalty}}) {
    if (!(value >= -kMaxPenalty && value <= kMaxPenalty)) {
      problems += std::string(name) + " must be in [-2, 2] (got " + std::to_string(value) + ")\n";
    }
  }
  if (p.logit_bias.size() > kMaxLogitBiasEntries) {
    problems += "logit_bias has " + std::to_string(p.logit_bias.size()) + " entries; at most " +
                std::to_string(kMaxLogitBiasEntries) + "\n";
  } else {
    for (const auto& [id, bias] : p.logit_bias) {
      if (id < 0 || (vocab > 0 && id >= vocab)) {
        problems += "logit_bias names token " + std::to_string(id) + ", not an id of the " +
                    (vocab > 0 ? std::to_string(vocab) + "-token " : std::string()) +
                    "vocabulary\n";
        break;
      }
      if (!(bias >= -kMaxLogitBias && bias <= kMaxLogitBias)) {
        problems += "logit_bias of token " + std::to_string(id) + " must be in [-100, 100] (got " +
                    std::to_string(bias) + ")\n";
        break;
      }
    }
  }
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    problems +=
        "temperature must be a finite number >= 0 (got " + std::to_string(p.temperature) + ")\n";
  }
  if (p.top_k < 0) problems += "top_k must be >= 0 (got " + std::to_string(p.top_k) + ")\n";
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    problems += "top_p must be in (0, 1] (got " + std::to_string(p.top_p) + ")\n";
  }
  if (problems.empty()) return Status::ok();
  problems.pop_back();
  return invalid_argument(problems);
}

}  // namespace dserve
