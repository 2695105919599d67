// Security of the gateway's client APIs, against a real cluster: bearer tokens on gRPC and on
// the OpenAI-compatible HTTP API (also through the official `openai` Node client), per-token
// rate and concurrency limits counted exactly, the max_tokens limit, and TLS (plus mutual TLS)
// with a throw-away CA made by the `openssl` command.

#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

using nlohmann::json;
using testing_support::ClusterOptions;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::request_for;
using testing_support::ServeCluster;

constexpr const char* kAlice = "alice-tok-7d1c0e9a55b3";
constexpr const char* kBob = "bob-tok-0b8f2a6c91e4d7";
constexpr const char* kModel = "tiny-v4";

std::string run(const std::string& cmd) {
  return testing_support::run_command(cmd).output;
}

// A token file private to its owner, as the gateway wants it.
std::string token_file(const std::string& name) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << "# test clients\nalice " << kAlice << "\n\nbob " << kBob << "\n";
  ::chmod(path.c_str(), 0600);
  return path;
}

ClusterOptions cluster_with(std::vector<std::string> gateway_args) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.gateway_args = {"--http-listen", "127.0.0.1:0", "--served-model-name", kModel};
  o.gateway_args.insert(o.gateway_args.end(), gateway_args.begin(), gateway_args.end());
  return o;
}

std::unique_ptr<api::ServingClient> connect(const ServeCluster& cluster,
                                            api::ClientOptions options = {}) {
  auto client =
      api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10), options);
  EXPECT_TRUE(client.is_ok()) << client.status().to_string();
  return client.is_ok() ? std::move(client).value() : nullptr;
}

api::ClientOptions with_token(const std::string& token) {
  api::ClientOptions o;
  o.token = token;
  return o;
}

// POSTs an OpenAI request; `token` empty: no Authorization header.
httplib::Result post(httplib::Client& http, const std::string& path, const std::string& token,
                     const json& body) {
  httplib::Headers headers;
  if (!token.empty()) headers.emplace("Authorization", "Bearer " + token);
  return http.Post(path, headers, body.dump(), "application/json");
}

json completion_body(uint32_t max_tokens) {
  return {{"model", kModel},
          {"prompt", "The quick brown fox"},
          {"max_tokens", max_tokens},
          {"temperature", 0}};
}

json chat_body(uint32_t max_tokens) {
  return {{"model", kModel},
          {"messages", json::array({{{"role", "user"}, {"content", "hello"}}})},
          {"max_tokens", max_tokens}};
}

// The error object of a refused HTTP call.
json error_of(const httplib::Result& res) {
  if (!res) return json();
  json body = json::parse(res->body, nullptr, false);
  return body.is_object() && body.contains("error") ? body["error"] : json();
}

json openai_client(const std::string& base, const std::string& key, const std::string& env = "") {
  const std::string tool = std::string(DSERVE_SOURCE_DIR) + "/tools/openai-client";
  const std::string raw = run("cd " + tool + " && " + env + " node auth.mjs " + base + " " +
                              kModel + " '" + key + "' 2>&1");
  json out = json::parse(raw, nullptr, false);
  EXPECT_FALSE(out.is_discarded()) << raw;
  return out.is_discarded() ? json::object() : out;
}

TEST(Auth, TokensOnGrpcAndHttpAndTheMaxTokensLimit) {
  ASSERT_TRUE(std::filesystem::exists(std::string(DSERVE_SOURCE_DIR) +
                                      "/tools/openai-client/node_modules/openai"))
      << "the OpenAI Node client is not installed: run scripts/install-deps.sh";
  ServeCluster cluster(cluster_with({"--token-file", token_file("dserve-auth-tokens"),
                                     "--max-output-tokens", "64", "--default-max-tokens", "16"}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const auto prompt = random_prompt(20, 7);

  // gRPC: no token, a wrong one, then the right one.
  for (const std::string token : {"", "alice-tok-wrong-000000"}) {
    auto client = connect(cluster, with_token(token));
    ASSERT_TRUE(client);
    auto r = client->generate(request_for(prompt, 4));
    ASSERT_FALSE(r.is_ok()) << "token '" << token << "'";
    EXPECT_EQ(r.status().code(), StatusCode::kUnauthenticated) << r.status().to_string();
    EXPECT_NE(r.status().message().find(token.empty() ? "no credentials" : "not valid"),
              std::string::npos)
        << r.status().message();
  }
  auto alice = connect(cluster, with_token(kAlice));
  ASSERT_TRUE(alice);
  auto ok = alice->generate(request_for(prompt, 6));
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string() << cluster.logs();
  EXPECT_EQ(ok->tokens, reference_tokens(prompt, 6));

  // Every other RPC of both services wants the token too.
  auto channel = grpc::CreateChannel(cluster.grpc_address(), grpc::InsecureChannelCredentials());
  auto serving = v1::Serving::NewStub(channel);
  auto admin = v1::Admin::NewStub(channel);
  using Rpc = std::function<grpc::Status(grpc::ClientContext&)>;
  const std::vector<std::pair<std::string, Rpc>> rpcs = {
      {"Health",
       [&](grpc::ClientContext& c) {
         v1::HealthResponse r;
         return serving->Health(&c, v1::HealthRequest(), &r);
       }},
      {"ListModels",
       [&](grpc::ClientContext& c) {
         v1::ListModelsResponse r;
         return serving->ListModels(&c, v1::ListModelsRequest(), &r);
       }},
      {"Status",
       [&](grpc::ClientContext& c) {
         v1::ClusterStatus r;
         return serving->Status(&c, v1::StatusRequest(), &r);
       }},
      {"Cancel",
       [&](grpc::ClientContext& c) {
         v1::CancelRequest req;
         req.set_request_id("req-none");
         v1::CancelResponse r;
         return serving->Cancel(&c, req, &r);
       }},
      {"AddWorker",
       [&](grpc::ClientContext& c) {
         v1::AddWorkerRequest req;
         req.set_role("decode");
         req.set_address("127.0.0.1:1");
         v1::AddWorkerResponse r;
         return admin->AddWorker(&c, req, &r);
       }},
      {"RemoveWorker",
       [&](grpc::ClientContext& c) {
         v1::RemoveWorkerRequest req;
         req.set_address("127.0.0.1:1");
         v1::RemoveWorkerResponse r;
         return admin->RemoveWorker(&c, req, &r);
       }},
  };
  for (const auto& [name, rpc] : rpcs) {
    for (const std::string token : {"", "alice-tok-wrong-000000"}) {
      grpc::ClientContext c;
      if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
      const grpc::Status st = rpc(c);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED)
          << name << " with token '" << token << "': " << st.error_message();
    }
  }
  for (const char* name : {"Health", "ListModels", "Status"}) {
    for (const auto& [n, rpc] : rpcs) {
      if (n != name) continue;
      grpc::ClientContext c;
      c.AddMetadata("authorization", std::string("Bearer ") + kBob);
      const grpc::Status st = rpc(c);
      EXPECT_TRUE(st.ok()) << name << ": " << st.error_message();
    }
  }

  // The max_tokens limit: 64 passes, 65 is refused naming the field and the limit.
  EXPECT_TRUE(alice->generate(request_for(prompt, 64)).is_ok());
  auto too_long = alice->generate(request_for(prompt, 65));
  ASSERT_FALSE(too_long.is_ok());
  EXPECT_EQ(too_long.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("max_tokens = 65 is above the limit of 64"),
            std::string::npos)
      << too_long.status().message();

  // HTTP: every route wants the token.
  httplib::Client http("127.0.0.1", cluster.gateway->http_port());
  http.set_read_timeout(60, 0);
  for (const char* path : {"/v1/completions", "/v1/chat/completions"}) {
    for (const std::string token : {"", "bob-tok-wrong-00000000"}) {
      auto res =
          post(http, path, token,
               std::string(path) == "/v1/chat/completions" ? chat_body(4) : completion_body(4));
      ASSERT_TRUE(res) << path;
      EXPECT_EQ(res->status, 401) << path << " " << res->body;
      EXPECT_EQ(res->get_header_value("WWW-Authenticate"), "Bearer");
      const json error = error_of(res);
      EXPECT_EQ(error["type"], "authentication_error") << res->body;
      EXPECT_EQ(error["code"], "invalid_api_key") << res->body;
    }
    auto res =
        post(http, path, kBob,
             std::string(path) == "/v1/chat/completions" ? chat_body(4) : completion_body(4));
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << path << " " << res->body;
  }
  auto models = http.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(models->status, 401);
  auto too_many = post(http, "/v1/completions", kBob, completion_body(65));
  ASSERT_TRUE(too_many);
  EXPECT_EQ(too_many->status, 400) << too_many->body;
  EXPECT_EQ(error_of(too_many)["param"], "max_tokens");
  EXPECT_NE(error_of(too_many)["message"].get<std::string>().find("1..64"), std::string::npos)
      << too_many->body;

  // The official client: works with the right key, reports an authentication error otherwise.
  const std::string base =
      "http://127.0.0.1:" + std::to_string(cluster.gateway->http_port()) + "/v1";
  const json good = openai_client(base, kAlice);
  EXPECT_EQ(good["models"]["value"], json::array({kModel})) << good.dump();
  EXPECT_EQ(good["completion"]["ok"], true) << good.dump();
  EXPECT_FALSE(good["completion"]["value"].get<std::string>().empty());
  EXPECT_EQ(good["chat_stream"]["ok"], true) << good.dump();
  const json bad = openai_client(base, "nobody-tok-00000000000");
  for (const char* call : {"models", "completion", "chat_stream"}) {
    EXPECT_EQ(bad[call]["ok"], false) << bad.dump();
    EXPECT_EQ(bad[call]["kind"], "AuthenticationError") << bad.dump();
    EXPECT_EQ(bad[call]["status"], 401);
    EXPECT_EQ(bad[call]["code"], "invalid_api_key");
  }

  // The gateway's log names who sent each request and every refusal, never a token.
  const std::string log = cluster.gateway->log();
  EXPECT_NE(log.find("warn gateway auth_refused reason=\"no credentials"), std::string::npos)
      << log;
  EXPECT_NE(log.find("warn gateway auth_refused reason=\"the token is not valid\""),
            std::string::npos)
      << log;
  EXPECT_NE(log.find(" admitted request_id="), std::string::npos) << log;
  EXPECT_NE(log.find(" client=alice "), std::string::npos) << log;
  EXPECT_NE(log.find(" client=bob "), std::string::npos) << log;
  for (const char* secret : {kAlice, kBob, "alice-tok-wrong-000000"})
    EXPECT_EQ(log.find(secret), std::string::npos) << "a token in the log: " << secret;
}

// Roles: a client token may not change the pools (any token used to: a client drained workers
// and added its own), and a request belongs to the client that made it: another client cannot
// cancel it (ids are guessable), an admin can. Every Admin call and refusal is logged by name.
TEST(Auth, AdminCallsNeedAnAdminAndRequestsBelongToTheirClient) {
  constexpr const char* kOps = "ops-tok-5e2a9c7b14d3f8";
  const std::string path = ::testing::TempDir() + "/dserve-auth-role-tokens";
  std::ofstream(path) << "alice " << kAlice << "\nbob " << kBob << " client\nops " << kOps
                      << " admin\n";
  ::chmod(path.c_str(), 0600);
  ServeCluster cluster(cluster_with({"--token-file", path}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();

  const auto admin_call = [&](const std::string& token, bool add) {
    auto channel = grpc::CreateChannel(cluster.grpc_address(), grpc::InsecureChannelCredentials());
    auto admin = v1::Admin::NewStub(channel);
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + token);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    if (add) {
      v1::AddWorkerRequest req;
      req.set_role("prefill");
      req.set_address("127.0.0.1:1");
      req.set_timeout_ms(200);
      v1::AddWorkerResponse r;
      return admin->AddWorker(&context, req, &r);
    }
    v1::RemoveWorkerRequest req;
    req.set_address(cluster.prefill[0]->address());
    req.set_timeout_ms(5000);
    v1::RemoveWorkerResponse r;
    return admin->RemoveWorker(&context, req, &r);
  };
  for (const bool add : {true, false}) {
    const grpc::Status refused = admin_call(kAlice, add);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED) << refused.error_message();
    EXPECT_NE(refused.error_message().find("needs a token with role admin; client 'alice' has "
                                           "role client"),
              std::string::npos)
        << refused.error_message();
  }
  // The pool is as it was: alice's RemoveWorker did not drain the prefill worker.
  auto alice = connect(cluster, with_token(kAlice));
  auto bob = connect(cluster, with_token(kBob));
  auto ops = connect(cluster, with_token(kOps));
  ASSERT_TRUE(alice && bob && ops);
  auto status = ops->status();
  ASSERT_TRUE(status.is_ok()) << status.status().to_string();
  for (const auto& w : status->workers())
    EXPECT_FALSE(w.draining()) << w.address();
  // An admin passes (the worker at port 1 never answers: UNAVAILABLE after its timeout).
  const grpc::Status by_ops = admin_call(kOps, /*add=*/true);
  EXPECT_NE(by_ops.error_code(), grpc::StatusCode::PERMISSION_DENIED) << by_ops.error_message();

  // alice's long request: bob cannot cancel it, and is told what he would be told of an id
  // that does not exist; ops can.
  v1::GenerateRequest req = request_for(random_prompt(40, 9), 4000);
  req.set_request_id("alice-long");
  std::atomic<int> messages{0};
  Result<api::Completion> got = internal_error("unset");
  std::thread call([&] {
    got = alice->generate(req, [&](const v1::GenerateResponse&) {
      ++messages;
      return true;
    });
  });
  const auto wait_for_messages = [&](int n) {
    for (int i = 0; i < 2000 && messages.load() < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return messages.load() >= n;
  };
  ASSERT_TRUE(wait_for_messages(1));
  const Status by_bob = bob->cancel("alice-long");
  EXPECT_EQ(by_bob.code(), StatusCode::kNotFound) << by_bob.to_string();
  EXPECT_EQ(by_bob.message(), "no running request with id 'alice-long'");
  // ... and alice's request goes on streaming.
  EXPECT_TRUE(wait_for_messages(messages.load() + 3));
  const Status by_ops_cancel = ops->cancel("alice-long");
  call.join();
  EXPECT_TRUE(by_ops_cancel.is_ok()) << by_ops_cancel.to_string();
  ASSERT_FALSE(got.is_ok());
  EXPECT_EQ(got.status().code(), StatusCode::kCancelled) << got.status().to_string();

  const std::string log = cluster.gateway->log();
  for (const char* line :
       {"warn gateway admin_refused client=alice call=Admin.AddWorker",
        "warn gateway admin_refused client=alice call=Admin.RemoveWorker",
        "info gateway admin_call client=ops call=Admin.AddWorker",
        "warn gateway cancel_refused request_id=alice-long client=bob owner=alice",
        "info gateway cancel request_id=alice-long client=ops owner=alice"}) {
    EXPECT_NE(log.find(line), std::string::npos) << line << "\n" << log;
  }
  for (const char* secret : {kAlice, kBob, kOps})
    EXPECT_EQ(log.find(secret), std::string::npos) << "a token in the log: " << secret;
}

// Rate 2 per second, burst 2: of 3 requests sent together, exactly 1 is refused; per token,
// on gRPC and on HTTP alike.
TEST(Auth, RateLimitPerToken) {
  ServeCluster cluster(cluster_with({"--token-file", token_file("dserve-auth-rate-tokens"),
                                     "--max-requests-per-second-per-token", "2"}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const auto prompt = random_prompt(10, 3);
  std::vector<std::unique_ptr<api::ServingClient>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(connect(cluster, with_token(kAlice)));
    ASSERT_TRUE(clients.back());
  }
  std::vector<httplib::Client> https;
  https.reserve(3);
  for (int i = 0; i < 3; ++i)
    https.emplace_back("127.0.0.1", cluster.gateway->http_port());

  std::vector<Result<api::Completion>> grpc_results(3, Status(StatusCode::kInternal, "not run"));
  std::vector<int> http_status(3, 0);
  std::vector<json> http_errors(3);
  std::latch go(7);
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      go.arrive_and_wait();
      grpc_results[i] = clients[i]->generate(request_for(prompt, 2));
    });
    threads.emplace_back([&, i] {
      go.arrive_and_wait();
      auto res = post(https[i], "/v1/completions", kBob, completion_body(2));
      http_status[i] = res ? res->status : -1;
      http_errors[i] = error_of(res);
    });
  }
  go.arrive_and_wait();
  for (auto& t : threads)
    t.join();

  int grpc_ok = 0, grpc_refused = 0, http_ok = 0, http_refused = 0;
  for (int i = 0; i < 3; ++i) {
    if (grpc_results[i].is_ok()) {
      ++grpc_ok;
      EXPECT_EQ(grpc_results[i]->tokens, reference_tokens(prompt, 2));
    } else {
      ++grpc_refused;
      EXPECT_EQ(grpc_results[i].status().code(), StatusCode::kResourceExhausted);
      EXPECT_NE(grpc_results[i].status().message().find(
                    "client 'alice' is over the rate limit of 2 requests per second per token"),
                std::string::npos)
          << grpc_results[i].status().message();
    }
    if (http_status[i] == 200) ++http_ok;
    if (http_status[i] == 429) {
      ++http_refused;
      EXPECT_EQ(http_errors[i]["type"], "rate_limit_exceeded");
      EXPECT_NE(http_errors[i]["message"].get<std::string>().find("client 'bob'"),
                std::string::npos);
    }
  }
  EXPECT_EQ(grpc_ok, 2) << cluster.logs();
  EXPECT_EQ(grpc_refused, 1);
  EXPECT_EQ(http_ok, 2) << cluster.logs();
  EXPECT_EQ(http_refused, 1);

  // The bucket refills: half a second later there is one more request.
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_TRUE(clients[0]->generate(request_for(prompt, 2)).is_ok());
}

// One request at a time per token: while alice's request is held (the decode worker is
// stopped), her next one is refused on both APIs and bob's is let in.
TEST(Auth, ConcurrencyLimitPerToken) {
  ServeCluster cluster(cluster_with(
      {"--token-file", token_file("dserve-auth-conc-tokens"), "--max-concurrent-per-token", "1"}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const auto prompt = random_prompt(12, 5);
  auto alice = connect(cluster, with_token(kAlice));
  auto alice2 = connect(cluster, with_token(kAlice));
  auto bob = connect(cluster, with_token(kBob));
  ASSERT_TRUE(alice && alice2 && bob);
  const pid_t decode = cluster.decode[0]->pid();
  // Short enough that the gateway's health probes (3 misses of 2 s) never see it down.
  ASSERT_EQ(::kill(decode, SIGSTOP), 0);
  Result<api::Completion> held = Status(StatusCode::kInternal, "not run");
  Result<api::Completion> bobs = Status(StatusCode::kInternal, "not run");
  std::thread holder([&] { held = alice->generate(request_for(prompt, 4)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  std::thread other([&] { bobs = bob->generate(request_for(prompt, 4)); });
  auto refused = alice2->generate(request_for(prompt, 4));
  httplib::Client http("127.0.0.1", cluster.gateway->http_port());
  auto http_refused = post(http, "/v1/completions", kAlice, completion_body(2));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(decode, SIGCONT);
  holder.join();
  other.join();

  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find(
                "client 'alice' has 1 requests running: the concurrency limit is 1 per token"),
            std::string::npos)
      << refused.status().message();
  ASSERT_TRUE(http_refused);
  EXPECT_EQ(http_refused->status, 429) << http_refused->body;
  EXPECT_EQ(error_of(http_refused)["type"], "rate_limit_exceeded");
  ASSERT_TRUE(held.is_ok()) << held.status().to_string() << cluster.logs();
  EXPECT_EQ(held->tokens, reference_tokens(prompt, 4));
  ASSERT_TRUE(bobs.is_ok()) << bobs.status().to_string();
  EXPECT_EQ(bobs->tokens, reference_tokens(prompt, 4));
  // The slot is released with the request.
  EXPECT_TRUE(alice2->generate(request_for(prompt, 4)).is_ok());
  EXPECT_NE(cluster.gateway->log().find("warn gateway limit_refused client=alice reason="),
            std::string::npos)
      << cluster.gateway->log();
}

// A throw-away CA, a server certificate for 127.0.0.1 / localhost and a client certificate,
// made by the `openssl` command in `dir`.
struct TestPki {
  std::string dir, ca, server_cert, server_key, client_cert, client_key;
};

bool make_pki(const std::string& dir, TestPki& pki) {
  std::filesystem::create_directories(dir);
  pki = {dir,
         dir + "/ca.pem",
         dir + "/server.pem",
         dir + "/server.key",
         dir + "/client.pem",
         dir + "/client.key"};
  std::ofstream(dir + "/server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                        "extendedKeyUsage=serverAuth\n";
  std::ofstream(dir + "/client.ext") << "extendedKeyUsage=clientAuth\n";
  const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
  const std::string cmd =
      "cd " + dir + " && openssl req -x509" + ec +
      "-keyout ca.key -out ca.pem -days 1 -subj '/CN=dserve test CA' && "
      "openssl req" +
      ec + "-keyout server.key -out server.csr -subj '/CN=localhost' && " +
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
      "-extfile server.ext -out server.pem && "
      "openssl req" +
      ec + "-keyout client.key -out client.csr -subj '/CN=dserve test client' && " +
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
      "-extfile client.ext -out client.pem";
  return std::system(("(" + cmd + ") > " + dir + "/openssl.log 2>&1").c_str()) == 0;
}

// OpenSSL writes to its socket with write(), so a server that closes a refused handshake
// while the client still sends raises SIGPIPE; a client is expected to take that as an error
// (as `dserve serve` does), not die of it.
void ignore_sigpipe() {
  ::signal(SIGPIPE, SIG_IGN);
}

TEST(Auth, TlsOnGrpcAndHttp) {
  ignore_sigpipe();
  ASSERT_EQ(std::system("openssl version > /dev/null 2>&1"), 0)
      << "the openssl command is missing: run scripts/install-deps.sh";
  TestPki pki;
  ASSERT_TRUE(make_pki(::testing::TempDir() + "/dserve-tls", pki))
      << run("cat " + ::testing::TempDir() + "/dserve-tls/openssl.log");
  ServeCluster cluster(cluster_with({"--token-file", token_file("dserve-tls-tokens"), "--tls-cert",
                                     pki.server_cert, "--tls-key", pki.server_key}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const auto prompt = random_prompt(16, 11);

  api::ClientOptions tls = with_token(kAlice);
  tls.tls_ca = pki.ca;
  auto secure = connect(cluster, tls);
  ASSERT_TRUE(secure);
  auto ok = secure->generate(request_for(prompt, 5));
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string() << cluster.logs();
  EXPECT_EQ(ok->tokens, reference_tokens(prompt, 5));
  // The certificate's other name, through the override.
  tls.tls_server_name = "localhost";
  auto by_name = connect(cluster, tls);
  ASSERT_TRUE(by_name);
  EXPECT_TRUE(by_name->generate(request_for(prompt, 2)).is_ok());

  // Plain text is refused: the channel never connects.
  auto plain = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(2),
                                           with_token(kAlice));
  EXPECT_FALSE(plain.is_ok());

  // HTTPS with the CA; plain HTTP gets nothing.
  httplib::SSLClient https("127.0.0.1", cluster.gateway->http_port());
  https.set_ca_cert_path(pki.ca.c_str());
  https.enable_server_certificate_verification(true);
  https.set_read_timeout(60, 0);
  httplib::Headers headers = {{"Authorization", std::string("Bearer ") + kBob}};
  auto res = https.Post("/v1/completions", headers, completion_body(3).dump(), "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200) << res->body;
  httplib::Client http("127.0.0.1", cluster.gateway->http_port());
  http.set_read_timeout(5, 0);
  auto plain_res = http.Get("/v1/models", headers);
  EXPECT_TRUE(!plain_res || plain_res->status != 200);

  // The official client over HTTPS, trusting the CA.
  const json out =
      openai_client("https://127.0.0.1:" + std::to_string(cluster.gateway->http_port()) + "/v1",
                    kAlice, "NODE_EXTRA_CA_CERTS=" + pki.ca);
  EXPECT_EQ(out["completion"]["ok"], true) << out.dump();
  EXPECT_EQ(out["chat_stream"]["ok"], true) << out.dump();
}

// --tls-ca: clients must present a certificate the CA signed, on gRPC and on HTTP.
TEST(Auth, MutualTls) {
  ignore_sigpipe();
  ASSERT_EQ(std::system("openssl version > /dev/null 2>&1"), 0)
      << "the openssl command is missing: run scripts/install-deps.sh";
  TestPki pki;
  ASSERT_TRUE(make_pki(::testing::TempDir() + "/dserve-mtls", pki));
  ServeCluster cluster(cluster_with(
      {"--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-ca", pki.ca}));
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const auto prompt = random_prompt(8, 13);

  api::ClientOptions tls;
  tls.tls_ca = pki.ca;
  // Without a client certificate the handshake (or the first call, with TLS 1.3) fails.
  auto anonymous =
      api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(3), tls);
  if (anonymous.is_ok()) {
    EXPECT_FALSE((*anonymous)->generate(request_for(prompt, 2)).is_ok());
  }
  tls.tls_cert = pki.client_cert;
  tls.tls_key = pki.client_key;
  auto client = connect(cluster, tls);
  ASSERT_TRUE(client);
  auto ok = client->generate(request_for(prompt, 3));
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string() << cluster.logs();
  EXPECT_EQ(ok->tokens, reference_tokens(prompt, 3));

  httplib::SSLClient no_cert("127.0.0.1", cluster.gateway->http_port());
  no_cert.set_ca_cert_path(pki.ca.c_str());
  no_cert.enable_server_certificate_verification(true);
  auto refused = no_cert.Post("/v1/completions", completion_body(2).dump(), "application/json");
  EXPECT_TRUE(!refused || refused->status != 200);
  httplib::SSLClient with_cert("127.0.0.1", cluster.gateway->http_port(), pki.client_cert,
                               pki.client_key);
  with_cert.set_ca_cert_path(pki.ca.c_str());
  with_cert.enable_server_certificate_verification(true);
  with_cert.set_read_timeout(60, 0);
  auto res = with_cert.Post("/v1/completions", completion_body(2).dump(), "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200) << res->body;
}

// Start-up refusals, each with a message naming the problem.
TEST(Auth, GatewayRefusesBadSecurityFlags) {
  const std::string dir = ::testing::TempDir();
  const std::string open_file = dir + "/dserve-open-tokens";
  std::ofstream(open_file) << "alice " << kAlice << "\n";
  ::chmod(open_file.c_str(), 0644);
  const std::string empty_file = dir + "/dserve-empty-tokens";
  std::ofstream(empty_file) << "# nobody yet\n";
  ::chmod(empty_file.c_str(), 0600);
  const std::string gateway = std::string(DSERVE_BINARY) + " serve --role gateway --model " +
                              testing_support::tiny_dir() +
                              " --prefill 127.0.0.1:1 --decode 127.0.0.1:2 --grpc-listen "
                              "127.0.0.1:0 ";
  struct Case {
    std::string flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"--token-file " + open_file, "has mode 0644: group or others may read or change it"},
      {"--token-file " + empty_file, "no token"},
      {"--token-file " + dir + "/dserve-no-such-file", "cannot be read"},
      {"--tls-cert /etc/hostname", "--tls-cert and --tls-key come together"},
      {"--tls-ca /etc/hostname", "--tls-ca checks client certificates"},
      {"--default-max-tokens 100 --max-output-tokens 50",
       "--default-max-tokens (100) is above --max-output-tokens (50)"},
  };
  for (const Case& c : cases) {
    const std::string out = run(gateway + c.flags + " 2>&1; echo \"exit $?\"");
    EXPECT_NE(out.find(c.message), std::string::npos) << c.flags << ":\n" << out;
    EXPECT_NE(out.find("exit 2"), std::string::npos) << c.flags << ":\n" << out;
  }
}

}  // namespace
}  // namespace dserve
