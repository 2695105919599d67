#include "dserve/model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "dserve/kernels/cpu_ops.h"

namespace dserve::model {

std::span<const float> sampleable_logits(std::span<const float> logits, int64_t sampleable_ids) {
  if (sampleable_ids <= 0) return logits;
  return logits.first(std::min(logits.size(), static_cast<size_t>(sampleable_ids)));
}

int32_t argmax(std::span<const float> logits) {
  DSERVE_CHECK(!logits.empty());
  return static_cast<int32_t>(
      kernels::cpu::argmax_row(logits.data(), static_cast<int64_t>(logits.size())));
}

int32_t Sampler::sample(std::span<const float> logits) {
  const bool penalized = params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f;
  if (params_.logit_bias.empty() && !penalized) return pick(logits);
  adjusted_.assign(logits.begin(), logits.end());
  const auto size = static_cast<int32_t>(adjusted_.size());
  for (const auto& [id, bias] : params_.logit_bias) {
    if (id >= 0 && id < size) adjusted_[static_cast<size_t>(id)] += bias;
  }
  for (const auto& [id, times] : generated_) {
    if (id < size) {
      adjusted_[static_cast<size_t>(id)] -=
          params_.presence_penalty + params_.frequency_penalty * static_cast<float>(times);
    }
  }
  const int32_t token = pick(adjusted_);
  if (penalized) ++generated_[token];
  return token;
}

void Sampler::add_history(std::span<const int32_t> tokens) {
  if (params_.presence_penalty == 0.0f && params_.frequency_penalty == 0.0f) return;
  for (const int32_t t : tokens)
    ++generated_[t];
}

int32_t Sampler::pick(std::span<const float> logits) {
  if (params_.temperature == 0.0f) return argmax(logits);
  // Candidates by descending logit (lower id first among equals).
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  size_t keep = ids.size();
  if (params_.top_k > 0) keep = std::min(keep, static_cast<size_t>(params_.top_k));
  std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(keep), ids.end(),
                    by_logit);
  ids.resize(keep);

  std::vector<double> probs(keep);
  const double max_logit = logits[static_cast<size_t>(ids[0])];
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[static_cast<size_t>(ids[i])] - max_logit) / params_.temperature);
    sum += probs[i];
  }
  for (double& p : probs)
    p /= sum;
  if (params_.top_p < 1.0f) {
    double mass = 0.0;
    size_t cut = 0;
    while (cut < keep) {
      mass += probs[cut++];
      if (mass >= params_.top_p) break;
    }
    probs.resize(cut);
    ids.resize(cut);
    sum = std::accumulate(probs.begin(), probs.end(), 0.0);
    for (double& p : probs)
      p /= sum;
  }
  const double u = rng_.uniform();
  double acc = 0.0;
  for (size_t i = 0; i < probs.size(); ++i) {
    acc += probs[i];
    if (u < acc) return ids[i];
  }
  return ids.back();
}

}  // namespace dserve::model
