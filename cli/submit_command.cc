// `dserve submit`: sends one prompt to a gateway over gRPC and streams the text back as it is
// generated (the same output as `dserve generate`), then a line of usage figures on stderr.

#include <cstdio>
#include <memory>
#include <sstream>
#include <string>

#include "commands.h"
#include "dserve/api/auth.h"
#include "dserve/api/serving_client.h"
#include "submit_jobs.h"

namespace dserve::cli {
namespace {

struct SubmitOptions {
  std::string gateway = "127.0.0.1:50051";
  std::string prompt;
  std::string prompt_tokens;  // comma-separated ids
  bool chat = false;
  uint32_t max_tokens = 64;
  float temperature = 0.0f;
  uint32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  uint32_t timeout_ms = 0;
  int64_t connect_timeout_ms = 5000;
  bool print_tokens = false;
  std::string token_file;  // the first token in it is sent
  api::ClientOptions connection;
  JobsOptions jobs;  // --jobs: a batch instead of one prompt
};

// The client for --gateway with the token and TLS options; prints the error when it fails.
std::unique_ptr<api::ServingClient> connect_client(const SubmitOptions& o, int& exit_code) {
  api::ClientOptions connection = o.connection;
  if (!o.token_file.empty()) {
    auto tokens = api::load_token_file(o.token_file);
    if (!tokens.is_ok()) {
      print_error("--token-file: " + tokens.status().message());
      exit_code = 2;
      return nullptr;
    }
    connection.token = tokens->front().token;
  }
  auto client = api::ServingClient::connect(
      o.gateway, std::chrono::milliseconds(o.connect_timeout_ms), connection);
  if (!client.is_ok()) {
    print_error(client.status().message());
    exit_code = 1;
    return nullptr;
  }
  return std::move(client).value();
}

int run_submit(const SubmitOptions& o) {
  if (!o.jobs.jobs_path.empty()) {
    if (!o.prompt.empty() || !o.prompt_tokens.empty()) {
      print_error("--jobs runs the prompts of its file: give it without --prompt/--prompt-tokens");
      return 2;
    }
    int exit_code = 0;
    auto client = connect_client(o, exit_code);
    if (!client) return exit_code;
    JobsOptions jobs = o.jobs;
    jobs.default_max_tokens = o.max_tokens;
    return run_jobs(*client, jobs);
  }
  dserve::v1::GenerateRequest req;
  if (!o.prompt_tokens.empty()) {
    std::stringstream in(o.prompt_tokens);
    std::string item;
    while (std::getline(in, item, ',')) {
      try {
        size_t used = 0;
        const long id = std::stol(item, &used);
        if (used != item.size()) throw std::invalid_argument(item);
        req.add_prompt_tokens(static_cast<int32_t>(id));
      } catch (const std::exception&) {
        print_error("--prompt-tokens: '" + item + "' is not a token id");
        return 2;
      }
    }
  } else if (o.prompt.empty()) {
    print_error("give --prompt TEXT or --prompt-tokens ID,ID,...");
    return 2;
  }
  req.set_prompt(o.prompt);
  req.set_chat(o.chat);
  req.set_max_tokens(o.max_tokens);
  req.set_temperature(o.temperature);
  req.set_top_k(o.top_k);
  req.set_top_p(o.top_p);
  req.set_seed(o.seed);
  req.set_timeout_ms(o.timeout_ms);

  int exit_code = 0;
  auto client = connect_client(o, exit_code);
  if (!client) return exit_code;
  auto done = client->generate(req, [&](const dserve::v1::GenerateResponse& msg) {
    if (o.print_tokens) {
      for (int32_t t : msg.tokens())
        std::printf("%d\n", t);
    } else {
      std::fputs(msg.text().c_str(), stdout);
    }
    std::fflush(stdout);
    return true;
  });
  if (!done.is_ok()) {
    std::fputs("\n", stdout);
    print_error(done.status().to_string());
    return done.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  if (!o.print_tokens) std::fputs("\n", stdout);
  std::fflush(stdout);
  const auto& u = done->usage;
  std::fprintf(stderr,
               "dserve: %u prompt tokens (%u cached), %u generated, finish %s; queue %.1f ms, "
               "prefill %.1f ms, KV hand-off %.2f MB written in %.2f ms (accepted after %.2f ms), "
               "first token %.1f ms, total %.1f ms, %u placement(s)\n",
               u.prompt_tokens(), u.cached_prompt_tokens(), u.completion_tokens(),
               done->finish_reason.c_str(), u.queue_ms(), u.prefill_ms(),
               static_cast<double>(u.kv_transfer_bytes()) / 1e6, u.kv_transfer_ms(), u.handoff_ms(),
               u.time_to_first_token_ms(), u.total_ms(), u.attempts());
  return 0;
}

}  // namespace

Command add_submit_command(CLI::App& app) {
  auto o = std::make_shared<SubmitOptions>();
  CLI::App* cmd = app.add_subcommand("submit", "send a prompt to a gateway and stream the answer");
  cmd->add_option("--gateway", o->gateway, "the gateway's gRPC address HOST:PORT")
      ->capture_default_str();
  cmd->add_option("--prompt", o->prompt, "prompt text (UTF-8); a BOS token is prepended");
  cmd->add_option("--prompt-tokens", o->prompt_tokens, "the prompt as token ids: ID,ID,...");
  cmd->add_flag("--chat", o->chat, "wrap the prompt in DeepSeek's chat format as a user turn");
  cmd->add_option("--max-tokens", o->max_tokens, "tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "keep the k most likely tokens (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", o->top_p, "nucleus mass to keep (1 = all)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  cmd->add_option("--timeout-ms", o->timeout_ms, "the request's deadline (0: the gateway's)")
      ->capture_default_str();
  cmd->add_option("--connect-timeout-ms", o->connect_timeout_ms, "wait for the gateway this long")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--print-tokens", o->print_tokens, "print token ids, one per line, not text");
  cmd->add_option("--token-file", o->token_file,
                  "send the first token of this file (the gateway's --token-file format, mode "
                  "600) as `authorization: Bearer <token>`");
  cmd->add_option("--tls-ca", o->connection.tls_ca,
                  "connect over TLS, checking the gateway's certificate against this PEM CA");
  cmd->add_option(
      "--tls-cert", o->connection.tls_cert,
      "with --tls-ca: this client's PEM certificate (a gateway with --tls-ca wants one)");
  cmd->add_option("--tls-key", o->connection.tls_key, "with --tls-cert: its PEM private key");
  cmd->add_option("--tls-server-name", o->connection.tls_server_name,
                  "with --tls-ca: the name the gateway's certificate carries, when not the "
                  "--gateway host");
  cmd->add_option("--jobs", o->jobs.jobs_path,
                  "submit a batch: a JSONL file, one job per line ({\"id\", \"prompt\" or "
                  "\"prompt_tokens\", \"max_tokens\", \"temperature\", ...}); progress on "
                  "stderr, one JSON result per job in input order");
  cmd->add_option("--out", o->jobs.out_path, "with --jobs: where the results go (default stdout)");
  cmd->add_option("--concurrency", o->jobs.concurrency, "with --jobs: requests in flight at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return [o] { return run_submit(*o); };
}

}  // namespace dserve::cli
