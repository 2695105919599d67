// The metric types and bucket layouts; the registry and its exposition are in registry.cc.

#include "dserve/ops/metrics.h"

#include <algorithm>
#include <cmath>

#include "dserve/core/check.h"

namespace dserve::ops {

void Counter::inc(double amount) {
  DSERVE_CHECK_MSG(amount >= 0 && std::isfinite(amount),
                   "a counter only goes up by a finite amount");
  value_.fetch_add(amount, std::memory_order_relaxed);
}

Histogram::Histogram(std::span<const double> upper_bounds)
    : upper_bounds_(upper_bounds.begin(), upper_bounds.end()),
      bucket_counts_(std::make_unique<std::atomic<uint64_t>[]>(upper_bounds.size() + 1)) {
  DSERVE_CHECK_MSG(!upper_bounds_.empty(), "a histogram needs at least one bucket bound");
  for (size_t i = 0; i < upper_bounds_.size(); ++i) {
    DSERVE_CHECK_MSG(std::isfinite(upper_bounds_[i]), "bucket bounds are finite (+Inf is implied)");
    DSERVE_CHECK_MSG(i == 0 || upper_bounds_[i - 1] < upper_bounds_[i],
                     "bucket bounds are strictly increasing");
  }
}

void Histogram::observe(double value) {
  // First bound >= value: Prometheus buckets are "less than or equal" (le). NaN compares false
  // with every bound and so lands in +Inf.
  const auto it = std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value);
  const auto bucket = static_cast<size_t>(it - upper_bounds_.begin());
  bucket_counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.upper_bounds = upper_bounds_;
  s.cumulative_counts.resize(upper_bounds_.size() + 1);
  // The count is derived from the buckets (not kept apart) so the +Inf bucket and _count always
  // agree, even while other threads observe.
  uint64_t running = 0;
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    running += bucket_counts_[i].load(std::memory_order_relaxed);
    s.cumulative_counts[i] = running;
  }
  s.count = running;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> latency_buckets_seconds() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

std::vector<double> exponential_buckets(double start, double factor, int count) {
  DSERVE_CHECK(start > 0 && factor > 1 && count >= 1);
  std::vector<double> bounds;
  bounds.reserve(static_cast<size_t>(count));
  double bound = start;
  for (int i = 0; i < count; ++i, bound *= factor)
    bounds.push_back(bound);
  return bounds;
}

}  // namespace dserve::ops
