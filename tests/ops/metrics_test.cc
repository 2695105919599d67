// The metrics registry and its Prometheus text exposition (format 0.0.4), without HTTP.

#include "dserve/ops/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <thread>
#include <vector>

namespace dserve::ops {
namespace {

TEST(Metrics, ExactTextForSmallRegistry) {
  MetricsRegistry r;
  r.counter("dserve_gateway_requests_total", "Requests the gateway admitted.",
            {{"role", "gateway"}, {"pool", "decode"}})
      .inc(3);
  // Labels given in another order land in the same family order; values sort the label sets.
  r.counter("dserve_gateway_requests_total", "Requests the gateway admitted.",
            {{"pool", "prefill"}, {"role", "gateway"}})
      .inc();
  r.gauge("dserve_decode_batch_requests", "Requests in the running decode batch.").set(7.5);
  Histogram& h = r.histogram("dserve_gateway_ttft_seconds", "Time to first token.",
                             std::vector<double>{0.1, 0.5, 1}, {{"pool", "decode"}});
  h.observe(0.05);
  h.observe(0.1);  // le is inclusive
  h.observe(0.7);
  h.observe(3);

  EXPECT_EQ(r.text_exposition(),
            "# HELP dserve_decode_batch_requests Requests in the running decode batch.\n"
            "# TYPE dserve_decode_batch_requests gauge\n"
            "dserve_decode_batch_requests 7.5\n"
            "# HELP dserve_gateway_requests_total Requests the gateway admitted.\n"
            "# TYPE dserve_gateway_requests_total counter\n"
            "dserve_gateway_requests_total{role=\"gateway\",pool=\"decode\"} 3\n"
            "dserve_gateway_requests_total{role=\"gateway\",pool=\"prefill\"} 1\n"
            "# HELP dserve_gateway_ttft_seconds Time to first token.\n"
            "# TYPE dserve_gateway_ttft_seconds histogram\n"
            "dserve_gateway_ttft_seconds_bucket{pool=\"decode\",le=\"0.1\"} 2\n"
            "dserve_gateway_ttft_seconds_bucket{pool=\"decode\",le=\"0.5\"} 2\n"
            "dserve_gateway_ttft_seconds_bucket{pool=\"decode\",le=\"1\"} 3\n"
            "dserve_gateway_ttft_seconds_bucket{pool=\"decode\",le=\"+Inf\"} 4\n"
            "dserve_gateway_ttft_seconds_sum{pool=\"decode\"} 3.85\n"
            "dserve_gateway_ttft_seconds_count{pool=\"decode\"} 4\n");
}

TEST(Metrics, SameNameAndLabelsIsTheSameMetric) {
  MetricsRegistry r;
  Counter& a = r.counter("x_total", "x", {{"k", "v"}});
  Counter& b = r.counter("x_total", "x", {{"k", "v"}});
  Counter& c = r.counter("x_total", "x", {{"k", "w"}});
  EXPECT_EQ(&a, &b);
  EXPECT_NE(&a, &c);
  a.inc(2);
  b.inc(0.5);
  EXPECT_EQ(a.value(), 2.5);
  EXPECT_EQ(c.value(), 0);
}

TEST(Metrics, LabelValuesAndHelpAreEscaped) {
  MetricsRegistry r;
  r.gauge("g", "Help with a \\ backslash,\na line feed and \"quotes\".",
          {{"path", "C:\\DIR\\FILE.TXT"}, {"error", "Cannot find file:\n\"FILE.TXT\""}})
      .set(-1);
  EXPECT_EQ(
      r.text_exposition(),
      "# HELP g Help with a \\\\ backslash,\\na line feed and \"quotes\".\n"
      "# TYPE g gauge\n"
      "g{path=\"C:\\\\DIR\\\\FILE.TXT\",error=\"Cannot find file:\\n\\\"FILE.TXT\\\"\"} -1\n");
}

// Numbers as the Prometheus Go client writes them (strconv.FormatFloat(v, 'g', -1, 64)).
TEST(Metrics, NumbersAsPrometheusSpellsThem) {
  MetricsRegistry r;
  r.gauge("a", "a").set(std::numeric_limits<double>::infinity());
  r.gauge("b", "b").set(-std::numeric_limits<double>::infinity());
  r.gauge("c", "c").set(std::nan(""));
  r.gauge("d", "d").set(0.1 + 0.2);
  r.gauge("e", "e").set(1e21);
  r.gauge("f", "f").set(123456789);
  r.gauge("g", "g").set(100000);
  r.gauge("h", "h").set(0.0005);
  r.gauge("i", "i").set(0.00001);
  r.gauge("j", "j").set(-2.5e-7);
  const std::string text = r.text_exposition();
  EXPECT_NE(text.find("\na +Inf\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nb -Inf\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nc NaN\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nd 0.30000000000000004\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\ne 1e+21\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nf 1.23456789e+08\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\ng 100000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nh 0.0005\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\ni 1e-05\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nj -2.5e-07\n"), std::string::npos) << text;
}

TEST(Metrics, HistogramBucketsAreCumulativeWithInf) {
  Histogram h(latency_buckets_seconds());
  for (double v : {0.0001, 0.0005, 0.0006, 0.02, 0.02, 7.0, 59.0, 61.0, 1e9})
    h.observe(v);
  const Histogram::Snapshot s = h.snapshot();
  ASSERT_EQ(s.cumulative_counts.size(), s.upper_bounds.size() + 1);
  for (size_t i = 1; i < s.cumulative_counts.size(); ++i) {
    EXPECT_LE(s.cumulative_counts[i - 1], s.cumulative_counts[i]);
  }
  EXPECT_EQ(s.cumulative_counts.front(), 2u);                     // 0.0001 and 0.0005 (le 0.0005)
  EXPECT_EQ(s.cumulative_counts[1], 3u);                          // + 0.0006 (le 0.001)
  EXPECT_EQ(s.cumulative_counts[s.upper_bounds.size() - 1], 7u);  // le 60
  EXPECT_EQ(s.cumulative_counts.back(), 9u);                      // +Inf
  EXPECT_EQ(s.count, 9u);
  EXPECT_DOUBLE_EQ(s.sum, 0.0001 + 0.0005 + 0.0006 + 0.04 + 7 + 59 + 61 + 1e9);
}

TEST(Metrics, BucketHelpers) {
  const std::vector<double> lat = latency_buckets_seconds();
  ASSERT_FALSE(lat.empty());
  for (size_t i = 1; i < lat.size(); ++i)
    EXPECT_LT(lat[i - 1], lat[i]);
  EXPECT_EQ(exponential_buckets(1024, 4, 4), (std::vector<double>{1024, 4096, 16384, 65536}));
}

TEST(Metrics, ConcurrentUpdatesGiveExactTotals) {
  MetricsRegistry r;
  constexpr int kThreads = 8;
  constexpr int kPerThread = 50000;
  const std::vector<double> bounds{1, 2, 3};
  // One metric exists before the threads start, so the expositions below are never empty
  // even if they all run before any thread has registered its own.
  r.counter("started_total", "registered before the threads").inc();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&r, &bounds, t] {
      // Half the threads share one label set, half use their own; all look the metric up
      // themselves, racing the creation too.
      const std::string pool = t % 2 == 0 ? "shared" : "own" + std::to_string(t);
      Histogram& h = r.histogram("h_seconds", "h", bounds, {{"pool", "shared"}});
      Counter& c = r.counter("c_total", "c", {{"pool", pool}});
      Gauge& g = r.gauge("g", "g");
      for (int i = 0; i < kPerThread; ++i) {
        h.observe(static_cast<double>(i % 4) + 0.5);  // 0.5, 1.5, 2.5, 3.5: one per bucket
        c.inc();
        g.inc();
        g.dec(0.5);
      }
    });
  }
  // The exposition runs while the threads observe: it must not block them or crash.
  for (int i = 0; i < 20; ++i)
    EXPECT_FALSE(r.text_exposition().empty());
  for (auto& th : threads)
    th.join();

  const Histogram::Snapshot s =
      r.histogram("h_seconds", "h", bounds, {{"pool", "shared"}}).snapshot();
  constexpr uint64_t kTotal = uint64_t{kThreads} * kPerThread;
  EXPECT_EQ(s.count, kTotal);
  EXPECT_EQ(s.cumulative_counts,
            (std::vector<uint64_t>{kTotal / 4, kTotal / 2, kTotal * 3 / 4, kTotal}));
  EXPECT_EQ(s.sum, (0.5 + 1.5 + 2.5 + 3.5) * (kTotal / 4));
  EXPECT_EQ(r.counter("c_total", "c", {{"pool", "shared"}}).value(), kTotal / 2);
  EXPECT_EQ(r.counter("c_total", "c", {{"pool", "own1"}}).value(), kPerThread);
  EXPECT_EQ(r.gauge("g", "g").value(), kTotal * 0.5);
}

using MetricsDeathTest = ::testing::Test;

TEST_F(MetricsDeathTest, BadNamesAndDisagreementsAbortWithTheInvariant) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  MetricsRegistry r;
  EXPECT_DEATH(r.gauge("9lives", "h"), "metric name matches");
  EXPECT_DEATH(r.gauge("has-dash", "h"), "metric name matches");
  EXPECT_DEATH(r.gauge("", "h"), "metric name matches");
  EXPECT_DEATH(r.counter("requests", "h"), "ends in _total");
  EXPECT_DEATH(r.gauge("g", ""), "help text");
  EXPECT_DEATH(r.gauge("g", "h", {{"bad-label", "v"}}), "label name 'bad-label'");
  EXPECT_DEATH(r.gauge("g", "h", {{"__reserved", "v"}}), "label name '__reserved'");
  EXPECT_DEATH(r.gauge("g", "h", {{"a", "1"}, {"a", "2"}}), "given twice");
  EXPECT_DEATH(r.histogram("h", "h", std::vector<double>{1}, {{"le", "1"}}), "reserved");
  EXPECT_DEATH(r.histogram("h", "h", std::vector<double>{2, 1}), "strictly increasing");
  EXPECT_DEATH(r.histogram("h", "h", std::vector<double>{}), "at least one bucket");
  EXPECT_DEATH(
      r.histogram("h", "h", std::vector<double>{1, std::numeric_limits<double>::infinity()}),
      "finite");

  r.gauge("g", "h", {{"a", "1"}});
  EXPECT_DEATH(r.counter("g", "h"), "_total");
  EXPECT_DEATH(r.histogram("g", "h", std::vector<double>{1}), "already registered as a gauge");
  EXPECT_DEATH(r.gauge("g", "other help", {{"a", "1"}}), "another help text");
  EXPECT_DEATH(r.gauge("g", "h", {{"b", "1"}}), "other label names");
  r.histogram("lat_seconds", "h", std::vector<double>{1, 2});
  EXPECT_DEATH(r.histogram("lat_seconds", "h", std::vector<double>{1, 3}), "other bucket bounds");
  EXPECT_DEATH(r.gauge("lat_seconds_count", "h"), "already taken by 'lat_seconds'");
  r.gauge("q_sum", "h");
  EXPECT_DEATH(r.histogram("q", "h", std::vector<double>{1}), "'q_sum' is already taken");
  EXPECT_DEATH(r.counter("c_total", "h").inc(-1), "only goes up");
}

}  // namespace
}  // namespace dserve::ops
