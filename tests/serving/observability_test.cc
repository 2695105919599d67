// Operating a real cluster (gateway + 1 prefill + 1 decode over loopback): JSON event logs that
// carry the client's request id in every process, /metrics on every process read by a
// Prometheus text parser nobody here wrote (tools/prom-parser), and the prefix store's disk
// tier (--kv-disk-path) holding RocksDB files after requests were served. Also the --kv-* flag
// errors a person sees.

#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

namespace fs = std::filesystem;
using testing_support::ClusterOptions;
using testing_support::ServeCluster;
using testing_support::ServeProcess;
using Json = nlohmann::json;

using testing_support::CommandResult;

CommandResult run(const std::string& cmd) {
  return testing_support::run_command(cmd);
}

// One scrape of a process's /metrics, parsed by parse-prometheus-text-format.
class Scrape {
 public:
  explicit Scrape(uint16_t port) {
    httplib::Client client("127.0.0.1", port);
    auto res = client.Get("/metrics");
    if (!res || res->status != 200) {
      error_ = "GET /metrics on port " + std::to_string(port) + " failed";
      return;
    }
    text_ = res->body;
    const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/prom-parser";
    const std::string file =
        ::testing::TempDir() + "/dserve-obs-metrics-" + std::to_string(::getpid()) + ".txt";
    if (std::FILE* f = std::fopen(file.c_str(), "w")) {
      std::fwrite(text_.data(), 1, text_.size(), f);
      std::fclose(f);
    }
    const CommandResult parsed = run("node " + tool + "/parse.mjs < " + file + " 2>&1");
    fs::remove(file);
    families_ = Json::parse(parsed.output, nullptr, false);
    if (parsed.exit_code != 0 || families_.is_discarded() || !families_.is_array()) {
      error_ = "the Prometheus parser refused the exposition: " + parsed.output;
      families_ = Json::array();
    }
  }

  const std::string& error() const { return error_; }
  const std::string& text() const { return text_; }

  const Json* family(const std::string& name) const {
    for (const auto& f : families_) {
      if (f["name"] == name) return &f;
    }
    return nullptr;
  }
  // A counter's or gauge's value with exactly `labels` (none: {}); -1 when absent.
  double value(const std::string& name, const Json& labels = Json::object()) const {
    const Json* f = family(name);
    if (f == nullptr) return -1;
    for (const auto& m : (*f)["metrics"]) {
      const Json have = m.contains("labels") ? m["labels"] : Json::object();
      if (have == labels) return std::stod(m["value"].get<std::string>());
    }
    return -1;
  }
  // A histogram's observation count (no labels); -1 when absent.
  double count(const std::string& name) const {
    const Json* f = family(name);
    if (f == nullptr || (*f)["type"] != "HISTOGRAM" || (*f)["metrics"].empty()) return -1;
    return std::stod((*f)["metrics"][0]["count"].get<std::string>());
  }

 private:
  std::string error_;
  std::string text_;
  Json families_ = Json::array();
};

Json tier(const char* name) {
  return Json{{"tier", name}};
}

// Polls `check` on fresh scrapes of `port` for up to 10 s; the last scrape.
Scrape scrape_until(uint16_t port, const std::function<bool(const Scrape&)>& check) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    Scrape s(port);
    if (check(s) || std::chrono::steady_clock::now() >= until) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// Every line of a log file as JSON; a line that is not JSON is a test failure.
std::vector<Json> read_json_lines(const fs::path& path) {
  std::vector<Json> lines;
  std::ifstream in(path);
  size_t n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    Json j = Json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << path << " line " << n << " is not JSON: " << line;
    if (j.is_discarded()) continue;
    for (const char* key : {"ts", "level", "process", "event"})
      EXPECT_TRUE(j.contains(key) && j[key].is_string()) << path << " line " << n << ": " << line;
    lines.push_back(std::move(j));
  }
  return lines;
}

// The events of `lines` that carry `request_id`, in order.
std::vector<Json> of_request(const std::vector<Json>& lines, const std::string& request_id) {
  std::vector<Json> out;
  for (const auto& j : lines) {
    if (j.value("request_id", "") == request_id) out.push_back(j);
  }
  return out;
}

std::set<std::string> events(const std::vector<Json>& lines) {
  std::set<std::string> out;
  for (const auto& j : lines)
    out.insert(j["event"].get<std::string>());
  return out;
}

const Json* first_event(const std::vector<Json>& lines, const std::string& event) {
  for (const auto& j : lines) {
    if (j["event"] == event) return &j;
  }
  return nullptr;
}

TEST(Observability, RequestIdInEveryLogMetricsOnEveryProcessAndADiskTier) {
  const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/prom-parser";
  ASSERT_TRUE(fs::exists(tool + "/node_modules/parse-prometheus-text-format"))
      << "the Prometheus parser is not installed: run scripts/install-deps.sh";
  const fs::path dir =
      fs::path(::testing::TempDir()) / ("dserve-observability-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path gateway_log = dir / "gateway.jsonl";
  const fs::path prefill_log = dir / "prefill.jsonl";
  const fs::path decode_log = dir / "decode.jsonl";
  const fs::path kv_dir = dir / "kv" / "prefill-0";  // created by the prefill process

  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  auto ops_args = [](const fs::path& log, const char* name) {
    return std::vector<std::string>{"--log-format",   "json", "--log-file",       log.string(),
                                    "--process-name", name,   "--metrics-listen", "127.0.0.1:0"};
  };
  o.prefill_args = ops_args(prefill_log, "prefill-0");
  o.prefill_args.insert(o.prefill_args.end(), {"--kv-disk-path", kv_dir.string(), "--kv-disk-mib",
                                               "64", "--kv-write-queue-mib", "16"});
  o.decode_args = ops_args(decode_log, "decode-0");
  o.gateway_args = ops_args(gateway_log, "gateway");
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const ServeProcess& prefill = *cluster.prefill[0];
  const ServeProcess& decode = *cluster.decode[0];
  for (const ServeProcess* p :
       {static_cast<const ServeProcess*>(cluster.gateway.get()), &prefill, &decode})
    ASSERT_NE(p->metrics_port(), 0) << p->role() << " printed no metrics address\n"
                                    << cluster.logs();

  // Before any request: the families exist, nothing has been counted.
  {
    const Scrape pre(prefill.metrics_port());
    ASSERT_EQ(pre.error(), "") << pre.text();
    EXPECT_EQ(pre.count("dserve_prefill_step_duration_seconds"), 0) << pre.text();
    EXPECT_EQ(pre.count("dserve_prefill_step_tokens"), 0);
    EXPECT_EQ(pre.value("dserve_kv_store_hit_tokens_total"), 0);
    for (const char* t : {"device", "host", "disk"}) {
      EXPECT_EQ(pre.value("dserve_kv_store_tier_bytes", tier(t)), 0) << t << "\n" << pre.text();
      EXPECT_EQ(pre.value("dserve_kv_store_tier_hit_tokens_total", tier(t)), 0) << t;
    }
    const Scrape dec(decode.metrics_port());
    ASSERT_EQ(dec.error(), "") << dec.text();
    EXPECT_EQ(dec.count("dserve_decode_step_duration_seconds"), 0) << dec.text();
    EXPECT_EQ(dec.count("dserve_decode_batch_size"), 0);
    EXPECT_EQ(dec.value("dserve_decode_handoffs_total", {{"outcome", "accepted"}}), 0);
    EXPECT_GT(dec.value("dserve_decode_kv_budget_free_bytes"), 0);
  }

  // The same 300-token prompt twice (two whole 128-token blocks to reuse), greedy, each with a
  // request id of the client's.
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();
  const std::vector<actors::TokenId> prompt = testing_support::random_prompt(300, 20261130);
  const uint32_t max_tokens = 6;
  const auto expected = testing_support::reference_tokens(prompt, max_tokens);
  const std::vector<std::string> ids = {"obs-first-" + std::to_string(::getpid()),
                                        "obs-second-" + std::to_string(::getpid())};
  for (const std::string& id : ids) {
    v1::GenerateRequest req = testing_support::request_for(prompt, max_tokens);
    req.set_request_id(id);
    auto done = (*client)->generate(req, {}, std::chrono::minutes(2));
    ASSERT_TRUE(done.is_ok()) << id << ": " << done.status().to_string() << "\n" << cluster.logs();
    EXPECT_EQ(done->tokens, expected) << id;
  }

  // (b) The metrics moved, read back by the parser. The store's counters and gauges are
  // refreshed after every step and on the gateway's health probes (every 250 ms).
  const Scrape pre = scrape_until(prefill.metrics_port(), [](const Scrape& s) {
    return s.value("dserve_kv_store_hit_tokens_total") > 0 &&
           s.value("dserve_kv_store_tier_bytes", tier("disk")) > 0;
  });
  ASSERT_EQ(pre.error(), "") << pre.text();
  EXPECT_GE(pre.count("dserve_prefill_step_duration_seconds"), 2) << pre.text();
  EXPECT_GE(pre.count("dserve_prefill_step_tokens"), 2);
  EXPECT_EQ(pre.value("dserve_prefill_requests_total", {{"outcome", "done"}}), 2);
  EXPECT_EQ(pre.count("dserve_prefill_kv_transfer_seconds"), 2);
  EXPECT_GT(pre.value("dserve_prefill_kv_transfer_bytes_total"), 0);
  EXPECT_EQ(pre.value("dserve_prefill_handoffs_rejected_total"), 0);
  EXPECT_EQ(pre.value("dserve_prefill_queued_requests"), 0);
  EXPECT_EQ(pre.value("dserve_prefill_queued_tokens"), 0);
  // The second lookup reused both whole blocks (256 tokens) from the device tier.
  EXPECT_GE(pre.value("dserve_kv_store_lookups_total"), 2);
  EXPECT_GE(pre.value("dserve_kv_store_hits_total"), 1);
  EXPECT_GE(pre.value("dserve_kv_store_lookup_tokens_total"), 512);
  EXPECT_EQ(pre.value("dserve_kv_store_hit_tokens_total"), 256) << pre.text();
  EXPECT_EQ(pre.value("dserve_kv_store_tier_hit_tokens_total", tier("device")), 256);
  EXPECT_GT(pre.value("dserve_kv_store_tier_bytes", tier("device")), 0);
  EXPECT_GT(pre.value("dserve_kv_store_tier_blocks", tier("device")), 0);
  // Write-through: the blocks went to the disk tier too.
  EXPECT_GT(pre.value("dserve_kv_store_tier_bytes", tier("disk")), 0) << pre.text();
  EXPECT_GT(pre.value("dserve_kv_store_tier_blocks", tier("disk")), 0);

  const Scrape dec = scrape_until(decode.metrics_port(), [](const Scrape& s) {
    return s.value("dserve_decode_active_requests") == 0;
  });
  ASSERT_EQ(dec.error(), "") << dec.text();
  EXPECT_GE(dec.count("dserve_decode_step_duration_seconds"), expected.size()) << dec.text();
  EXPECT_GE(dec.count("dserve_decode_batch_size"), expected.size());
  EXPECT_EQ(dec.value("dserve_decode_reservations_total", {{"outcome", "granted"}}), 2);
  EXPECT_EQ(dec.value("dserve_decode_handoffs_total", {{"outcome", "accepted"}}), 2);
  EXPECT_EQ(dec.value("dserve_decode_handoffs_total", {{"outcome", "rejected"}}), 0);
  EXPECT_EQ(dec.value("dserve_decode_handoffs_corrupt_total"), 0);
  EXPECT_EQ(dec.value("dserve_decode_tokens_total"), 2.0 * static_cast<double>(expected.size()));
  EXPECT_EQ(dec.value("dserve_decode_reserved_requests"), 0);
  EXPECT_EQ(dec.value("dserve_decode_kv_budget_in_use_bytes"), 0);

  const Scrape gw(cluster.gateway->metrics_port());
  ASSERT_EQ(gw.error(), "") << gw.text();
  EXPECT_EQ(gw.value("dserve_gateway_requests_total", {{"outcome", "completed"}}), 2);

  // (a) Every line of every log is JSON, and each process logged both requests by the
  // client's id.
  const auto gw_lines = read_json_lines(gateway_log);
  const auto pre_lines = read_json_lines(prefill_log);
  const auto dec_lines = read_json_lines(decode_log);
  for (const auto& [lines, name] :
       {std::pair{&gw_lines, "gateway"}, std::pair{&pre_lines, "prefill-0"},
        std::pair{&dec_lines, "decode-0"}}) {
    ASSERT_FALSE(lines->empty()) << name << " logged nothing\n" << cluster.logs();
    for (const auto& j : *lines)
      EXPECT_EQ(j["process"], name) << j.dump();
  }
  for (const std::string& id : ids) {
    const auto g = of_request(gw_lines, id);
    EXPECT_EQ(events(g), (std::set<std::string>{"admitted", "placed", "finished"})) << id;
    if (const Json* placed = first_event(g, "placed")) {
      EXPECT_EQ((*placed)["prefill"], prefill.address());
      EXPECT_EQ((*placed)["decode"], decode.address());
      EXPECT_EQ((*placed)["attempt"], 1);
    }
    if (const Json* fin = first_event(g, "finished")) {
      EXPECT_EQ((*fin)["outcome"], "completed") << fin->dump();
      EXPECT_EQ((*fin)["tokens"], expected.size());
      EXPECT_GT((*fin)["ttft_ms"].get<double>(), 0);
    }
    const auto p = of_request(pre_lines, id);
    EXPECT_EQ(events(p), (std::set<std::string>{"prefill_done"})) << id;
    if (const Json* done = first_event(p, "prefill_done")) {
      EXPECT_EQ((*done)["prompt_tokens"], prompt.size());
      EXPECT_EQ((*done)["cached_tokens"], id == ids[0] ? 0 : 256) << done->dump();
      EXPECT_GT((*done)["transfer_bytes"].get<uint64_t>(), 0u);
    }
    const auto d = of_request(dec_lines, id);
    EXPECT_EQ(events(d),
              (std::set<std::string>{"reservation_granted", "handoff_accepted", "decode_finished"}))
        << id;
    if (const Json* fin = first_event(d, "decode_finished")) {
      EXPECT_EQ((*fin)["tokens"], expected.size()) << fin->dump();
    }
  }

  // (c) The disk tier is a RocksDB directory with the blocks written through to it.
  ASSERT_TRUE(fs::is_directory(kv_dir)) << cluster.logs();
  bool current = false, manifest = false;
  for (const auto& e : fs::directory_iterator(kv_dir)) {
    const std::string name = e.path().filename().string();
    current = current || name == "CURRENT";
    manifest = manifest || name.rfind("MANIFEST-", 0) == 0;
  }
  EXPECT_TRUE(current && manifest) << kv_dir << " holds no RocksDB database";

  cluster.gateway.reset();
  cluster.prefill.clear();
  cluster.decode.clear();
  fs::remove_all(dir);
}

// Bad --kv-* and log values stop `dserve serve` at once (exit 2) with a message naming the
// flag and what was wrong, before the model loads.
TEST(Observability, BadKvAndLogFlagsAreRefusedWithTheReason) {
  const fs::path dir =
      fs::path(::testing::TempDir()) / ("dserve-observability-bad-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path file = dir / "a-file";
  std::ofstream(file) << "x";
  const std::string serve = std::string(DSERVE_BINARY) + " serve --role prefill --model " +
                            testing_support::tiny_dir() + " --listen 127.0.0.1:0 ";
  struct Case {
    std::string flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"--kv-disk-path " + (file / "kv").string(),
       "--kv-disk-path '" + (file / "kv").string() + "' cannot be created"},
      {"--kv-disk-path " + file.string(),
       "--kv-disk-path '" + file.string() + "' exists and is not a directory"},
      {"--kv-host-codec fp16", "--kv-host-codec must be lossless or fp8, got 'fp16'"},
      {"--kv-device-mib 0", "--kv-device-mib must be between 1 and"},
      {"--kv-disk-path " + (dir / "kv").string() + " --kv-disk-mib 8 --kv-write-queue-mib 16",
       "--kv-write-queue-mib (16) is larger than --kv-disk-mib (8)"},
      {"--log-file " + (file / "log").string(),
       "cannot open log file '" + (file / "log").string() + "' for appending"},
      {"--metrics-listen nowhere", "--metrics-listen must be HOST:PORT"},
  };
  for (const Case& c : cases) {
    const CommandResult r = run(serve + c.flags + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << c.flags << ": " << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.flags << ": " << r.output;
    EXPECT_EQ(r.output.find("dserve: serving"), std::string::npos) << c.flags << ": " << r.output;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace dserve
