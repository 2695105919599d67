// The OpenAI-compatible HTTP API, driven by the official `openai` Node client (npm, pinned in
// tools/openai-client): model listing, completions and chat completions, whole and streamed
// (server-sent events), greedy outputs equal to `dserve generate`'s, and OpenAI's error object
// with the right HTTP status for a wrong model, a bad parameter and an unsupported one. The
// gateway's /metrics, read by a Prometheus text parser nobody here wrote, moves with them.

#include <gtest/gtest.h>
#include <httplib.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::ServeCluster;

std::string run(const std::string& cmd) {
  return testing_support::run_command(cmd).output;
}

// The gateway's /metrics parsed by parse-prometheus-text-format (tools/prom-parser): the value
// of `name` with `labels` (a counter or gauge), or the count of a histogram without labels.
double metric(uint16_t port, const std::string& name, const nlohmann::json& labels = nullptr) {
  httplib::Client client("127.0.0.1", port);
  auto res = client.Get("/metrics");
  if (!res || res->status != 200) return -1;
  const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/prom-parser";
  const std::string file = ::testing::TempDir() + "/dserve-metrics.txt";
  if (std::FILE* f = std::fopen(file.c_str(), "w")) {
    std::fwrite(res->body.data(), 1, res->body.size(), f);
    std::fclose(f);
  }
  const auto parsed =
      nlohmann::json::parse(run("node " + tool + "/parse.mjs < " + file), nullptr, false);
  if (parsed.is_discarded()) return -2;
  for (const auto& family : parsed) {
    if (family["name"] != name) continue;
    for (const auto& m : family["metrics"]) {
      if (family["type"] == "HISTOGRAM") return std::stod(m["count"].get<std::string>());
      if (labels.is_null() || m["labels"] == labels)
        return std::stod(m["value"].get<std::string>());
    }
  }
  return -3;
}

TEST(OpenAi, OfficialClientStreamsCompletionsAndChat) {
  const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/openai-client";
  ASSERT_TRUE(std::filesystem::exists(tool + "/node_modules/openai"))
      << "the OpenAI Node client is not installed: run scripts/install-deps.sh";
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.gateway_args = {"--http-listen", "127.0.0.1:0",      "--served-model-name",
                    "tiny-v4",       "--metrics-listen", "127.0.0.1:0"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  ASSERT_NE(cluster.gateway->http_port(), 0) << cluster.logs();

  const uint16_t metrics_port = cluster.gateway->metrics_port();
  ASSERT_NE(metrics_port, 0) << cluster.logs();
  const nlohmann::json completed = {{"outcome", "completed"}};
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_requests_total", completed), 0.0);
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_time_to_first_token_seconds"), 0.0);

  const std::string prompt = "The quick brown fox";
  const std::string base =
      "http://127.0.0.1:" + std::to_string(cluster.gateway->http_port()) + "/v1";
  const std::string raw =
      run("cd " + tool + " && node check.mjs " + base + " tiny-v4 '" + prompt + "' 2>&1");
  const nlohmann::json out = nlohmann::json::parse(raw, nullptr, false);
  ASSERT_FALSE(out.is_discarded()) << raw << cluster.logs();

  EXPECT_EQ(out["models"], nlohmann::json::array({"tiny-v4"}));
  // Greedy completion: the same text as `dserve generate` for the same prompt.
  const std::string generated =
      run(std::string(DSERVE_BINARY) + " generate --model " + testing_support::tiny_dir() +
          " --max-tokens 12 --prompt '" + prompt + "' 2>/dev/null");
  ASSERT_FALSE(generated.empty());
  EXPECT_EQ(out["completion"]["text"].get<std::string>() + "\n", generated);
  EXPECT_EQ(out["completion_stream"]["text"], out["completion"]["text"]);
  EXPECT_EQ(out["completion"]["usage"]["completion_tokens"], 12);
  EXPECT_FALSE(out["completion"]["finish"].get<std::string>().empty());
  EXPECT_EQ(out["completion_stream"]["finish"], out["completion"]["finish"]);

  EXPECT_EQ(out["chat"]["role"], "assistant");
  EXPECT_FALSE(out["chat"]["content"].get<std::string>().empty());
  EXPECT_EQ(out["chat_stream"]["content"], out["chat"]["content"]);
  EXPECT_EQ(out["chat_stream"]["finish"], out["chat"]["finish"]);
  EXPECT_TRUE(out["chat_stream"]["usage"].is_object()) << raw;

  EXPECT_EQ(out["wrong_model"]["status"], 404) << raw;
  EXPECT_NE(out["wrong_model"]["message"].get<std::string>().find("no-such-model"),
            std::string::npos);
  EXPECT_EQ(out["bad_temperature"]["status"], 400) << raw;
  EXPECT_EQ(out["bad_temperature"]["param"], "temperature");
  EXPECT_EQ(out["unsupported_n"]["status"], 400) << raw;
  EXPECT_EQ(out["unsupported_n"]["param"], "n");

  // Four requests were served (two completions, two chats); the refused ones never reached
  // the gateway's request path.
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_requests_total", completed), 4.0);
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_time_to_first_token_seconds"), 4.0);
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_time_per_output_token_seconds"), 4.0);
  EXPECT_EQ(metric(metrics_port, "dserve_gateway_running_requests"), 0.0);
  EXPECT_GT(metric(metrics_port, "dserve_gateway_kv_transfer_bytes_total"), 0.0);
}

}  // namespace
}  // namespace dserve
