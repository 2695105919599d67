#include "serve_cluster.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <regex>
#include <utility>

#include "dserve/core/random.h"
#include "dserve/model/model.h"
#include "test_model.h"

namespace dserve::testing_support {
namespace fs = std::filesystem;

std::string tiny_dir() {
  return model::testing_support::tiny_model_dir();
}

ServeProcess::ServeProcess(std::string role, std::string host, uint16_t port,
                           std::vector<std::string> extra, std::vector<std::string> wrapper,
                           std::chrono::milliseconds timeout)
    : role_(std::move(role)), host_(std::move(host)), wrapper_(std::move(wrapper)) {
  args_ = {DSERVE_BINARY, "serve",    "--role",   role_,
           "--model",     tiny_dir(), "--listen", host_ + ":" + std::to_string(port)};
  args_.insert(args_.end(), extra.begin(), extra.end());
  static int counter = 0;
  err_file_ =
      fs::temp_directory_path() / ("dserve-test-" + role_ + "-" + std::to_string(::getpid()) + "-" +
                                   std::to_string(counter++) + ".log");
  launch(timeout);
}

ServeProcess::~ServeProcess() {
  kill(SIGKILL);
  fs::remove(err_file_);
}

bool ServeProcess::launch(std::chrono::milliseconds timeout) {
  std::vector<std::string> all = wrapper_;
  all.insert(all.end(), args_.begin(), args_.end());
  std::vector<char*> argv;
  for (auto& a : all)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  int out[2];
  if (::pipe(out) != 0) return false;
  pid_ = ::fork();
  if (pid_ == 0) {
    ::dup2(out[1], 1);
    if (std::FILE* err = std::fopen(err_file_.c_str(), "a")) ::dup2(::fileno(err), 2);
    ::close(out[0]);
    ::close(out[1]);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  // The first stdout line names the bound address(es); bounded by `timeout`.
  std::string line;
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{out[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    char c;
    if (::read(out[0], &c, 1) != 1 || c == '\n') break;
    line.push_back(c);
  }
  ::close(out[0]);
  std::smatch m;
  if (std::regex_search(line, m, std::regex("serving \\w+ on [^ ]+:(\\d+)"))) {
    port_ = static_cast<uint16_t>(std::stoi(m[1]));
    // From now on the same port, so that a restart comes back where peers look for it.
    args_[7] = host_ + ":" + std::to_string(port_);
  } else {
    port_ = 0;
  }
  if (std::regex_search(line, m, std::regex("grpc [^ ]+:(\\d+)")))
    grpc_port_ = static_cast<uint16_t>(std::stoi(m[1]));
  return port_ != 0;
}

void ServeProcess::kill(int sig) {
  if (pid_ <= 0) return;
  ::kill(pid_, sig);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

bool ServeProcess::restart(std::chrono::milliseconds timeout) {
  kill(SIGKILL);
  const uint16_t was = port_;
  if (!launch(timeout)) return false;
  return port_ == was;
}

std::string ServeProcess::log() const {
  std::string s;
  if (std::FILE* f = std::fopen(err_file_.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;)
      s.append(buf, n);
    std::fclose(f);
  }
  return s;
}

ServeCluster::ServeCluster(ClusterOptions o) {
  std::string prefill_list, decode_list;
  for (int i = 0; i < o.prefill; ++i) {
    prefill.push_back(std::make_unique<ServeProcess>("prefill", o.host, 0, o.prefill_args));
    prefill_list += (i ? "," : "") + prefill.back()->address();
  }
  for (int i = 0; i < o.decode; ++i) {
    decode.push_back(std::make_unique<ServeProcess>("decode", o.host, 0, o.decode_args));
    decode_list += (i ? "," : "") + decode.back()->address();
  }
  std::vector<std::string> gw{"--prefill", prefill_list,    "--decode",
                              decode_list, "--grpc-listen", o.host + ":0"};
  gw.insert(gw.end(), o.gateway_args.begin(), o.gateway_args.end());
  gateway = std::make_unique<ServeProcess>("gateway", o.host, 0, gw);
}

bool ServeCluster::ready() const {
  for (const auto& p : prefill)
    if (!p->ready()) return false;
  for (const auto& d : decode)
    if (!d->ready()) return false;
  return gateway && gateway->ready() && gateway->grpc_port() != 0;
}

std::string ServeCluster::grpc_address() const {
  return gateway->host() + ":" + std::to_string(gateway->grpc_port());
}

std::string ServeCluster::logs() const {
  std::string s;
  auto add = [&](const ServeProcess& p) {
    s += "---- " + p.role() + " " + p.address() + " ----\n" + p.log();
  };
  for (const auto& p : prefill)
    add(*p);
  for (const auto& d : decode)
    add(*d);
  if (gateway) add(*gateway);
  return s;
}

std::vector<actors::TokenId> reference_tokens(const std::vector<actors::TokenId>& prompt, int64_t n,
                                              const model::SamplingParams& params) {
  const model::Model& m = model::testing_support::tiny_model();
  model::RequestState state = m.new_state();
  auto logits = m.forward(prompt, state, model::LogitsFor::kLastToken);
  DSERVE_CHECK(logits.is_ok());
  model::Sampler sampler(params);
  std::vector<actors::TokenId> out;
  const auto eos = static_cast<int32_t>(m.config().eos_token_id);
  for (int64_t made = 0; made < n;) {
    const int32_t next = sampler.sample(logits->span());
    ++made;
    if (next == eos) break;
    out.push_back(next);
    if (made == n) break;
    const int32_t one[1] = {next};
    logits = m.forward(one, state, model::LogitsFor::kLastToken);
    DSERVE_CHECK(logits.is_ok());
  }
  return out;
}

std::vector<actors::TokenId> random_prompt(int64_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<actors::TokenId> ids{0};
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<actors::TokenId>(1 + rng.below(128000)));
  return ids;
}

}  // namespace dserve::testing_support
