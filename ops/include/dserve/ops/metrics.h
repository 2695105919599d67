#pragma once
// Metrics of one dserve process: counters, gauges and histograms, each family with a name, a
// help text and label sets, kept in a MetricsRegistry and written in the Prometheus text
// exposition format 0.0.4. Names follow `dserve_<module>_<what>_<unit>` (HOUSE-STYLE.md).
//
// Hot path: Counter::inc, Gauge::set/inc/dec and Histogram::observe are lock-free atomics on
// the metric itself; only creating a metric (or a new label set) and writing the exposition take
// the registry's locks. Callers look a metric up once and keep the reference.

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dserve::ops {

// The Content-Type of text_exposition()'s output.
inline constexpr std::string_view kTextExpositionContentType =
    "text/plain; version=0.0.4; charset=utf-8";

// One label of a metric. `name` follows the Prometheus label-name rules ([a-zA-Z_][a-zA-Z0-9_]*,
// not starting with "__"; "le" is reserved for histogram buckets): a bad name is a programmer
// error and aborts. `value` is any UTF-8 text; it is escaped in the exposition.
struct Label {
  std::string name;
  std::string value;
};
using Labels = std::vector<Label>;

// A value that only goes up (requests served, bytes sent). Thread-safe, lock-free.
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // Pre: amount >= 0 and finite (a counter never goes down; anything else aborts).
  void inc(double amount = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down (queue depth, pages free). Thread-safe, lock-free.
class Gauge {
 public:
  Gauge() = default;
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void set(double value) { value_.store(value, std::memory_order_relaxed); }
  void inc(double amount = 1.0) { value_.fetch_add(amount, std::memory_order_relaxed); }
  void dec(double amount = 1.0) { value_.fetch_sub(amount, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Observations counted into fixed buckets (upper bounds given at creation, +Inf implied), with
// their sum and count. Thread-safe; observe() is one bucket increment and one sum update, both
// lock-free, no lock shared with other metrics.
class Histogram {
 public:
  // Pre: upper_bounds non-empty, finite, strictly increasing (else aborts). +Inf is implied and
  // must not be listed.
  explicit Histogram(std::span<const double> upper_bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // Counts `value` in the first bucket whose upper bound is >= value (+Inf above the last).
  // NaN lands in +Inf and makes the sum NaN, as the Prometheus client libraries do.
  void observe(double value);

  // A copy of the state. `cumulative_counts[i]` counts observations <= upper_bounds[i]; the last
  // entry (one past the bounds) is +Inf and equals `count`. Taken while others observe, the
  // buckets and count agree with each other but `sum` may include a few observations more or
  // fewer than `count`.
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;
  const std::vector<double>& upper_bounds() const { return upper_bounds_; }

 private:
  std::vector<double> upper_bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> bucket_counts_;  // [upper_bounds_.size() + 1]
  std::atomic<double> sum_{0.0};
};

// Buckets for request and step latencies in seconds, 0.5 ms to 60 s (inter-token steps sit at the
// low end, time to first token and whole requests at the high end).
std::vector<double> latency_buckets_seconds();
// `count` bounds start, start*factor, ...; pre: start > 0, factor > 1, count >= 1.
std::vector<double> exponential_buckets(double start, double factor, int count);

// Owns every metric of a process (or of a test). Thread-safe. Metrics live as long as the
// registry; the references it hands out stay valid until it is destroyed.
//
// A family is made by the first call with its name; later calls with the same name must give the
// same type, help, label names (in any order) and bucket bounds (else aborts: two call sites
// disagree about one metric), and return the metric of their label values, made on first use.
// Metric names follow [a-zA-Z_:][a-zA-Z0-9_:]*, counters end in `_total`, help is non-empty and
// no family may produce a sample name another family produces (a histogram `x` owns `x_bucket`,
// `x_sum`, `x_count`); a breach aborts.
class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  Counter& counter(std::string_view name, std::string_view help, const Labels& labels = {});
  Gauge& gauge(std::string_view name, std::string_view help, const Labels& labels = {});
  Histogram& histogram(std::string_view name, std::string_view help,
                       std::span<const double> upper_bounds, const Labels& labels = {});

  // Every family in the Prometheus text format 0.0.4: families sorted by name, each with its
  // HELP and TYPE lines, then its label sets sorted by label values (labels in the order the
  // first call gave them). Histograms write cumulative `_bucket{le=...}` lines ending with
  // le="+Inf", then `_sum` and `_count`.
  std::string text_exposition() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace dserve::ops
