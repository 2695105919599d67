// The gateway's gRPC calls besides Generate (Cancel, Status, ListModels, Health) through the
// C++ client, and `dserve submit --jobs` against a real cluster: results in input order and
// token-identical to the reference, a bad jobs file refused line by line with nothing sent.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "dserve/api/serving_client.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

namespace fs = std::filesystem;
using testing_support::ClusterOptions;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::run_command;
using testing_support::ServeCluster;

class ClientApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ClusterOptions o;
    o.prefill = 1;
    o.decode = 1;
    o.gateway_args = {"--served-model-name", "tiny-test"};
    cluster_ = new ServeCluster(o);
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(cluster_->ready()) << cluster_->logs();
    auto c = api::ServingClient::connect(cluster_->grpc_address(), std::chrono::seconds(10));
    ASSERT_TRUE(c.is_ok()) << c.status().to_string();
    client_ = std::move(c).value();
  }
  static ServeCluster* cluster_;
  std::unique_ptr<api::ServingClient> client_;
};
ServeCluster* ClientApi::cluster_ = nullptr;

TEST_F(ClientApi, HealthListModelsAndStatus) {
  auto health = client_->health();
  ASSERT_TRUE(health.is_ok()) << health.status().to_string();
  EXPECT_EQ(health->status(), v1::HealthResponse::SERVING) << health->detail();

  auto models = client_->list_models();
  ASSERT_TRUE(models.is_ok()) << models.status().to_string();
  ASSERT_EQ(models->models_size(), 1);
  EXPECT_EQ(models->models(0).id(), "tiny-test");
  EXPECT_GT(models->models(0).context_tokens(), 0u);

  auto status = client_->status();
  ASSERT_TRUE(status.is_ok()) << status.status().to_string();
  EXPECT_EQ(status->model(), "tiny-test");
  EXPECT_TRUE(status->accepting());
  ASSERT_EQ(status->workers_size(), 2);
  EXPECT_EQ(status->workers(0).role(), "prefill");
  EXPECT_EQ(status->workers(0).address(), cluster_->prefill[0]->address());
  EXPECT_EQ(status->workers(1).role(), "decode");
  EXPECT_EQ(status->workers(1).address(), cluster_->decode[0]->address());
  EXPECT_GT(status->workers(1).kv_budget_bytes(), 0u);
  for (const auto& w : status->workers()) {
    EXPECT_TRUE(w.healthy()) << w.address();
    EXPECT_FALSE(w.draining()) << w.address();
  }
}

TEST_F(ClientApi, CancelByRequestId) {
  // A long request, cancelled by its id from another call once its first tokens arrived.
  v1::GenerateRequest req = testing_support::request_for(random_prompt(50, 3), 4000);
  req.set_request_id("cancel-me");
  std::atomic<bool> streaming{false};
  std::string seen_id;
  Result<api::Completion> got = internal_error("unset");
  std::thread call([&] {
    got = client_->generate(req, [&](const v1::GenerateResponse& msg) {
      seen_id = msg.request_id();
      streaming = true;
      return true;
    });
  });
  for (int i = 0; i < 600 && !streaming; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(streaming.load());
  const Status cancelled = client_->cancel("cancel-me");
  call.join();
  EXPECT_TRUE(cancelled.is_ok()) << cancelled.to_string();
  EXPECT_EQ(seen_id, "cancel-me");
  ASSERT_FALSE(got.is_ok());
  EXPECT_EQ(got.status().code(), StatusCode::kCancelled) << got.status().to_string();

  // Ended: the id is free again, and cancelling it now finds nothing.
  const Status again = client_->cancel("cancel-me");
  EXPECT_EQ(again.code(), StatusCode::kNotFound) << again.to_string();
  EXPECT_NE(again.message().find("no running request with id 'cancel-me'"), std::string::npos)
      << again.to_string();
  EXPECT_EQ(client_->cancel("").code(), StatusCode::kInvalidArgument);
  // An id no request can have is refused as such, and not echoed back (a 10,000-character
  // one used to come back inside the NOT_FOUND message).
  for (const std::string& id : {std::string(10000, 'a'), std::string("bad id\n")}) {
    const Status refused_cancel = client_->cancel(id);
    EXPECT_EQ(refused_cancel.code(), StatusCode::kInvalidArgument) << refused_cancel.to_string();
    EXPECT_NE(refused_cancel.message().find("at most 128 characters"), std::string::npos);
    EXPECT_LT(refused_cancel.message().size(), 200u);
  }
  // A malformed id is refused with the field named, an id that is not UTF-8 as well (it used to
  // fail inside gRPC's parser, as INTERNAL with no message).
  for (const std::string& id : {std::string("has spaces"), std::string("id\xff")}) {
    v1::GenerateRequest bad = req;
    bad.set_request_id(id);
    auto refused = client_->generate(bad);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument)
        << refused.status().to_string();
    EXPECT_NE(refused.status().message().find("request_id"), std::string::npos);
  }
}

// Penalties and logit bias reach the decode worker's sampler: each request's tokens equal the
// reference sampler's with the same parameters (they used to be absent from the API; the HTTP
// API accepted and ignored them).
TEST_F(ClientApi, PenaltiesAndLogitBiasShapeTheTokens) {
  const auto prompt = random_prompt(30, 11);
  std::vector<model::SamplingParams> cases(3);
  cases[0].presence_penalty = 2.0f;
  cases[1].frequency_penalty = 1.0f;
  cases[1].temperature = 0.9f;
  cases[1].top_k = 40;
  cases[1].seed = 5;
  cases[2].logit_bias = {{7777, 100.0f}};
  for (const auto& params : cases) {
    v1::GenerateRequest req = testing_support::request_for(prompt, 12);
    req.set_presence_penalty(params.presence_penalty);
    req.set_frequency_penalty(params.frequency_penalty);
    req.set_temperature(params.temperature);
    req.set_top_k(static_cast<uint32_t>(params.top_k));
    req.set_seed(params.seed);
    for (const auto& [id, bias] : params.logit_bias)
      (*req.mutable_logit_bias())[id] = bias;
    auto got = client_->generate(req);
    ASSERT_TRUE(got.is_ok()) << got.status().to_string();
    EXPECT_EQ(got->tokens, reference_tokens(prompt, 12, params));
  }
  // The bias is not a no-op: it decides every token.
  auto biased = client_->generate([&] {
    v1::GenerateRequest req = testing_support::request_for(prompt, 6);
    (*req.mutable_logit_bias())[7777] = 100.0f;
    return req;
  }());
  ASSERT_TRUE(biased.is_ok());
  EXPECT_EQ(biased->tokens, std::vector<int32_t>(6, 7777));
  // Nor is the presence penalty: a bias that makes 7777 win by less than the penalty gives
  // another stream with the penalty than without, and the cluster gives the penalized one.
  std::optional<model::SamplingParams> decisive;
  for (float bias = 2.0f; bias <= 12.0f && !decisive; bias += 0.5f) {
    model::SamplingParams with, without;
    with.logit_bias = without.logit_bias = {{7777, bias}};
    with.presence_penalty = 2.0f;
    if (reference_tokens(prompt, 8, with) != reference_tokens(prompt, 8, without)) decisive = with;
  }
  ASSERT_TRUE(decisive.has_value()) << "no bias in 2..12 lets the penalty decide a token";
  v1::GenerateRequest penalized = testing_support::request_for(prompt, 8);
  penalized.set_presence_penalty(decisive->presence_penalty);
  (*penalized.mutable_logit_bias())[7777] = decisive->logit_bias[0].second;
  auto got = client_->generate(penalized);
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_EQ(got->tokens, reference_tokens(prompt, 8, *decisive))
      << "bias " << decisive->logit_bias[0].second;
  // Out of range: refused naming the parameter.
  v1::GenerateRequest bad = testing_support::request_for(prompt, 4);
  bad.set_presence_penalty(3.0f);
  auto refused = client_->generate(bad);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("presence_penalty"), std::string::npos);
}

// A prompt that is not UTF-8 is refused with the byte where it stops being UTF-8; it used to
// fail inside gRPC's parser, as INTERNAL with an empty message.
TEST_F(ClientApi, PromptThatIsNotUtf8IsRefusedWithItsOffset) {
  for (const bool chat : {false, true}) {
    v1::GenerateRequest req;
    req.set_prompt("abc\xff\xfe");
    req.set_max_tokens(4);
    req.set_chat(chat);
    auto refused = client_->generate(req);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument)
        << refused.status().to_string();
    EXPECT_NE(refused.status().message().find("not valid UTF-8 at byte offset 3"),
              std::string::npos)
        << refused.status().to_string();
  }
}

TEST_F(ClientApi, SubmitJobsWritesEveryResultInInputOrder) {
  const fs::path dir = fs::temp_directory_path() / ("dserve-jobs-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::vector<std::vector<int32_t>> prompts;
  std::ofstream jobs(dir / "jobs.jsonl");
  for (int i = 0; i < 12; ++i) {
    prompts.push_back(random_prompt(1 + 23 * i, 900 + static_cast<uint64_t>(i)));
    nlohmann::json j = {{"id", "job-" + std::to_string(i)},
                        {"prompt_tokens", prompts.back()},
                        {"max_tokens", 1 + i % 7}};
    jobs << j.dump() << "\n";
    if (i == 5) jobs << "\n";  // blank lines are skipped
  }
  jobs.close();
  const auto r = run_command(std::string(DSERVE_BINARY) + " submit --gateway " +
                             cluster_->grpc_address() + " --jobs " + (dir / "jobs.jsonl").string() +
                             " --out " + (dir / "out.jsonl").string() + " --concurrency 4 2>" +
                             (dir / "progress.txt").string());
  EXPECT_EQ(r.exit_code, 0);
  std::ifstream out(dir / "out.jsonl");
  std::vector<nlohmann::json> results;
  for (std::string line; std::getline(out, line);)
    results.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(results.size(), prompts.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& res = results[i];
    EXPECT_EQ(res["id"], "job-" + std::to_string(i));
    ASSERT_FALSE(res.contains("error")) << res.dump();
    EXPECT_EQ(res["tokens"].get<std::vector<int32_t>>(),
              reference_tokens(prompts[i], 1 + static_cast<int64_t>(i) % 7))
        << res.dump();
    EXPECT_FALSE(res["request_id"].get<std::string>().empty());
    EXPECT_EQ(res["usage"]["prompt_tokens"], prompts[i].size());
  }
  std::ifstream progress_in(dir / "progress.txt");
  std::stringstream progress;
  progress << progress_in.rdbuf();
  EXPECT_NE(progress.str().find("12/12 jobs, 0 failed"), std::string::npos) << progress.str();

  // A bad file: every problem, with its line and field; nothing is sent.
  std::ofstream(dir / "bad.jsonl") << "{\"id\": \"a\", \"prompt\": \"hi\"}\n"
                                   << "{\"prompt\": \"hi\", \"max_tokens\": -3}\n"
                                   << "not json\n"
                                   << "{\"id\": \"a\", \"prompt\": \"x\", \"temprature\": 1}\n"
                                   << "{\"max_tokens\": 3}\n";
  const auto before = client_->status();
  ASSERT_TRUE(before.is_ok());
  const auto bad =
      run_command(std::string(DSERVE_BINARY) + " submit --gateway " + cluster_->grpc_address() +
                  " --jobs " + (dir / "bad.jsonl").string() + " 2>&1");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  const std::string f = (dir / "bad.jsonl").string();
  for (const std::string& expected :
       {f + ": 5 problem(s), nothing sent:",
        f + ":2: field 'max_tokens': found -3; expected an integer in 0..4294967295",
        f + ":3: not a JSON object", f + ":4: field 'temprature': found 1; expected no such field",
        f + ":4: field 'id': found \"a\"; expected an id used once",
        f + ":5: neither 'prompt' nor 'prompt_tokens'; expected exactly one of them"}) {
    EXPECT_NE(bad.output.find(expected), std::string::npos) << expected << "\n" << bad.output;
  }
  const auto after = client_->status();
  ASSERT_TRUE(after.is_ok());
  EXPECT_EQ(after->admitted(), before->admitted());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace dserve
