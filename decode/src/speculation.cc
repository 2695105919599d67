#include "dserve/decode/speculation.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "dserve/core/check.h"

namespace dserve::decode {
namespace {

// Moving averages: each new figure weighs this much.
constexpr double kNewWeight = 0.2;
// The acceptance's memory: its sums decay by this per verified request.
constexpr double kAcceptanceDecay = 0.995;
// Steps between probes of a k next to the best: at first, and at most (the interval doubles
// after each probe that does not change the best).
constexpr int64_t kFirstProbeInterval = 32;
constexpr int64_t kLastProbeInterval = 1024;

}  // namespace

Result<std::vector<std::vector<int32_t>>> MtpDrafter::draft(std::span<const Request> requests,
                                                            int64_t sampleable_ids) {
  std::vector<model::DraftRows> rows;
  rows.reserve(requests.size());
  for (const Request& r : requests)
    rows.push_back({r.request, r.next_token, r.count});
  return engine_.draft(rows, sampleable_ids);
}

Result<std::vector<std::vector<int32_t>>> ContinuationDrafter::draft(
    std::span<const Request> requests, int64_t sampleable_ids) {
  std::vector<std::vector<int32_t>> out(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    auto it = continuations_.find(r.id);
    if (it == continuations_.end()) continue;
    const std::vector<int32_t>& truth = it->second;
    for (int64_t j = 0; j < r.count; ++j) {
      const auto at = static_cast<size_t>(r.index + 1 + j);
      if (at >= truth.size()) break;
      const int32_t right = truth[at];
      const int64_t ids = sampleable_ids > 1 ? sampleable_ids : 2;
      out[i].push_back(rng_.uniform() < p_ ? right : static_cast<int32_t>((right + 1) % ids));
    }
  }
  return out;
}

SpeculationControl::SpeculationControl(int64_t max_tokens, bool adaptive)
    : max_tokens_(max_tokens), adaptive_(adaptive) {
  DSERVE_CHECK_MSG(max_tokens >= 0 && max_tokens <= model::kMaxDraftTokens,
                   "speculative tokens outside 0..kMaxDraftTokens");
  stats_.acceptance = accepted_ / trials_;
}

size_t SpeculationControl::bucket(int64_t batch) {
  const auto width =
      static_cast<size_t>(std::bit_width(static_cast<uint64_t>(std::max<int64_t>(1, batch))));
  return std::min(width - 1, SpeculationStats::kBuckets - 1);
}

double SpeculationControl::expected_tokens(double a, int64_t k) {
  double sum = 0.0, term = 1.0;
  for (int64_t i = 0; i <= k; ++i) {
    sum += term;
    term *= a;
  }
  return sum;
}

int64_t SpeculationControl::choose(int64_t batch) {
  if (max_tokens_ == 0 || !adaptive_) return max_tokens_;
  Bucket& bk = buckets_[bucket(batch)];
  const auto measured = [&](int64_t k) { return bk.measured[static_cast<size_t>(k)]; };
  // First none, then one draft: the cheapest probes.
  if (!measured(0)) return 0;
  if (!measured(1)) return 1;
  const double a = accepted_ / trials_;
  const auto rate = [&](int64_t k) {
    return expected_tokens(a, k) / bk.seconds_per_request[static_cast<size_t>(k)];
  };
  int64_t best = 0, largest = 0;
  for (int64_t k = 0; k <= max_tokens_ && measured(k); ++k) {
    largest = k;
    if (rate(k) > rate(best)) best = k;
  }
  // One more draft is worth a probe while the most drafts measured are the best.
  if (best == largest && largest < max_tokens_) return largest + 1;
  if (best != bk.best) {
    bk.best = best;
    bk.probe_every = kFirstProbeInterval;
    bk.until_probe = kFirstProbeInterval;
  }
  // Now and then a neighbour of the best, so that the figures follow the workload; each probe
  // that changes nothing waits twice as long for the next, so that a k that never pays costs
  // almost nothing.
  if (--bk.until_probe > 0) return best;
  bk.probe_every = std::min(bk.probe_every * 2, kLastProbeInterval);
  bk.until_probe = bk.probe_every;
  bk.probe_up = !bk.probe_up;
  const bool up = best == 0 || (bk.probe_up && best < max_tokens_);
  return up ? best + 1 : best - 1;
}

void SpeculationControl::record_step(int64_t batch, int64_t k, double seconds, int64_t committed) {
  if (max_tokens_ == 0 || batch <= 0 || seconds <= 0.0) return;
  DSERVE_CHECK(k >= 0 && k <= max_tokens_);
  const size_t b = bucket(batch);
  const auto ki = static_cast<size_t>(k);
  const double per_request = seconds / static_cast<double>(batch);
  const double rate = static_cast<double>(committed) / seconds;
  Bucket& bk = buckets_[b];
  double& avg = bk.seconds_per_request[ki];
  double& shown = stats_.tokens_per_second[b][ki];
  if (!bk.measured[ki]) {
    avg = per_request;
    shown = rate;
    bk.measured[ki] = true;
  } else {
    avg += kNewWeight * (per_request - avg);
    shown += kNewWeight * (rate - shown);
  }
  if (k > 0) ++stats_.steps;
}

void SpeculationControl::record_verify(int64_t drafted, int64_t accepted) {
  DSERVE_CHECK(accepted >= 0 && accepted <= drafted);
  if (drafted == 0) return;
  accepted_ = accepted_ * kAcceptanceDecay + static_cast<double>(accepted);
  trials_ = trials_ * kAcceptanceDecay + static_cast<double>(accepted + (accepted < drafted));
  stats_.acceptance = accepted_ / trials_;
  ++stats_.request_steps;
  stats_.drafted += drafted;
  stats_.accepted += accepted;
  stats_.tokens += accepted + 1;
}

}  // namespace dserve::decode
