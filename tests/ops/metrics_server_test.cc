// MetricsServer over real HTTP on loopback; the exposition it serves is read back by
// parse-prometheus-text-format (npm), a parser dserve did not write, run by node.

#include "dserve/ops/metrics_server.h"

#include <gtest/gtest.h>
#include <httplib.h>

#include <unistd.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dserve/ops/metrics.h"

namespace dserve::ops {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* const kInstallHint =
    "run scripts/install-deps.sh (it installs node and tools/prom-parser/node_modules)";
const fs::path kParserDir = fs::path(DSERVE_SOURCE_DIR) / "tools" / "prom-parser";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string shell_quoted(const fs::path& p) {
  return "'" + p.string() + "'";
}

std::unique_ptr<MetricsServer> start_on_loopback(const MetricsRegistry& r,
                                                 MetricsServerOptions o = {}) {
  o.host = "127.0.0.1";
  auto started = MetricsServer::start(r, std::move(o));
  EXPECT_TRUE(started.is_ok()) << started.status().to_string();
  return started.is_ok() ? std::move(started).value() : nullptr;
}

class MetricsOverHttp : public ::testing::Test {
 protected:
  void SetUp() override {
    node_ = DSERVE_NODE_EXECUTABLE;
    ASSERT_FALSE(node_.empty() || !fs::exists(node_)) << "node not found; " << kInstallHint;
    ASSERT_TRUE(fs::exists(kParserDir / "node_modules" / "parse-prometheus-text-format"))
        << kParserDir / "node_modules"
        << " is missing; " << kInstallHint;
    dir_ = fs::temp_directory_path() / ("dserve_metrics_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // GET /metrics from the server, checked for status and content type.
  std::string scrape(uint16_t port) {
    httplib::Client client("127.0.0.1", port);
    client.set_connection_timeout(5, 0);
    client.set_read_timeout(5, 0);
    auto res = client.Get("/metrics");
    if (!res) {
      ADD_FAILURE() << "GET /metrics failed: " << httplib::to_string(res.error());
      return {};
    }
    EXPECT_EQ(res->status, 200);
    EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
    return res->body;
  }

  // The parser's reading of `text`: name -> family ({name, help, type, metrics}).
  std::map<std::string, json> parse(const std::string& text) {
    const fs::path in = dir_ / "metrics.prom";
    const fs::path out = dir_ / "parsed.json";
    const fs::path err = dir_ / "stderr.txt";
    std::ofstream(in, std::ios::binary) << text;
    const std::string command = shell_quoted(node_) + " " + shell_quoted(kParserDir / "parse.mjs") +
                                " < " + shell_quoted(in) + " > " + shell_quoted(out) + " 2> " +
                                shell_quoted(err);
    if (std::system(command.c_str()) != 0) {
      ADD_FAILURE() << "the parser refused the exposition:\n"
                    << read_file(err) << "\nexposition:\n"
                    << text;
      return {};
    }
    std::map<std::string, json> families;
    for (const json& f : json::parse(read_file(out)))
      families[f.at("name")] = f;
    return families;
  }

  // The sample of `family` whose labels equal `labels`.
  static json sample_with(const json& family, const json& labels) {
    for (const json& m : family.at("metrics")) {
      if (m.value("labels", json::object()) == labels) return m;
    }
    ADD_FAILURE() << "no sample with labels " << labels.dump() << " in " << family.dump();
    return json::object();
  }

  std::string node_;
  fs::path dir_;
};

TEST_F(MetricsOverHttp, ParserReadsNamesTypesLabelsAndHistogramCounts) {
  MetricsRegistry r;
  Counter& decode_requests = r.counter("dserve_gateway_requests_total", "Requests admitted.",
                                       {{"role", "gateway"}, {"pool", "decode"}});
  Counter& prefill_requests = r.counter("dserve_gateway_requests_total", "Requests admitted.",
                                        {{"role", "gateway"}, {"pool", "prefill"}});
  Gauge& queued =
      r.gauge("dserve_gateway_queued_requests", "Requests waiting.\nSecond \\ line.",
              {{"role", "gateway"}, {"note", "a \"quoted\" \\ value\nwith a line feed"}});
  Histogram& latency =
      r.histogram("dserve_gateway_request_latency_seconds",
                  "Request latency, admission to last token.", latency_buckets_seconds());
  Histogram& ttft = r.histogram("dserve_gateway_ttft_seconds", "Time to first token.",
                                std::vector<double>{0.1, 1}, {{"pool", "decode"}});
  decode_requests.inc(5);
  prefill_requests.inc(2);
  queued.set(3);
  for (double v : {0.0004, 0.003, 0.2, 7.0})
    latency.observe(v);
  ttft.observe(0.05);
  ttft.observe(0.5);

  auto server = start_on_loopback(r);
  ASSERT_NE(server, nullptr);
  EXPECT_NE(server->port(), 0);
  EXPECT_EQ(server->host(), "127.0.0.1");

  auto families = parse(scrape(server->port()));
  ASSERT_EQ(families.size(), 4u);

  const json& requests = families.at("dserve_gateway_requests_total");
  EXPECT_EQ(requests.at("type"), "COUNTER");
  EXPECT_EQ(requests.at("help"), "Requests admitted.");
  EXPECT_EQ(sample_with(requests, {{"role", "gateway"}, {"pool", "decode"}}).at("value"), "5");
  EXPECT_EQ(sample_with(requests, {{"role", "gateway"}, {"pool", "prefill"}}).at("value"), "2");

  const json& gauge = families.at("dserve_gateway_queued_requests");
  EXPECT_EQ(gauge.at("type"), "GAUGE");
  EXPECT_EQ(gauge.at("help"), "Requests waiting.\nSecond \\ line.");
  EXPECT_EQ(
      sample_with(gauge, {{"role", "gateway"}, {"note", "a \"quoted\" \\ value\nwith a line feed"}})
          .at("value"),
      "3");

  const json& hist = families.at("dserve_gateway_request_latency_seconds");
  EXPECT_EQ(hist.at("type"), "HISTOGRAM");
  ASSERT_EQ(hist.at("metrics").size(), 1u);
  json h = hist.at("metrics")[0];
  EXPECT_EQ(h.at("count"), "4");
  EXPECT_DOUBLE_EQ(std::stod(h.at("sum").get<std::string>()), 0.0004 + 0.003 + 0.2 + 7.0);
  EXPECT_EQ(h.at("buckets").size(), latency_buckets_seconds().size() + 1);
  EXPECT_EQ(h.at("buckets").at("0.0005"), "1");
  EXPECT_EQ(h.at("buckets").at("0.005"), "2");
  EXPECT_EQ(h.at("buckets").at("0.25"), "3");
  EXPECT_EQ(h.at("buckets").at("10"), "4");
  EXPECT_EQ(h.at("buckets").at("+Inf"), "4");

  // parse-prometheus-text-format 1.1.1 folds a labelled histogram's bucket lines into one
  // `buckets` object and drops its labelled _sum/_count lines; the buckets are what it keeps.
  const json& ttft_family = families.at("dserve_gateway_ttft_seconds");
  EXPECT_EQ(ttft_family.at("type"), "HISTOGRAM");
  EXPECT_EQ(ttft_family.at("metrics")[0].at("buckets"),
            (json{{"0.1", "1"}, {"1", "2"}, {"+Inf", "2"}}));

  // More observations: the next scrape shows the counts moved by exactly that much.
  for (int i = 0; i < 10; ++i)
    latency.observe(0.04);
  latency.observe(100);
  decode_requests.inc();
  families = parse(scrape(server->port()));
  h = families.at("dserve_gateway_request_latency_seconds").at("metrics")[0];
  EXPECT_EQ(h.at("count"), "15");
  EXPECT_EQ(h.at("buckets").at("0.005"), "2");
  EXPECT_EQ(h.at("buckets").at("0.05"), "12");
  EXPECT_EQ(h.at("buckets").at("60"), "14");
  EXPECT_EQ(h.at("buckets").at("+Inf"), "15");
  EXPECT_EQ(sample_with(families.at("dserve_gateway_requests_total"),
                        {{"role", "gateway"}, {"pool", "decode"}})
                .at("value"),
            "6");
}

TEST(MetricsServer, HealthzAnswersFromTheHealthCallback) {
  MetricsRegistry r;
  std::atomic<bool> healthy{true};
  MetricsServerOptions o;
  o.health = [&healthy] {
    return healthy.load() ? Status::ok() : unavailable("no decode worker reachable");
  };
  auto server = start_on_loopback(r, std::move(o));
  ASSERT_NE(server, nullptr);
  httplib::Client client("127.0.0.1", server->port());
  auto res = client.Get("/healthz");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ok\n");
  healthy = false;
  res = client.Get("/healthz");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 503);
  EXPECT_NE(res->body.find("no decode worker reachable"), std::string::npos) << res->body;
  res = client.Get("/nothing-here");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
}

TEST(MetricsServer, ListensOnlyOnTheGivenAddress) {
  MetricsRegistry r;
  auto server = start_on_loopback(r);
  ASSERT_NE(server, nullptr);
  // 127.0.0.2 is loopback too on Linux: a socket bound to 0.0.0.0 would answer there.
  httplib::Client other("127.0.0.2", server->port());
  other.set_connection_timeout(2, 0);
  EXPECT_FALSE(other.Get("/healthz"));
  httplib::Client given("127.0.0.1", server->port());
  EXPECT_TRUE(given.Get("/healthz"));
}

TEST(MetricsServer, BindFailureIsAReadableStatus) {
  MetricsRegistry r;
  auto first = start_on_loopback(r);
  ASSERT_NE(first, nullptr);
  MetricsServerOptions o;
  o.host = "127.0.0.1";
  o.port = first->port();
  auto second = MetricsServer::start(r, o);
  ASSERT_FALSE(second.is_ok());
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable);
  const std::string where = "127.0.0.1:" + std::to_string(first->port());
  EXPECT_NE(second.status().message().find(where), std::string::npos) << second.status().message();
  EXPECT_NE(second.status().message().find("in use"), std::string::npos)
      << second.status().message();

  o.host = "192.0.2.1";  // TEST-NET-1: not an address of this machine
  o.port = 0;
  auto foreign = MetricsServer::start(r, o);
  ASSERT_FALSE(foreign.is_ok());
  EXPECT_NE(foreign.status().message().find("192.0.2.1:0"), std::string::npos)
      << foreign.status().message();

  o.host = "";
  auto empty = MetricsServer::start(r, o);
  ASSERT_FALSE(empty.is_ok());
  EXPECT_EQ(empty.status().code(), StatusCode::kInvalidArgument);
}

TEST(MetricsServer, StopClosesThePortAndIsIdempotent) {
  MetricsRegistry r;
  auto server = start_on_loopback(r);
  ASSERT_NE(server, nullptr);
  const uint16_t port = server->port();
  server->stop();
  server->stop();
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(2, 0);
  EXPECT_FALSE(client.Get("/healthz"));
  // Start and stop right away, many times: no hang, no leaked thread.
  for (int i = 0; i < 20; ++i)
    ASSERT_NE(start_on_loopback(r), nullptr);
}

}  // namespace
}  // namespace dserve::ops
