// serving_bench: time per output token and goodput under a mixed load, disaggregated (a prefill
// and a decode process, each on its own core) against co-located (one process on both cores
// whose two workers share one engine: prefill chunks ride in the decode steps), with the same
// gateway in front.
//
// The load: short requests (chat turns) arrive at a steady rate, or from --streams N clients
// each sending its next request when the last ends, and decode while long prompts arrive every
// few seconds. Figures per mode: TTFT and TPOT percentiles of the short requests
// (TPOT of a request = (last token time - first token time) / (tokens - 1), measured by the
// client), the worst gap between two tokens, and goodput: requests per second that met both
// the TTFT and the TPOT bound.
//
//   build/bench/serving_bench --model models/small [--seconds 40] [--modes both] [--streams N]
//                             [--binary OTHER_DSERVE]

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "dserve/core/random.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

struct Options {
  std::string model = "models/small";
  std::string binary = DSERVE_BINARY;
  std::string device = "cpu";     // the workers' --device
  std::string kv_dtype = "fp32";  // the workers' --kv-dtype
  double seconds = 40;
  double short_per_second = 1.0;
  int short_prompt = 192;
  int short_tokens = 32;
  double long_every_seconds = 6;
  int long_prompt = 2048;
  int long_tokens = 4;
  int token_budget = 512;
  double ttft_bound_ms = 3000;
  double tpot_bound_ms = 150;
  std::string modes = "both";
  int streams = 0;
  int max_step_tokens = 0;  // colocated: --max-step-tokens (0: the binary's default)  // > 0: this
                            // many closed-loop streams of short requests instead of a rate
};

// One `dserve serve` process (pinned with taskset when `cores` is set); killed at the end.
class Process {
 public:
  Process(const Options& o, const std::string& cores, std::vector<std::string> args) {
    std::vector<std::string> all;
    if (!cores.empty()) all = {"taskset", "-c", cores};
    all.push_back(o.binary);
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    if (::pipe(out) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(out[1], 1);
      ::close(out[0]);
      ::execvp(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(out[1]);
    const auto until = Clock::now() + std::chrono::seconds(120);
    while (Clock::now() < until) {
      pollfd p{out[0], POLLIN, 0};
      if (::poll(&p, 1, 1000) < 0) break;
      char c;
      if (p.revents == 0) continue;
      if (::read(out[0], &c, 1) != 1 || c == '\n') break;
      line_.push_back(c);
    }
    ::close(out[0]);
  }
  ~Process() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  // The n-th "HOST:PORT" of the ready line.
  std::string address(size_t n) const {
    std::vector<std::string> found;
    const std::regex re("([0-9.]+:[0-9]+)");
    for (auto it = std::sregex_iterator(line_.begin(), line_.end(), re);
         it != std::sregex_iterator(); ++it)
      found.push_back((*it)[1]);
    return n < found.size() ? found[n] : "";
  }

 private:
  pid_t pid_ = -1;
  std::string line_;
};

struct RequestRecord {
  bool is_long = false;
  bool ok = false;
  double ttft_ms = 0;
  double tpot_ms = 0;
  double max_gap_ms = 0;
  int tokens = 0;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

// One request through the gateway, timed from the streamed tokens.
RequestRecord send(const Options& o, dserve::api::ServingClient& client, uint64_t seed,
                   bool is_long) {
  dserve::SplitMix64 rng(seed);
  dserve::v1::GenerateRequest req;
  req.add_prompt_tokens(0);
  for (int k = 1; k < (is_long ? o.long_prompt : o.short_prompt); ++k)
    req.add_prompt_tokens(static_cast<int32_t>(1 + rng.below(100000)));
  req.set_max_tokens(static_cast<uint32_t>(is_long ? o.long_tokens : o.short_tokens));
  const auto sent = Clock::now();
  std::vector<Clock::time_point> token_times;
  auto done = client.generate(req, [&](const dserve::v1::GenerateResponse& msg) {
    for (int k = 0; k < msg.tokens_size(); ++k)
      token_times.push_back(Clock::now());
    return true;
  });
  RequestRecord r;
  r.is_long = is_long;
  r.ok = done.is_ok() && !token_times.empty();
  if (!r.ok) return r;
  auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
  r.tokens = static_cast<int>(token_times.size());
  r.ttft_ms = ms(token_times.front() - sent);
  if (token_times.size() > 1)
    r.tpot_ms =
        ms(token_times.back() - token_times.front()) / static_cast<double>(token_times.size() - 1);
  for (size_t k = 1; k < token_times.size(); ++k)
    r.max_gap_ms = std::max(r.max_gap_ms, ms(token_times[k] - token_times[k - 1]));
  return r;
}

std::vector<RequestRecord> run_load(const Options& o, const std::string& grpc) {
  auto client = dserve::api::ServingClient::connect(grpc, std::chrono::seconds(30));
  if (!client.is_ok()) {
    std::fprintf(stderr, "serving_bench: %s\n", client.status().to_string().c_str());
    std::exit(1);
  }
  // The schedule: short requests at a steady rate (or closed-loop streams), a long prompt
  // every long_every_seconds.
  struct Arrival {
    double at_s;
    bool is_long;
  };
  std::vector<Arrival> arrivals;
  if (o.streams == 0) {
    for (double t = 0; t < o.seconds; t += 1.0 / o.short_per_second)
      arrivals.push_back({t, false});
  }
  for (double t = o.long_every_seconds / 2; t < o.seconds; t += o.long_every_seconds)
    arrivals.push_back({t, true});
  std::sort(arrivals.begin(), arrivals.end(),
            [](const Arrival& a, const Arrival& b) { return a.at_s < b.at_s; });

  std::mutex mu;
  std::vector<RequestRecord> records;
  const auto keep = [&](RequestRecord r) {
    std::lock_guard lock(mu);
    records.push_back(r);
  };
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration<double>(o.seconds);
  for (int s = 0; s < o.streams; ++s) {
    threads.emplace_back([&, s] {
      for (uint64_t n = 0; Clock::now() < end; ++n)
        keep(send(o, **client, 1'000'000 * static_cast<uint64_t>(s + 1) + n, false));
    });
  }
  for (size_t i = 0; i < arrivals.size(); ++i) {
    std::this_thread::sleep_until(start + std::chrono::duration<double>(arrivals[i].at_s));
    threads.emplace_back([&, i] { keep(send(o, **client, 1000 + i, arrivals[i].is_long)); });
  }
  for (auto& t : threads)
    t.join();
  return records;
}

void report(const Options& o, const std::string& mode, const std::vector<RequestRecord>& records,
            double wall_s) {
  std::vector<double> ttft, tpot, gap, long_ttft;
  int ok = 0, failed = 0, good = 0;
  int64_t tokens = 0;
  for (const auto& r : records) {
    if (!r.ok) {
      ++failed;
      continue;
    }
    ++ok;
    tokens += r.tokens;
    if (r.is_long) {
      long_ttft.push_back(r.ttft_ms);
      continue;
    }
    ttft.push_back(r.ttft_ms);
    tpot.push_back(r.tpot_ms);
    gap.push_back(r.max_gap_ms);
    if (r.ttft_ms <= o.ttft_bound_ms && r.tpot_ms <= o.tpot_bound_ms) ++good;
  }
  std::printf(
      "| %s | %d/%d | %.0f / %.0f | %.1f / %.1f | %.0f | %.0f | %d of %zu (%.3f req/s) | %.1f |\n",
      mode.c_str(), ok, ok + failed, percentile(ttft, 0.5), percentile(ttft, 0.99),
      percentile(tpot, 0.5), percentile(tpot, 0.99), percentile(gap, 0.99),
      percentile(long_ttft, 0.5), good, ttft.size(), good / wall_s,
      static_cast<double>(tokens) / wall_s);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"serving_bench: disaggregated vs co-located under a mixed load"};
  app.add_option("--model", o.model, "model directory (made with `dserve model init`)")
      ->capture_default_str();
  app.add_option("--seconds", o.seconds, "how long requests arrive")->capture_default_str();
  app.add_option("--short-per-second", o.short_per_second, "arrival rate of short requests")
      ->capture_default_str();
  app.add_option("--short-prompt", o.short_prompt)->capture_default_str();
  app.add_option("--short-tokens", o.short_tokens)->capture_default_str();
  app.add_option("--long-every", o.long_every_seconds, "seconds between long prompts")
      ->capture_default_str();
  app.add_option("--long-prompt", o.long_prompt)->capture_default_str();
  app.add_option("--long-tokens", o.long_tokens)->capture_default_str();
  app.add_option("--token-budget", o.token_budget, "prefill tokens per step (both modes)")
      ->capture_default_str();
  app.add_option("--ttft-bound-ms", o.ttft_bound_ms)->capture_default_str();
  app.add_option("--tpot-bound-ms", o.tpot_bound_ms)->capture_default_str();
  app.add_option("--modes", o.modes, "disaggregated, colocated or both")->capture_default_str();
  app.add_option("--kv-dtype", o.kv_dtype, "the workers' KV format: fp32 or fp8")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "fp8"}));
  app.add_option("--device", o.device, "where the workers compute: cpu or cuda:N (they share it)")
      ->capture_default_str();
  app.add_option("--binary", o.binary, "the dserve binary the processes run")
      ->capture_default_str();
  app.add_option("--streams", o.streams,
                 "closed-loop streams of short requests (each sends its next when the last ends) "
                 "instead of --short-per-second; 0: the rate")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  app.add_option("--max-step-tokens", o.max_step_tokens,
                 "colocated: rows of one mixed step (0: dserve's default)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (!fs::exists(o.model + "/config.json")) {
    std::fprintf(stderr,
                 "serving_bench: no model at %s (dserve model init --preset small --out %s)\n",
                 o.model.c_str(), o.model.c_str());
    return 2;
  }
  std::printf(
      "serving_bench: %s on %s (kv_dtype %s), %u cores; %.0f s of load: %.2f short req/s or %d "
      "streams (%d "
      "prompt, %d out), a "
      "%d-token prompt (%d out) every %.0f s; prefill token budget %d; goodput bounds: TTFT <= "
      "%.0f ms and TPOT <= %.0f ms (short requests)\n\n",
      o.model.c_str(), o.device.c_str(), o.kv_dtype.c_str(), std::thread::hardware_concurrency(),
      o.seconds, o.short_per_second, o.streams, o.short_prompt, o.short_tokens, o.long_prompt,
      o.long_tokens, o.long_every_seconds, o.token_budget, o.ttft_bound_ms, o.tpot_bound_ms);
  std::printf(
      "| mode | completed | short TTFT p50 / p99 ms | short TPOT p50 / p99 ms | p99 worst gap ms | "
      "long TTFT p50 ms | goodput | output tok/s |\n|---|---|---|---|---|---|---|---|\n");
  const std::string budget = std::to_string(o.token_budget);
  // --device only off the CPU, --kv-dtype only for fp8: a binary from before the flags still
  // runs.
  std::vector<std::string> common{"--model", o.model, "--token-budget", budget};
  if (o.device != "cpu") common.insert(common.end(), {"--device", o.device});
  if (o.kv_dtype != "fp32") common.insert(common.end(), {"--kv-dtype", o.kv_dtype});
  auto args = [&](std::vector<std::string> a) {
    a.insert(a.end(), common.begin(), common.end());
    return a;
  };
  for (const std::string mode : {"disaggregated", "colocated"}) {
    if (o.modes != "both" && o.modes != mode) continue;
    std::vector<std::unique_ptr<Process>> procs;
    std::string prefill, decode;
    if (mode == "disaggregated") {
      procs.push_back(std::make_unique<Process>(
          o, "0", args({"serve", "--role", "prefill", "--listen", "127.0.0.1:0"})));
      prefill = procs.back()->address(0);
      procs.push_back(std::make_unique<Process>(
          o, "1", args({"serve", "--role", "decode", "--listen", "127.0.0.1:0"})));
      decode = procs.back()->address(0);
    } else {
      std::vector<std::string> colocated_args = {"serve",      "--role",      "colocated",
                                                 "--listen",   "127.0.0.1:0", "--decode-listen",
                                                 "127.0.0.1:0"};
      if (o.max_step_tokens > 0)
        colocated_args.insert(colocated_args.end(),
                              {"--max-step-tokens", std::to_string(o.max_step_tokens)});
      procs.push_back(std::make_unique<Process>(o, "", args(colocated_args)));
      prefill = procs.back()->address(0);
      decode = procs.back()->address(1);
    }
    procs.push_back(std::make_unique<Process>(
        o, "",
        std::vector<std::string>{"serve", "--role", "gateway", "--model", o.model, "--listen",
                                 "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--prefill",
                                 prefill, "--decode", decode}));
    const std::string grpc = procs.back()->address(1);
    if (prefill.empty() || decode.empty() || grpc.empty()) {
      std::fprintf(stderr, "serving_bench: the %s cluster did not start\n", mode.c_str());
      return 1;
    }
    const auto t0 = Clock::now();
    const auto records = run_load(o, grpc);
    report(o, mode, records, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return 0;
}
