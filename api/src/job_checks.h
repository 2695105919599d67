#pragma once
// Checks of a GenerateJob's sampling that the model knows and the gateway does not: shared by the
// gRPC and HTTP APIs, so both refuse the same values with the same words.

#include "dserve/actors/gateway.h"
#include "dserve/core/sampling_params.h"
#include "dserve/core/status.h"

namespace dserve::api {

// InvalidArgument when the job's penalties or logit bias are out of range for a vocabulary of
// `vocab` ids (validate_sampling_params); each problem's message begins with the
// parameter's name.
inline Status check_penalties(const actors::GenerateJob& job, int64_t vocab) {
  SamplingParams p;
  p.presence_penalty = job.presence_penalty;
  p.frequency_penalty = job.frequency_penalty;
  p.logit_bias = job.logit_bias;
  return validate_sampling_params(p, vocab);
}

}  // namespace dserve::api
