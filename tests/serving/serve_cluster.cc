#include "serve_cluster.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <latch>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>
#include <utility>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/decode_interface.h"
#include "dserve/actors/prefill_interface.h"
#include "dserve/api/serving_client.h"
#include "dserve/core/random.h"
#include "dserve/model/model.h"
#include "dserve/tokenizer/tokenizer.h"
#include "test_model.h"

namespace dserve::testing_support {
namespace fs = std::filesystem;

v1::GenerateRequest request_for(const std::vector<actors::TokenId>& prompt, uint32_t max_tokens) {
  v1::GenerateRequest req;
  for (actors::TokenId t : prompt)
    req.add_prompt_tokens(t);
  req.set_max_tokens(max_tokens);
  return req;
}

namespace {

// Whether nothing on this machine holds 127.0.0.1:port now (bound, then released).
bool port_is_free(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_port = htons(static_cast<uint16_t>(port));
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&at), sizeof(at)) == 0;
  ::close(fd);
  return bound;
}

}  // namespace

int free_port_run(int run) {
  // Below the kernel's ephemeral range when it leaves room: a port of that range can be taken
  // between the probe and the bind by any outgoing connection (a gRPC client's, UCX's).
  int low = 20000, high = 60000;
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  if (int first = 0, last = 0; range >> first >> last && first - 10000 >= 20 * run) {
    low = 10000;
    high = first;
  }
  const int bases = (high - low) / run;
  const int start = static_cast<int>(::getpid() % bases);
  for (int i = 0; i < bases; ++i) {
    const int candidate = low + ((start + i) % bases) * run;
    bool free = true;
    for (int p = candidate; p < candidate + run && free; ++p)
      free = port_is_free(p);
    if (free) return candidate;
  }
  ADD_FAILURE() << "no " << run << " free ports in a row between " << low << " and " << high - 1;
  return low;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

bool process_alive(pid_t pid) {
  const std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');
  return close != std::string::npos && stat.size() > close + 2 && stat[close + 2] != 'Z' &&
         stat[close + 2] != 'X';
}

CommandResult run_command(const std::string& command) {
  CommandResult r;
  if (std::FILE* p = ::popen(command.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;)
      r.output.append(buf, n);
    const int status = ::pclose(p);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return r;
}

std::string dserve_binary() {
  const char* packed = std::getenv("DSERVE_TEST_BINARY");
  return packed != nullptr && *packed != '\0' ? packed : DSERVE_BINARY;
}

std::string tiny_dir() {
  return model::testing_support::tiny_model_dir();
}

ServeProcess::ServeProcess(std::string role, std::string host, uint16_t port,
                           std::vector<std::string> extra, std::vector<std::string> wrapper,
                           std::chrono::milliseconds timeout)
    : role_(std::move(role)), host_(std::move(host)), wrapper_(std::move(wrapper)) {
  args_ = {dserve_binary(), "serve",    "--role",   role_,
           "--model",       tiny_dir(), "--listen", host_ + ":" + std::to_string(port)};
  // The device check runs the cluster tests with every worker on the lent GPU.
  if (const char* device = std::getenv("DSERVE_TEST_DEVICE");
      device != nullptr && role_ != "gateway")
    args_.insert(args_.end(), {"--device", device});
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
  if (std::regex_search(line, m, std::regex(" metrics [^ ]+:(\\d+)")))
    metrics_port_ = static_cast<uint16_t>(std::stoi(m[1]));
  if (std::regex_search(line, m, std::regex(" http [^ ]+:(\\d+)")))
    http_port_ = static_cast<uint16_t>(std::stoi(m[1]));
  if (std::regex_search(line, m, std::regex(" decode [^ ]+:(\\d+)")))
    decode_port_ = static_cast<uint16_t>(std::stoi(m[1]));
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

bool ServeProcess::alive() const {
  if (pid_ <= 0) return false;
  siginfo_t info{};
  // WNOWAIT: look without reaping, so that kill() still waits for it as before.
  if (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) != 0)
    return false;
  return info.si_pid == 0;
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
  auto or_default = [&](const std::string& host) { return host.empty() ? o.host : host; };
  const std::string prefill_host = or_default(o.prefill_host);
  const std::string decode_host = or_default(o.decode_host);
  const std::string gateway_host = or_default(o.gateway_host);
  std::string prefill_list, decode_list;
  for (int i = 0; i < o.prefill; ++i) {
    prefill.push_back(std::make_unique<ServeProcess>("prefill", prefill_host, 0, o.prefill_args,
                                                     o.prefill_wrapper));
    prefill_list += (i ? "," : "") + prefill.back()->address();
  }
  for (int i = 0; i < o.decode; ++i) {
    decode.push_back(
        std::make_unique<ServeProcess>("decode", decode_host, 0, o.decode_args, o.decode_wrapper));
    decode_list += (i ? "," : "") + decode.back()->address();
  }
  std::vector<std::string> gw{"--prefill", prefill_list,    "--decode",
                              decode_list, "--grpc-listen", gateway_host + ":0"};
  gw.insert(gw.end(), o.gateway_args.begin(), o.gateway_args.end());
  gateway = std::make_unique<ServeProcess>("gateway", gateway_host, 0, gw, o.gateway_wrapper);
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
                                              const model::SamplingParams& params,
                                              kvstore::KvDtype kv_dtype) {
  const model::Model& m = model::testing_support::tiny_model(kv_dtype);
  model::RequestState state = m.new_state();
  auto logits = m.forward(prompt, state, model::LogitsFor::kLastToken);
  DSERVE_CHECK(logits.is_ok());
  model::Sampler sampler(params);
  // As `dserve generate` and the decode workers: only ids the tokenizer has.
  static const int64_t tokenizer_ids = [] {
    auto tokenizer = tokenizer::Tokenizer::load(model::testing_support::tokenizer_json());
    DSERVE_CHECK_MSG(tokenizer.is_ok(), "the test tokenizer does not load");
    return tokenizer->vocab_size();
  }();
  std::vector<actors::TokenId> out;
  const auto eos = static_cast<int32_t>(m.config().eos_token_id);
  for (int64_t made = 0; made < n;) {
    const int32_t next = sampler.sample(model::sampleable_logits(logits->span(), tokenizer_ids));
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

std::vector<LoadRequest> load_requests(size_t n, int64_t max_prompt, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int64_t> lengths{1, 2, 127, 128, 129, max_prompt};
  lengths.erase(
      std::remove_if(lengths.begin(), lengths.end(), [&](int64_t l) { return l > max_prompt; }),
      lengths.end());
  lengths.resize(std::min(lengths.size(), n));
  while (lengths.size() < n)
    lengths.push_back(1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(max_prompt))));
  std::vector<LoadRequest> out;
  for (size_t i = 0; i < n; ++i) {
    LoadRequest r;
    r.prompt = random_prompt(lengths[i], seed * 1000003 + i);
    r.max_tokens = 1 + static_cast<uint32_t>(rng.below(16));
    out.push_back(std::move(r));
  }
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Asks every worker of a cluster for its HealthReport from this process (an actor runtime of
// its own that publishes nothing): once on demand (report()), or repeatedly on one thread per
// worker between watch() and stop(), remembering which workers were seen with work.
class WorkerWatch {
 public:
  explicit WorkerWatch(const ServeCluster& cluster) {
    auto rt = actors::ActorRuntime::start(actors::RuntimeConfig{});
    if (!rt.is_ok()) {
      ADD_FAILURE() << "actor runtime: " << rt.status().to_string();
      return;
    }
    rt_ = std::move(rt).value();
    for (const auto& p : cluster.prefill) {
      Worker w{p->role() + " " + p->address(), {}, {}};
      auto h = rt_->connect<actors::PrefillActor>(p->host(), p->port());
      if (h.is_ok()) w.prefill = *h;
      EXPECT_TRUE(h.is_ok()) << w.name << ": " << h.status().to_string();
      workers_.push_back(std::move(w));
    }
    for (const auto& d : cluster.decode) {
      Worker w{d->role() + " " + d->address(), {}, {}};
      auto h = rt_->connect<actors::DecodeActor>(d->host(), d->port());
      if (h.is_ok()) w.decode = *h;
      EXPECT_TRUE(h.is_ok()) << w.name << ": " << h.status().to_string();
      workers_.push_back(std::move(w));
    }
    busy_ = std::vector<std::atomic<bool>>(workers_.size());
  }
  ~WorkerWatch() { stop(); }

  size_t size() const { return workers_.size(); }
  const std::string& name(size_t i) const { return workers_[i].name; }
  bool is_decode(size_t i) const { return static_cast<bool>(workers_[i].decode); }
  bool seen_busy(size_t i) const { return busy_[i].load(); }

  Result<actors::HealthReport> report(size_t i) {
    if (!rt_) return unavailable("no actor runtime");
    const actors::HealthProbe probe{actors::Role::kGateway, rt_->epoch(), 0};
    const Worker& w = workers_[i];
    if (w.decode) return rt_->call<actors::HealthReport>(w.decode, probe);
    if (w.prefill) return rt_->call<actors::HealthReport>(w.prefill, probe);
    return unavailable(w.name + ": not connected");
  }

  void watch() {
    for (size_t i = 0; i < workers_.size(); ++i) {
      threads_.emplace_back([this, i] {
        while (!stopping_.load()) {
          auto r = report(i);
          if (r.is_ok() && r->active_requests + r->queued_requests > 0) busy_[i] = true;
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      });
    }
  }

  void stop() {
    stopping_ = true;
    for (auto& t : threads_)
      t.join();
    threads_.clear();
  }

 private:
  struct Worker {
    std::string name;
    actors::PrefillActor prefill;
    actors::DecodeActor decode;
  };
  std::unique_ptr<actors::ActorRuntime> rt_;
  std::vector<Worker> workers_;
  std::vector<std::atomic<bool>> busy_;
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> threads_;
};

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto at = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(at, v.size() - 1)];
}

}  // namespace

LoadReport run_load_and_check(const ServeCluster& cluster, const std::vector<LoadRequest>& requests,
                              int reference_threads) {
  LoadReport report;
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  if (!client.is_ok()) {
    ADD_FAILURE() << client.status().to_string() << "\n" << cluster.logs();
    return report;
  }
  WorkerWatch watch(cluster);
  watch.watch();

  // The requests, each on its own thread, released together by `go`.
  const size_t n = requests.size();
  std::vector<std::optional<Result<api::Completion>>> results(n);
  std::vector<Clock::time_point> finished(n);
  std::latch go(static_cast<std::ptrdiff_t>(n) + 1);
  std::vector<std::thread> senders;
  for (size_t i = 0; i < n; ++i) {
    senders.emplace_back([&, i] {
      const v1::GenerateRequest req = request_for(requests[i].prompt, requests[i].max_tokens);
      go.arrive_and_wait();
      // The client checks that each stream is contiguous from index 0 (kDataLoss if not).
      results[i] = (*client)->generate(req, {}, std::chrono::minutes(5));
      finished[i] = Clock::now();
    });
  }

  // The references, meanwhile, on this process's own threads.
  std::vector<std::vector<actors::TokenId>> expected(n);
  std::atomic<size_t> next_ref{0};
  double reference_s = 0;
  go.arrive_and_wait();
  const auto t0 = Clock::now();
  {
    std::vector<std::thread> refs;
    for (int t = 0; t < std::max(1, reference_threads); ++t) {
      refs.emplace_back([&] {
        for (size_t i; (i = next_ref.fetch_add(1)) < n;)
          expected[i] = reference_tokens(requests[i].prompt, requests[i].max_tokens);
      });
    }
    for (auto& t : refs)
      t.join();
    reference_s = seconds_since(t0);
  }
  for (auto& t : senders)
    t.join();
  report.wall_s =
      std::chrono::duration<double>(*std::max_element(finished.begin(), finished.end()) - t0)
          .count();
  watch.stop();

  std::vector<double> ttft;
  uint64_t new_tokens = 0, prompt_tokens = 0;
  std::string failures;
  for (size_t i = 0; i < n; ++i) {
    const LoadRequest& rq = requests[i];
    const std::string what = "request " + std::to_string(i) + " (" +
                             std::to_string(rq.prompt.size()) + " prompt tokens, max_tokens " +
                             std::to_string(rq.max_tokens) + ")";
    prompt_tokens += rq.prompt.size();
    const Result<api::Completion>& r = *results[i];
    if (!r.is_ok()) {
      ++report.failed;
      failures += what + ": " + r.status().to_string() + "\n";
      continue;
    }
    const std::string reason = expected[i].size() >= rq.max_tokens ? "length" : "stop";
    const v1::Usage& u = r->usage;
    if (r->tokens != expected[i] || r->finish_reason != reason ||
        u.prompt_tokens() != rq.prompt.size() || u.completion_tokens() != r->tokens.size() ||
        u.attempts() != 1) {
      ++report.failed;
      failures += what + ": " + std::to_string(r->tokens.size()) + " tokens (reference " +
                  std::to_string(expected[i].size()) + "), first difference at " +
                  std::to_string(std::mismatch(r->tokens.begin(), r->tokens.end(),
                                               expected[i].begin(), expected[i].end())
                                     .first -
                                 r->tokens.begin()) +
                  ", finish " + r->finish_reason + " (reference " + reason + "), usage " +
                  u.ShortDebugString() + "\n";
      continue;
    }
    ++report.completed;
    new_tokens += r->tokens.size();
    ttft.push_back(u.time_to_first_token_ms());
  }
  report.ttft_p50_ms = percentile(ttft, 0.50);
  report.ttft_p99_ms = percentile(ttft, 0.99);
  EXPECT_EQ(report.completed, n) << report.failed << " of " << n << " requests failed:\n"
                                 << failures << cluster.logs();

  for (size_t w = 0; w < watch.size(); ++w)
    EXPECT_TRUE(watch.seen_busy(w)) << watch.name(w) << " was never seen with work";

  // Everything a decode worker held is released once the last chunk went out; the release
  // may trail the stream's end by a step, so ask again for a while before failing.
  for (size_t w = 0; w < watch.size(); ++w) {
    if (!watch.is_decode(w)) continue;
    const auto until = Clock::now() + std::chrono::seconds(10);
    Result<actors::HealthReport> h = watch.report(w);
    while (Clock::now() < until &&
           (!h.is_ok() || h->active_requests != 0 || h->queued_requests != 0)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      h = watch.report(w);
    }
    EXPECT_TRUE(h.is_ok()) << watch.name(w) << ": " << h.status().to_string() << "\n"
                           << cluster.logs();
    if (!h.is_ok()) continue;
    EXPECT_EQ(h->active_requests, 0u) << watch.name(w) << " still decodes requests";
    EXPECT_EQ(h->queued_requests, 0u) << watch.name(w) << " still holds reservations";
  }

  std::fprintf(stderr,
               "[ info ] %zu concurrent greedy requests, %llu prompt tokens, %llu new tokens: "
               "wall %.2f s, %.1f requests/s, %.0f new tokens/s; TTFT p50 %.0f ms, p99 %.0f ms; "
               "references %.2f s on %d thread(s) alongside\n",
               n, static_cast<unsigned long long>(prompt_tokens),
               static_cast<unsigned long long>(new_tokens), report.wall_s,
               static_cast<double>(n) / report.wall_s,
               static_cast<double>(new_tokens) / report.wall_s, report.ttft_p50_ms,
               report.ttft_p99_ms, reference_s, std::max(1, reference_threads));
  return report;
}

WorkerHealth::WorkerHealth() {
  auto rt = actors::ActorRuntime::start(actors::RuntimeConfig{});
  if (rt.is_ok()) rt_ = std::move(rt).value();
}

WorkerHealth::~WorkerHealth() = default;

Result<actors::HealthReport> WorkerHealth::report(const ServeProcess& worker,
                                                  std::chrono::milliseconds timeout) {
  if (!rt_) return unavailable("no actor runtime in the test process");
  const actors::HealthProbe probe{actors::Role::kGateway, rt_->epoch(), 0};
  const std::string where = worker.role() + " " + worker.address();
  if (worker.role() == "decode") {
    auto h = rt_->connect<actors::DecodeActor>(worker.host(), worker.port(), timeout);
    if (!h.is_ok()) return h.status().with_context(where);
    return rt_->call<actors::HealthReport>(*h, probe, timeout);
  }
  if (worker.role() == "prefill") {
    auto h = rt_->connect<actors::PrefillActor>(worker.host(), worker.port(), timeout);
    if (!h.is_ok()) return h.status().with_context(where);
    return rt_->call<actors::HealthReport>(*h, probe, timeout);
  }
  return invalid_argument(where + ": not a worker");
}

}  // namespace dserve::testing_support
