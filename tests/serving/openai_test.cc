// The OpenAI-compatible HTTP API, driven by the official `openai` Node client (npm, pinned in
// tools/openai-client): model listing, completions and chat completions, whole and streamed
// (server-sent events), greedy outputs equal to `dserve generate`'s, and OpenAI's error object
// with the right HTTP status for a wrong model, a bad parameter and an unsupported one. The
// gateway's /metrics, read by a Prometheus text parser nobody here wrote, moves with them.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "dserve/tokenizer/tokenizer.h"
#include "serve_cluster.h"
#include "test_model.h"

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

// A TCP connection to 127.0.0.1:`port`; -1 when it cannot be made.
int connect_loopback(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Sends `request` as it is over a fresh connection to 127.0.0.1:`port` and returns what comes
// back until the server closes the connection (or 30 s pass).
std::string raw_http(uint16_t port, const std::string& request) {
  const int fd = connect_loopback(port);
  if (fd < 0) return "connect failed";
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may refuse before it has read everything
    sent += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[4096];
  pollfd p{fd, POLLIN, 0};
  while (::poll(&p, 1, 30000) > 0) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    reply.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return reply;
}

std::string chunked(const std::string& body, size_t chunk) {
  std::string out;
  for (size_t at = 0; at < body.size(); at += chunk) {
    const std::string piece = body.substr(at, chunk);
    char size[32];
    std::snprintf(size, sizeof(size), "%zx\r\n", piece.size());
    out += size + piece + "\r\n";
  }
  return out + "0\r\n\r\n";
}

// A request body is bounded however it is sent: a chunked one used to be read whole (100 MiB,
// then tokenized), as only a Content-Length was checked.
TEST(OpenAi, RequestBodiesAreBoundedWhateverTheirEncoding) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.gateway_args = {"--http-listen", "127.0.0.1:0",           "--served-model-name",
                    "tiny-v4",       "--http-max-body-bytes", "65536"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const uint16_t port = cluster.gateway->http_port();
  const auto body = [](size_t prompt_chars) {
    return R"({"model":"tiny-v4","max_tokens":1,"prompt":")" + std::string(prompt_chars, 'a') +
           R"("})";
  };
  const std::string head =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
      "Content-Type: application/json\r\n";
  // Under the bound, chunked: served.
  std::string reply =
      raw_http(port, head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
                         chunked(body(1000), 300));
  EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 200") << reply.substr(0, 400);
  // Over it, chunked or with a Content-Length: 413, naming the bound.
  const std::string big = body(200000);
  for (const std::string& request :
       {head + "Transfer-Encoding: chunked\r\n\r\n" + chunked(big, 4096),
        head + "Content-Length: " + std::to_string(big.size()) + "\r\n\r\n" + big}) {
    reply = raw_http(port, request);
    EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 413") << reply.substr(0, 400);
    EXPECT_NE(reply.find("larger than 65536 bytes"), std::string::npos) << reply.substr(0, 400);
  }
  // The gateway serves on.
  reply = raw_http(port, head + "Content-Length: " + std::to_string(body(10).size()) +
                             "\r\nConnection: close\r\n\r\n" + body(10));
  EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 200") << reply.substr(0, 400);
}

// Threads of process `pid` now (/proc/PID/status).
int thread_count(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  return -1;
}

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
    ++n;
  return n;
}

// The HTTP server's connections are bounded and answered plainly: its threads start as
// connections need them, up to a bound (httplib's pool started them all: 1,296 with the
// defaults); its listen backlog is the configured one (httplib's is 5); a malformed request is
// answered and the connection closed at once (it used to stay open for the 5 s keep-alive); a
// request pipelined behind another is refused by closing the connection after the first
// response (httplib dropped it silently and kept the connection open).
TEST(OpenAi, ConnectionsAreBoundedAndAnsweredPlainly) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  // HTTP threads: max_running + max_queued + 16 = 144.
  o.gateway_args = {"--http-listen",  "127.0.0.1:0", "--served-model-name", "tiny-v4",
                    "--max-running",  "64",          "--max-queued",        "64",
                    "--http-backlog", "700"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  const uint16_t port = cluster.gateway->http_port();
  const pid_t pid = cluster.gateway->pid();

  // The backlog, as the kernel reports it for the listening socket (ss: Send-Q).
  const std::string ss = run("ss -ltnH 'sport = :" + std::to_string(port) + "' | awk '{print $3}'");
  EXPECT_EQ(ss, "700\n") << ss;

  // Malformed: answered 400, and the connection closed with it.
  std::string reply = raw_http(port, "GARBAGE\r\n\r\n");
  EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 400") << reply;
  EXPECT_NE(reply.find("Connection: close"), std::string::npos) << reply;

  // Pipelined: the first answered, the connection then closed (the client sends the second
  // again); never a second request silently dropped on an open connection.
  const std::string get = "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
  reply = raw_http(port, get + get);
  const size_t responses = count_of(reply, "HTTP/1.1 200");
  EXPECT_TRUE(responses == 2 ||
              (responses == 1 && reply.find("Connection: close") != std::string::npos))
      << reply;

  // Idle connections hold at most the bound of threads; the rest wait, and all are served.
  const int before = thread_count(pid);
  EXPECT_LT(before, 144) << "the HTTP threads were started before any connection needed them";
  std::vector<int> idle;
  for (int i = 0; i < 200; ++i) {
    const int fd = connect_loopback(port);
    ASSERT_GE(fd, 0);
    idle.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const int during = thread_count(pid);
  EXPECT_LE(during - before, 144) << before << " threads before, " << during << " with 200 idle";
  for (int fd : idle)
    ::close(fd);
  reply = raw_http(port, get);
  EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 200") << reply;
  std::fprintf(stderr,
               "[ info ] HTTP: %d gateway threads idle, %d with 200 idle connections (HTTP "
               "bound 144)\n",
               before, during);
}

// logit_bias and the penalties are done, not ignored (they used to return 200 with the output of
// their absence); a response_format other than text is refused.
TEST(OpenAi, LogitBiasAndPenaltiesAreAppliedAndResponseFormatChecked) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.gateway_args = {"--http-listen", "127.0.0.1:0", "--served-model-name", "tiny-v4"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  httplib::Client http("127.0.0.1", cluster.gateway->http_port());
  http.set_read_timeout(60, 0);
  const auto post = [&](nlohmann::json extra) {
    nlohmann::json body = {{"model", "tiny-v4"},
                           {"prompt", "The quick brown fox"},
                           {"max_tokens", 3},
                           {"temperature", 0}};
    body.update(extra);
    auto res = http.Post("/v1/completions", body.dump(), "application/json");
    return res ? std::make_pair(res->status, nlohmann::json::parse(res->body, nullptr, false))
               : std::make_pair(0, nlohmann::json());
  };
  auto tokenizer = tokenizer::Tokenizer::load(model::testing_support::tokenizer_json());
  ASSERT_TRUE(tokenizer.is_ok());
  const std::string word = tokenizer->decode(std::vector<int32_t>{7777}).value();
  auto [status, body] = post({{"logit_bias", {{"7777", 100}}}});
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(body["choices"][0]["text"], word + word + word) << body.dump();
  std::tie(status, body) = post({{"presence_penalty", 1.0}, {"frequency_penalty", -0.5}});
  EXPECT_EQ(status, 200) << body.dump();
  std::tie(status, body) = post({{"presence_penalty", 2.5}});
  EXPECT_EQ(status, 400) << body.dump();
  EXPECT_EQ(body["error"]["param"], "presence_penalty") << body.dump();
  std::tie(status, body) = post({{"logit_bias", {{"not-an-id", 1}}}});
  EXPECT_EQ(status, 400) << body.dump();
  EXPECT_EQ(body["error"]["param"], "logit_bias") << body.dump();
  std::tie(status, body) = post({{"response_format", {{"type", "json_object"}}}});
  EXPECT_EQ(status, 400) << body.dump();
  EXPECT_EQ(body["error"]["param"], "response_format") << body.dump();
  std::tie(status, body) = post({{"response_format", {{"type", "text"}}}});
  EXPECT_EQ(status, 200) << body.dump();
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
