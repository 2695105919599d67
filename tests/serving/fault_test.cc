// Faults in a real cluster of `dserve serve` processes, driven through the gateway's gRPC
// service: a decode worker killed mid-stream, a prefill worker killed mid-prefill, a prefill
// worker stopped mid-hand-off past the decode worker's region grace, a prefill worker restarted
// on its port under load, hand-offs corrupted in flight
// (--inject-corrupt-handoffs), and a thousand requests cancelled at random points. Every
// request must end (completed, cancelled or failed with a Status, within its deadline), a
// completed one with exactly the tokens `dserve generate` makes (reference_tokens), and the
// workers must hold no pages, regions or budget once the requests are gone.

#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <latch>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "dserve/core/random.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::ServeCluster;
using testing_support::ServeProcess;
using testing_support::WorkerHealth;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Job {
  std::vector<actors::TokenId> prompt;
  uint32_t max_tokens = 8;
  model::SamplingParams params;  // temperature 0: greedy
};

v1::GenerateRequest request_for(const Job& job) {
  v1::GenerateRequest req = testing_support::request_for(job.prompt, job.max_tokens);
  if (job.params.temperature > 0) {
    req.set_temperature(job.params.temperature);
    req.set_top_k(static_cast<uint32_t>(job.params.top_k));
    req.set_top_p(job.params.top_p);
    req.set_seed(job.params.seed);
  }
  return req;
}

std::unique_ptr<api::ServingClient> connect_client(const ServeCluster& cluster) {
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  EXPECT_TRUE(client.is_ok()) << client.status().to_string();
  return client.is_ok() ? std::move(client).value() : nullptr;
}

// Checks one finished request against the reference; returns "" or what differs.
std::string check_completion(const Job& job, const Result<api::Completion>& r,
                             kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32) {
  if (!r.is_ok()) return r.status().to_string();
  const auto expected = reference_tokens(job.prompt, job.max_tokens, job.params, kv_dtype);
  std::string problems;
  if (r->tokens != expected) {
    const auto at =
        std::mismatch(r->tokens.begin(), r->tokens.end(), expected.begin(), expected.end()).first -
        r->tokens.begin();
    problems += std::to_string(r->tokens.size()) + " tokens (reference " +
                std::to_string(expected.size()) + "), first difference at " + std::to_string(at) +
                "; ";
  }
  if (r->usage.prompt_tokens() != job.prompt.size()) problems += "usage.prompt_tokens; ";
  if (r->usage.completion_tokens() != r->tokens.size()) problems += "usage.completion_tokens; ";
  return problems;
}

// Runs `jobs` concurrently (one thread each, released together); `during(i, tokens)` is called
// from request i's thread after each streamed message with its token count so far.
std::vector<Result<api::Completion>> run_concurrently(
    api::ServingClient& client, const std::vector<Job>& jobs,
    const std::function<void(size_t, size_t)>& during = {}) {
  std::vector<std::optional<Result<api::Completion>>> results(jobs.size());
  std::latch go(static_cast<std::ptrdiff_t>(jobs.size()));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < jobs.size(); ++i) {
    threads.emplace_back([&, i] {
      const v1::GenerateRequest req = request_for(jobs[i]);
      size_t tokens = 0;
      go.arrive_and_wait();
      results[i] = client.generate(
          req,
          [&](const v1::GenerateResponse& msg) {
            tokens += static_cast<size_t>(msg.tokens_size());
            if (during) during(i, tokens);
            return true;
          },
          std::chrono::seconds(60));
    });
  }
  for (auto& t : threads)
    t.join();
  std::vector<Result<api::Completion>> out;
  for (auto& r : results)
    out.push_back(std::move(*r));
  return out;
}

// Every request completed with the reference's tokens; returns how many took >= 2 placements.
size_t expect_all_correct(const std::vector<Job>& jobs,
                          const std::vector<Result<api::Completion>>& results,
                          const ServeCluster& cluster,
                          kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32) {
  size_t replayed = 0;
  std::string failures;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const std::string problem = check_completion(jobs[i], results[i], kv_dtype);
    if (!problem.empty()) {
      failures += "request " + std::to_string(i) + " (" + std::to_string(jobs[i].prompt.size()) +
                  " prompt tokens): " + problem + "\n";
      continue;
    }
    if (results[i]->usage.attempts() >= 2) ++replayed;
  }
  EXPECT_TRUE(failures.empty()) << failures << cluster.logs();
  return replayed;
}

// ---- 1. a decode worker killed while it streams ---------------------------------------------

// The decode workers speculate (three MTP drafts per request per step, always): a replay
// continues from the tokens delivered whatever was drafted, accepted or taken back before the
// kill.
TEST(Faults, DecodeKilledMidStreamReplaysOnTheOtherWorker) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 2;
  o.decode_args = {"--speculative-tokens", "3", "--speculation", "fixed"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);

  std::vector<Job> jobs;
  for (int i = 0; i < 20; ++i) {
    Job j;
    j.prompt = random_prompt(8 + 9 * i, 1000 + static_cast<uint64_t>(i));
    j.max_tokens = 48;
    // Every other request is sampled: its replay must continue the same random stream.
    if (i % 2 == 1) j.params = {0.8f, 40, 0.95f, 500u + static_cast<uint64_t>(i)};
    jobs.push_back(std::move(j));
  }
  // The kill happens on the thread of the first stream to reach 5 tokens, so that the other
  // streams are certainly still running.
  std::once_flag killed;
  std::atomic<size_t> streaming_at_kill{0};
  std::vector<std::atomic<size_t>> progress(jobs.size());
  auto results = run_concurrently(*client, jobs, [&](size_t i, size_t tokens) {
    progress[i] = tokens;
    if (tokens < 5) return;
    std::call_once(killed, [&] {
      size_t running = 0;
      for (size_t k = 0; k < jobs.size(); ++k)
        running += progress[k].load() < jobs[k].max_tokens ? 1 : 0;
      streaming_at_kill = running;
      cluster.decode[0]->kill(SIGKILL);
    });
  });

  const size_t replayed = expect_all_correct(jobs, results, cluster);
  EXPECT_GE(replayed, 1u) << "no request was on the killed decode worker";
  EXPECT_TRUE(cluster.decode[1]->alive() && cluster.prefill[0]->alive() && cluster.gateway->alive())
      << cluster.logs();
  std::fprintf(stderr,
               "[ info ] decode killed mid-stream: %zu requests (half sampled, 48 tokens each), "
               "%zu unfinished at the kill, %zu replayed (attempts >= 2), all token-exact; "
               "%.1f s\n",
               jobs.size(), streaming_at_kill.load(), replayed, seconds_since(t0));
}

// ---- 2. a prefill worker killed while it computes -------------------------------------------

TEST(Faults, PrefillKilledMidPrefillReplaysElsewhere) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 1;
  // Small steps: a long prompt takes several, so the kill lands in the middle of one.
  o.prefill_args = {"--token-budget", "256"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  WorkerHealth health;

  std::vector<Job> jobs;
  for (int i = 0; i < 6; ++i) {
    Job j;
    j.prompt = random_prompt(1500 + 100 * i, 2000 + static_cast<uint64_t>(i));
    j.max_tokens = 6;
    jobs.push_back(std::move(j));
  }
  // Kill prefill 0 as soon as it reports a prompt in progress.
  std::atomic<bool> done{false};
  std::atomic<bool> killed_busy{false};
  std::thread killer([&] {
    const auto until = Clock::now() + std::chrono::seconds(30);
    while (!done.load() && Clock::now() < until) {
      auto h = health.report(*cluster.prefill[0], milliseconds(1000));
      if (h.is_ok() && h->active_requests > 0) {
        killed_busy = true;
        cluster.prefill[0]->kill(SIGKILL);
        return;
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
  });
  auto results = run_concurrently(*client, jobs);
  done = true;
  killer.join();

  ASSERT_TRUE(killed_busy.load()) << "prefill 0 was never seen computing";
  const size_t replayed = expect_all_correct(jobs, results, cluster);
  EXPECT_GE(replayed, 1u) << "no request was on the killed prefill worker";
  EXPECT_TRUE(cluster.prefill[1]->alive() && cluster.decode[0]->alive() && cluster.gateway->alive())
      << cluster.logs();
  std::fprintf(stderr,
               "[ info ] prefill killed mid-prefill: %zu requests of 1500..2000 prompt tokens, "
               "%zu replayed, all token-exact; %.1f s\n",
               jobs.size(), replayed, seconds_since(t0));
}

// ---- 2b. a prefill worker stopped mid-hand-off for longer than the region grace ------------

// CPU time process `pid` has used (utime + stime, in clock ticks of 10 ms).
uint64_t cpu_ticks(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  std::getline(stat, text);
  const size_t close = text.rfind(')');  // the command name may hold spaces
  if (close == std::string::npos) return 0;
  std::istringstream fields(text.substr(close + 2));
  std::string field;
  uint64_t utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  return utime + stime;
}

// The red team's remote crash: a prefill worker is stopped (SIGSTOP) while it serves a
// request, for longer than the decode worker's --region-grace-ms; the gateway replays the
// request elsewhere and drops its reservation; requests keep flowing, so the dropped range is
// leased again; then the stopped worker resumes and puts the state it computed into the keys
// it still holds. The decode worker must stay up, no request may see those bytes (every one is
// token-exact, the replayed one included), and the late hand-off is refused.
TEST(Faults, PrefillStoppedPastTheRegionGraceCannotHarmTheDecodeWorker) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 1;
  // One step takes the victim's whole prompt (about 2 s here, no time bound), so a stop lands
  // inside it and the put follows the resume before any cancel can be read.
  o.prefill_args = {"--transfer-timeout-ms", "1000", "--token-budget", "16384", "--step-ms", "0"};
  o.decode_args = {"--transfer-timeout-ms", "1000", "--region-grace-ms", "1500"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  WorkerHealth health;

  struct Sent {
    Job job;
    std::optional<Result<api::Completion>> result;
  };
  std::mutex mu;
  std::vector<Sent> sent;
  auto send = [&](Job job) {
    auto r = client->generate(request_for(job), {}, std::chrono::seconds(90));
    std::lock_guard<std::mutex> lock(mu);
    sent.push_back(Sent{std::move(job), std::move(r)});
  };

  // The victim: one long prefill step; its worker is stopped while it computes it.
  Job victim;
  victim.prompt = random_prompt(12000, 4100);
  victim.max_tokens = 6;
  std::thread victim_thread([&] { send(victim); });
  const ServeProcess* stopped = nullptr;
  for (const auto until = Clock::now() + std::chrono::seconds(30);
       stopped == nullptr && Clock::now() < until;) {
    std::this_thread::sleep_for(milliseconds(5));
    std::istringstream log(cluster.gateway->log());
    for (std::string line; stopped == nullptr && std::getline(log, line);) {
      if (line.find(" placed ") == std::string::npos ||
          line.find("prompt_tokens=12000") == std::string::npos)
        continue;
      for (const auto& p : cluster.prefill) {
        if (line.find("prefill=" + p->address() + " ") != std::string::npos) stopped = p.get();
      }
    }
  }
  if (stopped == nullptr) victim_thread.join();
  ASSERT_NE(stopped, nullptr) << "the victim was never placed\n" << cluster.logs();
  // Stopped once it computes (it burns CPU; idle, it answers a probe now and then): the put
  // comes at the end of that step, after the resume.
  for (const auto until = Clock::now() + std::chrono::seconds(20); Clock::now() < until;) {
    const uint64_t before = cpu_ticks(stopped->pid());
    std::this_thread::sleep_for(milliseconds(100));
    if (cpu_ticks(stopped->pid()) >= before + 3) break;  // >= 30 ms of CPU in 100 ms
  }
  ::kill(stopped->pid(), SIGSTOP);

  // While it is stopped: the gateway gives up on it (missed probes), replays the victim on the
  // other worker and drops the reservation; short requests keep leasing decode ranges, the
  // dropped one among them once its grace (1.5 s) has passed.
  std::atomic<bool> stop{false};
  std::thread stream([&] {
    for (uint64_t n = 0; !stop.load(); ++n) {
      Job job;
      job.prompt = random_prompt(300, 4200 + n);
      job.max_tokens = 4;
      send(std::move(job));
      std::this_thread::sleep_for(milliseconds(100));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(12));
  ::kill(stopped->pid(), SIGCONT);
  // The resumed worker finishes its step and puts into the keys it kept; its HandoffDone is
  // refused (the reservation is gone). Wait for that line, with requests still flowing.
  const auto resumed = Clock::now();
  bool late_put_refused = false;
  while (!late_put_refused && Clock::now() - resumed < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(milliseconds(200));
    late_put_refused = stopped->log().find("no live reservation") != std::string::npos;
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));
  stop = true;
  stream.join();
  victim_thread.join();

  EXPECT_TRUE(late_put_refused) << "the resumed worker's late hand-off was not seen\n"
                                << cluster.logs();
  std::vector<Job> jobs;
  std::vector<Result<api::Completion>> results;
  for (auto& s : sent) {
    jobs.push_back(s.job);
    results.push_back(std::move(*s.result));
  }
  const size_t replayed = expect_all_correct(jobs, results, cluster);
  EXPECT_GE(replayed, 1u) << "the victim was not replayed";
  for (const ServeProcess* p : {cluster.prefill[0].get(), cluster.prefill[1].get(),
                                cluster.decode[0].get(), cluster.gateway.get()}) {
    EXPECT_TRUE(p->alive()) << p->role() << " " << p->address() << " died\n" << cluster.logs();
  }
  auto d = health.report(*cluster.decode[0]);
  ASSERT_TRUE(d.is_ok()) << d.status().to_string() << "\n" << cluster.logs();
  std::fprintf(stderr,
               "[ info ] prefill stopped 12 s mid-hand-off (grace 1.5 s): %zu requests, %zu "
               "replayed, all token-exact; decode refused %llu hand-offs (%llu corrupt); %.1f s\n",
               jobs.size(), replayed, static_cast<unsigned long long>(d->handoffs_rejected),
               static_cast<unsigned long long>(d->handoffs_corrupt), seconds_since(t0));
}

// ---- 3. a prefill worker restarted on its port under load -----------------------------------

TEST(Faults, PrefillRestartedUnderLoadIsUsedAgain) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 2;
  // A request may lose both prefill workers here (one restarted, then the other killed): it
  // is replayed on, as the default bound of 2 lost workers per prompt would fail it.
  o.gateway_args = {"--max-prefill-losses", "3"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  WorkerHealth health;
  auto before = health.report(*cluster.prefill[0]);
  ASSERT_TRUE(before.is_ok()) << before.status().to_string();

  // A steady stream: each sender thread sends its next request when the last one ended.
  // Phases: 0 before the restart, 1 after it, 2 after the other prefill worker was killed.
  struct Sent {
    Job job;
    int phase = 0;
    std::optional<Result<api::Completion>> result;
  };
  std::mutex mu;
  std::vector<Sent> sent;
  std::atomic<int> phase{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> senders;
  for (int s = 0; s < 6; ++s) {
    senders.emplace_back([&, s] {
      SplitMix64 rng(77 + static_cast<uint64_t>(s));
      for (uint64_t n = 0; !stop.load(); ++n) {
        Job job;
        job.prompt = random_prompt(100 + static_cast<int64_t>(rng.below(300)),
                                   3000 + 1000 * static_cast<uint64_t>(s) + n);
        job.max_tokens = 6;
        const int at = phase.load();
        auto r = client->generate(request_for(job), {}, std::chrono::seconds(60));
        std::lock_guard<std::mutex> lock(mu);
        sent.push_back(Sent{std::move(job), at, std::move(r)});
      }
    });
  }
  std::this_thread::sleep_for(milliseconds(1500));
  const bool restarted = cluster.prefill[0]->restart();
  if (restarted) {
    phase = 1;
    std::this_thread::sleep_for(milliseconds(1500));
    // From now on the restarted worker is the only prefill worker: requests complete only if
    // the gateway reconnected to its new incarnation.
    cluster.prefill[1]->kill(SIGKILL);
    phase = 2;
    std::this_thread::sleep_for(milliseconds(2000));
  }
  stop = true;
  for (auto& t : senders)
    t.join();
  ASSERT_TRUE(restarted) << "prefill 0 did not come back on its port\n" << cluster.logs();

  std::vector<Job> jobs;
  std::vector<Result<api::Completion>> results;
  size_t per_phase[3] = {0, 0, 0};
  for (auto& s : sent) {
    ++per_phase[s.phase];
    jobs.push_back(s.job);
    results.push_back(std::move(*s.result));
  }
  const size_t replayed = expect_all_correct(jobs, results, cluster);
  EXPECT_GT(per_phase[2], 0u) << "no request was sent with only the restarted worker left";

  auto after = health.report(*cluster.prefill[0]);
  ASSERT_TRUE(after.is_ok()) << after.status().to_string();
  EXPECT_NE(after->epoch, before->epoch);
  // It prefilled prompts of 100..400 tokens after its restart: their whole blocks are cached.
  EXPECT_GT(after->cached_kv_bytes, 0u);
  for (const ServeProcess* p : {cluster.prefill[0].get(), cluster.decode[0].get(),
                                cluster.decode[1].get(), cluster.gateway.get()}) {
    EXPECT_TRUE(p->alive()) << p->role() << " " << p->address() << " died\n" << cluster.logs();
  }
  std::fprintf(stderr,
               "[ info ] prefill restarted under load: %zu requests (%zu before the restart, %zu "
               "after, %zu with only the restarted worker), %zu replayed, all token-exact; "
               "restarted worker caches %llu bytes; %.1f s\n",
               jobs.size(), per_phase[0], per_phase[1], per_phase[2], replayed,
               static_cast<unsigned long long>(after->cached_kv_bytes), seconds_since(t0));
}

// ---- 4. hand-offs corrupted in flight --------------------------------------------------------

TEST(Faults, CorruptedHandoffsAreRefusedAndReplayed) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.prefill_args = {"--inject-corrupt-handoffs", "3"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  WorkerHealth health;

  // Sent together, so that the first three hand-offs belong to three different requests (a
  // replay queues behind the others' first attempts).
  std::vector<Job> jobs;
  for (int i = 0; i < 8; ++i) {
    Job j;
    j.prompt = random_prompt(20 + 30 * i, 4000 + static_cast<uint64_t>(i));
    j.max_tokens = 10;
    if (i % 2 == 1) j.params = {0.7f, 30, 0.9f, 900u + static_cast<uint64_t>(i)};
    jobs.push_back(std::move(j));
  }
  auto results = run_concurrently(*client, jobs);
  const size_t replayed = expect_all_correct(jobs, results, cluster);
  size_t two = 0;
  for (const auto& r : results)
    two += r.is_ok() && r->usage.attempts() == 2 ? 1 : 0;
  EXPECT_EQ(two, 3u);
  EXPECT_EQ(replayed, 3u);

  auto d = health.report(*cluster.decode[0]);
  auto p = health.report(*cluster.prefill[0]);
  ASSERT_TRUE(d.is_ok() && p.is_ok());
  EXPECT_EQ(d->handoffs_corrupt, 3u);
  EXPECT_EQ(d->handoffs_rejected, 3u);
  EXPECT_EQ(p->injected_faults, 3u);
  EXPECT_EQ(p->handoffs_rejected, 3u);
  std::fprintf(stderr,
               "[ info ] corrupted hand-offs: %zu requests, %zu needed 2 attempts; decode refused "
               "%llu (corrupt %llu), prefill injected %llu; all token-exact; %.1f s\n",
               jobs.size(), two, static_cast<unsigned long long>(d->handoffs_rejected),
               static_cast<unsigned long long>(d->handoffs_corrupt),
               static_cast<unsigned long long>(p->injected_faults), seconds_since(t0));
}

// ---- 4b. the same with fp8 KV: hand-offs of V4's served format, corrupt and lost ones replayed

// Every worker keeps its KV as fp8 entries and fp4 indexer keys (--kv-dtype fp8): the hand-off
// carries those bytes. Two hand-offs are corrupted in flight and a decode worker is killed while
// it streams; every request still completes with exactly what `dserve generate --kv-dtype fp8`
// makes, which is not what fp32 makes (so fp8 was in force).
TEST(Faults, Fp8KvHandOffsCorruptedAndLostAreReplayedExactly) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 2;
  o.prefill_args = {"--kv-dtype", "fp8", "--inject-corrupt-handoffs", "2"};
  o.decode_args = {"--kv-dtype", "fp8"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);

  std::vector<Job> jobs;
  size_t differ_from_fp32 = 0;
  for (int i = 0; i < 12; ++i) {
    Job j;
    j.prompt = random_prompt(40 + 23 * i, 7000 + static_cast<uint64_t>(i));
    j.max_tokens = 32;
    if (i % 2 == 1) j.params = {0.8f, 40, 0.95f, 700u + static_cast<uint64_t>(i)};
    differ_from_fp32 +=
        reference_tokens(j.prompt, j.max_tokens, j.params, kvstore::KvDtype::kFp8) !=
                reference_tokens(j.prompt, j.max_tokens, j.params)
            ? 1
            : 0;
    jobs.push_back(std::move(j));
  }
  EXPECT_GE(differ_from_fp32, 1u) << "fp8 KV gave fp32's tokens for every request";
  std::once_flag killed;
  auto results = run_concurrently(*client, jobs, [&](size_t, size_t tokens) {
    if (tokens >= 5) std::call_once(killed, [&] { cluster.decode[0]->kill(SIGKILL); });
  });
  const size_t replayed = expect_all_correct(jobs, results, cluster, kvstore::KvDtype::kFp8);
  EXPECT_GE(replayed, 2u) << "the corrupted hand-offs were not replayed";
  WorkerHealth health;
  auto p = health.report(*cluster.prefill[0]);
  ASSERT_TRUE(p.is_ok()) << p.status().to_string();
  EXPECT_EQ(p->injected_faults, 2u);
  // The surviving decode worker gives back every page once its requests are gone.
  Result<actors::HealthReport> d = health.report(*cluster.decode[1]);
  for (const auto settle = Clock::now(); Clock::now() - settle < std::chrono::seconds(10);) {
    d = health.report(*cluster.decode[1]);
    if (d.is_ok() && d->kv_pages_in_use == 0 && d->handoff_regions == 0) break;
    std::this_thread::sleep_for(milliseconds(100));
  }
  ASSERT_TRUE(d.is_ok()) << d.status().to_string();
  EXPECT_EQ(d->kv_pages_in_use, 0u);
  EXPECT_EQ(d->handoff_regions, 0u);
  std::fprintf(stderr,
               "[ info ] fp8 KV: %zu requests (half sampled), %zu of them differ from fp32; 2 "
               "hand-offs corrupted and a decode worker killed; %zu replayed; all token-exact; "
               "%.1f s\n",
               jobs.size(), differ_from_fp32, replayed, seconds_since(t0));
}

// ---- 5. random cancellations leave nothing behind --------------------------------------------

TEST(Faults, RandomCancellationsLeakNothing) {
  const auto t0 = Clock::now();
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 2;
  // Short transfer timeout and grace, so that cancelled reservations leave quarantine soon
  // (the grace must outlast every put still in flight: the transfer timeout).
  o.prefill_args.insert(o.prefill_args.end(), {"--transfer-timeout-ms", "1000"});
  o.decode_args = {"--transfer-timeout-ms", "1000", "--region-grace-ms", "1500"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  WorkerHealth health;

  std::vector<const ServeProcess*> workers;
  for (const auto& p : cluster.prefill)
    workers.push_back(p.get());
  for (const auto& d : cluster.decode)
    workers.push_back(d.get());

  constexpr size_t kRequests = 1000;
  constexpr int kThreads = 32;
  constexpr auto kTimeout = std::chrono::seconds(20);  // requests not cancelled by deadline
  // No new request after this (a wedged cluster would otherwise take kRequests / kThreads
  // timeouts to notice); the requests not sent count as failed.
  constexpr auto kRunBound = std::chrono::seconds(150);
  // A request must end within its deadline plus this margin, plus the longest stall of this
  // test process itself (measured by a heartbeat: on a shared, overloaded machine a starved
  // client cannot see the end in time, whatever the cluster does).
  constexpr auto kMargin = milliseconds(2000);
  enum class Cancel { kNone, kDeadline, kAfterTokens };
  struct Case {
    Job job;
    Cancel cancel = Cancel::kNone;
    milliseconds deadline{0};
    size_t after_tokens = 0;
    std::optional<Result<api::Completion>> result;
    size_t tokens_seen = 0;
    std::vector<actors::TokenId> streamed;
    milliseconds took{0};
  };
  std::vector<Case> cases(kRequests);
  SplitMix64 rng(2024);
  for (size_t i = 0; i < kRequests; ++i) {
    Case& c = cases[i];
    c.job.prompt = random_prompt(1 + static_cast<int64_t>(rng.below(300)), 10000 + i);
    c.job.max_tokens = 1 + static_cast<uint32_t>(rng.below(24));
    const uint64_t kind = rng.below(10);
    if (kind < 4) {
      c.cancel = Cancel::kNone;
      c.deadline = kTimeout;
    } else if (kind < 7) {
      // Often before the first token, sometimes in the middle of the stream.
      c.cancel = Cancel::kDeadline;
      c.deadline = milliseconds(1 + rng.below(150));
    } else {
      c.cancel = Cancel::kAfterTokens;
      c.deadline = kTimeout;
      c.after_tokens = 1 + rng.below(c.job.max_tokens);
    }
  }

  std::atomic<bool> running{true};
  std::atomic<int64_t> max_stall_ms{0};
  std::thread heartbeat([&] {
    while (running.load()) {
      const auto before = Clock::now();
      std::this_thread::sleep_for(milliseconds(50));
      const auto over =
          std::chrono::duration_cast<milliseconds>(Clock::now() - before) - milliseconds(50);
      if (over.count() > max_stall_ms.load()) max_stall_ms = over.count();
    }
  });
  std::atomic<size_t> next{0};
  std::atomic<size_t> ended{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < kRequests;) {
        if (Clock::now() - t0 > kRunBound) continue;
        Case& c = cases[i];
        const auto started = Clock::now();
        // The deadline goes to the gateway (timeout_ms), which must end the request by then;
        // the client's own gRPC deadline is only a backstop well after it.
        v1::GenerateRequest req = request_for(c.job);
        req.set_timeout_ms(static_cast<uint32_t>(c.deadline.count()));
        c.result = client->generate(
            req,
            [&c](const v1::GenerateResponse& msg) {
              c.streamed.insert(c.streamed.end(), msg.tokens().begin(), msg.tokens().end());
              return c.cancel != Cancel::kAfterTokens || c.streamed.size() < c.after_tokens;
            },
            c.deadline + std::chrono::seconds(10));
        c.took = std::chrono::duration_cast<milliseconds>(Clock::now() - started);
        if (const size_t n = ++ended; n % 250 == 0)
          std::fprintf(stderr, "[ info ] %zu requests ended after %.1f s\n", n, seconds_since(t0));
      }
    });
  }
  for (auto& t : threads)
    t.join();
  running = false;
  heartbeat.join();
  const double run_s = seconds_since(t0);
  const milliseconds stall(max_stall_ms.load());

  // The references, on two threads: in full for a completed request, as far as it streamed
  // for one that ended early (whatever arrived must be the start of the reference stream).
  const auto refs_started = Clock::now();
  std::vector<std::vector<actors::TokenId>> expected(kRequests);
  {
    std::atomic<size_t> next_ref{0};
    std::vector<std::thread> refs;
    for (int t = 0; t < 2; ++t) {
      refs.emplace_back([&] {
        for (size_t i; (i = next_ref.fetch_add(1)) < kRequests;) {
          const Case& c = cases[i];
          if (!c.result) continue;
          // Every completed request; every fourth one that ended early (they cost as much).
          const size_t n =
              c.result->is_ok() ? c.job.max_tokens : (i % 4 == 0 ? c.streamed.size() : 0);
          if (n > 0) expected[i] = reference_tokens(c.job.prompt, static_cast<int64_t>(n));
        }
      });
    }
    for (auto& t : refs)
      t.join();
  }
  const double refs_s = seconds_since(refs_started);

  size_t completed = 0, cancelled = 0, deadline = 0, failed = 0, late = 0, wrong = 0;
  std::string problems;
  for (size_t i = 0; i < kRequests; ++i) {
    const Case& c = cases[i];
    if (!c.result) {
      ++failed;
      problems += "request " + std::to_string(i) + ": not sent (the run took too long)\n";
      continue;
    }
    const Result<api::Completion>& r = *c.result;
    if (c.took > c.deadline + kMargin + stall) {
      ++late;
      problems += "request " + std::to_string(i) + " took " + std::to_string(c.took.count()) +
                  " ms, deadline " + std::to_string(c.deadline.count()) + " ms\n";
    }
    if (r.is_ok()) {
      ++completed;
      if (r->tokens != expected[i]) {
        ++wrong;
        problems += "request " + std::to_string(i) + ": completed with other tokens\n";
      }
    } else {
      if (i % 4 == 0 && c.streamed != expected[i]) {
        ++wrong;
        problems += "request " + std::to_string(i) +
                    ": streamed tokens that are not the "
                    "reference's\n";
      }
      switch (r.status().code()) {
        case StatusCode::kCancelled:
          ++cancelled;
          break;
        case StatusCode::kDeadlineExceeded:
          ++deadline;
          break;
        default:
          ++failed;
          problems += "request " + std::to_string(i) + ": " + r.status().to_string() + "\n";
      }
    }
  }
  EXPECT_EQ(completed + cancelled + deadline + failed, kRequests);
  EXPECT_EQ(late, 0u);
  EXPECT_EQ(wrong, 0u);
  EXPECT_EQ(failed, 0u);
  EXPECT_TRUE(problems.empty()) << problems.substr(0, 4000) << cluster.logs();

  // Settle: cancelled reservations sit out --region-grace-ms (1500 ms) in quarantine.
  const auto settle_started = Clock::now();
  auto at_rest = [&](const ServeProcess& w, const actors::HealthReport& h) {
    if (h.active_requests != 0 || h.queued_requests != 0) return false;
    if (w.role() == "decode")
      return h.kv_pages_in_use == 0 && h.handoff_regions == 0 && h.kv_budget_bytes_in_use == 0;
    return h.kv_page_bytes_in_use == h.cached_kv_bytes;
  };
  std::vector<Result<actors::HealthReport>> reports;
  for (;;) {
    reports.clear();
    bool all = true;
    for (const ServeProcess* w : workers) {
      reports.push_back(health.report(*w));
      all = all && reports.back().is_ok() && at_rest(*w, *reports.back());
    }
    if (all || Clock::now() - settle_started > std::chrono::seconds(10)) break;
    std::this_thread::sleep_for(milliseconds(100));
  }
  const double settle_s = seconds_since(settle_started);
  uint64_t decode_rejected = 0;
  for (size_t k = 0; k < workers.size(); ++k) {
    const ServeProcess& w = *workers[k];
    ASSERT_TRUE(reports[k].is_ok()) << reports[k].status().to_string() << cluster.logs();
    const actors::HealthReport& h = *reports[k];
    const std::string name = w.role() + " " + w.address();
    EXPECT_EQ(h.active_requests, 0u) << name;
    EXPECT_EQ(h.queued_requests, 0u) << name;
    if (w.role() == "decode") {
      EXPECT_EQ(h.kv_pages_in_use, 0u) << name;
      EXPECT_EQ(h.handoff_regions, 0u) << name;
      EXPECT_EQ(h.kv_budget_bytes_in_use, 0u) << name;
      decode_rejected += h.handoffs_rejected;
    } else {
      // Pages held by requests: in use minus what the prefix cache keeps.
      EXPECT_EQ(h.kv_page_bytes_in_use, h.cached_kv_bytes) << name;
    }
    EXPECT_TRUE(w.alive()) << name << " died\n" << cluster.logs();
  }
  EXPECT_TRUE(cluster.gateway->alive()) << cluster.logs();
  std::fprintf(stderr,
               "[ info ] %zu requests on %d threads (prompts 1..300, max_tokens 1..24, random "
               "cancellation): %zu completed, %zu cancelled by the client, %zu ended by their "
               "deadline, %zu failed; %zu late, %zu with wrong tokens; decode refused %llu "
               "hand-offs; longest stall of the test process %lld ms; run %.1f s, references %.1f "
               "s, settled "
               "in %.2f s; %.1f s in all\n",
               kRequests, kThreads, completed, cancelled, deadline, failed, late, wrong,
               static_cast<unsigned long long>(decode_rejected),
               static_cast<long long>(stall.count()), run_s, refs_s, settle_s, seconds_since(t0));
}

}  // namespace
}  // namespace dserve
