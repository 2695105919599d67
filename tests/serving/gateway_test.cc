// The gateway in front of real worker processes, driven through its gRPC service: streams are
// token-identical to `dserve generate`, sampling parameters travel, bad requests are refused
// with the field named, and `dserve submit` prints what `dserve generate` prints.

#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::request_for;
using testing_support::ServeCluster;

std::string run(const std::string& cmd) {
  return testing_support::run_command(cmd).output;
}

TEST(Gateway, StreamsMatchGenerateAndBadRequestsAreRefused) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();

  for (int i = 0; i < 6; ++i) {
    const auto prompt = random_prompt(1 + 70 * i, 50 + static_cast<uint64_t>(i));
    v1::GenerateRequest req = request_for(prompt, 9);
    model::SamplingParams params;
    if (i % 2 == 1) {
      params = {0.7f, 30, 0.95f, 77u + static_cast<uint64_t>(i)};
      req.set_temperature(params.temperature);
      req.set_top_k(static_cast<uint32_t>(params.top_k));
      req.set_top_p(params.top_p);
      req.set_seed(params.seed);
    }
    auto done = (*client)->generate(req);
    ASSERT_TRUE(done.is_ok()) << done.status().to_string() << cluster.logs();
    EXPECT_EQ(done->tokens, reference_tokens(prompt, 9, params)) << "request " << i;
    EXPECT_EQ(done->usage.prompt_tokens(), prompt.size());
    EXPECT_EQ(done->usage.completion_tokens(), done->tokens.size());
    EXPECT_EQ(done->usage.attempts(), 1u);
  }

  auto bad_top_p = request_for({0, 5, 6}, 4);
  bad_top_p.set_top_p(1.5f);
  auto refused = (*client)->generate(bad_top_p);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("top_p"), std::string::npos)
      << refused.status().message();

  auto bad_token = request_for({0, -3}, 4);
  refused = (*client)->generate(bad_token);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("prompt_tokens[1]"), std::string::npos)
      << refused.status().message();

  v1::GenerateRequest empty;
  refused = (*client)->generate(empty);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);

  // The command-line client prints exactly what `dserve generate` prints.
  const std::string prompt = "The quick brown fox";
  const std::string submitted =
      run(std::string(DSERVE_BINARY) + " submit --gateway " + cluster.grpc_address() +
          " --max-tokens 12 --prompt '" + prompt + "' 2>/dev/null");
  const std::string generated =
      run(std::string(DSERVE_BINARY) + " generate --model " + testing_support::tiny_dir() +
          " --max-tokens 12 --prompt '" + prompt + "' 2>/dev/null");
  EXPECT_FALSE(generated.empty());
  EXPECT_EQ(submitted, generated);
}

// The co-located mode (prefill and decode halves in one process, taking turns on the compute)
// behind the same gateway serves the same tokens, its decode half speculating (MTP drafts, two
// per request per step, verified and taken back among the mixed steps' rows).
TEST(Gateway, ColocatedProcessServesTheSameTokens) {
  using testing_support::ServeProcess;
  ServeProcess both(
      "colocated", "127.0.0.1", 0,
      {"--decode-listen", "127.0.0.1:0", "--speculative-tokens", "2", "--speculation", "fixed"});
  ASSERT_TRUE(both.ready()) << both.log();
  ASSERT_NE(both.decode_port(), 0) << both.log();
  ServeProcess gateway(
      "gateway", "127.0.0.1", 0,
      {"--prefill", both.address(), "--decode", "127.0.0.1:" + std::to_string(both.decode_port()),
       "--grpc-listen", "127.0.0.1:0"});
  ASSERT_TRUE(gateway.ready()) << gateway.log() << both.log();
  auto client = api::ServingClient::connect("127.0.0.1:" + std::to_string(gateway.grpc_port()),
                                            std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();
  std::vector<std::thread> running;
  std::vector<std::string> failures(8);
  for (size_t i = 0; i < failures.size(); ++i) {
    running.emplace_back([&, i] {
      const auto prompt = random_prompt(1 + 150 * static_cast<int64_t>(i), 300 + i);
      auto done = (*client)->generate(request_for(prompt, 7));
      if (!done.is_ok()) {
        failures[i] = done.status().to_string();
      } else if (done->tokens != reference_tokens(prompt, 7)) {
        failures[i] = "tokens differ from the reference";
      }
    });
  }
  for (auto& t : running)
    t.join();
  for (size_t i = 0; i < failures.size(); ++i)
    EXPECT_EQ(failures[i], "") << "request " << i << "\n" << both.log();
}

}  // namespace
}  // namespace dserve
