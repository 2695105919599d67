// The OpenAI-compatible HTTP API, driven by the official `openai` Node client (npm, pinned in
// tools/openai-client): model listing, completions and chat completions, whole and streamed
// (server-sent events), greedy outputs equal to `dserve generate`'s, and OpenAI's error object
// with the right HTTP status for a wrong model, a bad parameter and an unsupported one.

#include <gtest/gtest.h>

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
  std::string out;
  if (std::FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;)
      out.append(buf, n);
    ::pclose(p);
  }
  return out;
}

TEST(OpenAi, OfficialClientStreamsCompletionsAndChat) {
  const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/openai-client";
  ASSERT_TRUE(std::filesystem::exists(tool + "/node_modules/openai"))
      << "the OpenAI Node client is not installed: run scripts/install-deps.sh";
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.gateway_args = {"--http-listen", "127.0.0.1:0", "--served-model-name", "tiny-v4"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  ASSERT_NE(cluster.gateway->http_port(), 0) << cluster.logs();

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
}

}  // namespace
}  // namespace dserve
