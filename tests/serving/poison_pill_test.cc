// A prompt that takes down the prefill workers it is given, in a real cluster of `dserve serve`
// processes: the gateway stops replaying it after --max-prefill-losses lost workers and says
// why, and a worker that was unreachable while its request was replayed elsewhere stops that
// request's work within a step of being reachable again (the gateway owes it the cancel).
// A prefill longer than the decode reservation timeout keeps its reservation (renewed).
// The long-prompt case itself (steps bounded in time, probes answered) is measured by
// bench/poison_pill.sh; prefill_scheduler_test checks the time bound.

#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <optional>
#include <sstream>
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
using testing_support::ServeCluster;
using testing_support::ServeProcess;
using testing_support::WorkerHealth;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::unique_ptr<api::ServingClient> connect_client(const ServeCluster& cluster) {
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  EXPECT_TRUE(client.is_ok()) << client.status().to_string();
  return client.is_ok() ? std::move(client).value() : nullptr;
}

// The prefill worker the gateway's log says the request with `prompt_tokens` went to last.
ServeProcess* placed_on(ServeCluster& cluster, size_t prompt_tokens) {
  std::istringstream log(cluster.gateway->log());
  ServeProcess* found = nullptr;
  const std::string tokens = "prompt_tokens=" + std::to_string(prompt_tokens);
  for (std::string line; std::getline(log, line);) {
    if (line.find(" placed ") == std::string::npos || line.find(tokens) == std::string::npos)
      continue;
    for (const auto& p : cluster.prefill) {
      if (line.find("prefill=" + p->address() + " ") != std::string::npos) found = p.get();
    }
  }
  return found;
}

// Every prefill worker the request is placed on dies while it computes (SIGKILL as soon as the
// gateway's log shows the placement): after two losses the request fails with a reason, and
// the third worker never sees it. (Before the bound, it went round the pool until max_attempts.)
TEST(PoisonPill, APromptThatTakesDownItsWorkersIsNotReplayedPastTheBound) {
  ClusterOptions o;
  o.prefill = 3;
  o.decode = 1;
  o.prefill_args = {"--token-budget", "256"};
  o.gateway_args = {"--max-prefill-losses", "2", "--max-attempts", "8"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);

  const auto prompt = random_prompt(6000, 5100);
  std::optional<Result<api::Completion>> result;
  std::thread request([&] {
    result =
        client->generate(testing_support::request_for(prompt, 4), {}, std::chrono::seconds(120));
  });
  std::vector<ServeProcess*> killed;
  for (const auto until = Clock::now() + std::chrono::seconds(90);
       killed.size() < 3 && Clock::now() < until;) {
    std::this_thread::sleep_for(milliseconds(5));
    if (result.has_value()) break;
    ServeProcess* p = placed_on(cluster, prompt.size());
    if (p == nullptr || !p->alive()) continue;
    p->kill(SIGKILL);
    killed.push_back(p);
  }
  request.join();
  ASSERT_TRUE(result.has_value());
  ASSERT_FALSE(result->is_ok()) << "the request completed after " << killed.size()
                                << " of its prefill workers were killed\n"
                                << cluster.logs();
  EXPECT_EQ(result->status().code(), StatusCode::kResourceExhausted)
      << result->status().to_string();
  EXPECT_NE(result->status().message().find("not placed again: 2 prefill workers were lost"),
            std::string::npos)
      << result->status().to_string();
  EXPECT_EQ(killed.size(), 2u) << cluster.logs();
  size_t alive = 0;
  for (const auto& p : cluster.prefill)
    alive += p->alive() ? 1 : 0;
  EXPECT_EQ(alive, 1u);
  std::fprintf(stderr, "[ info ] poison pill: failed after %zu lost prefill workers: %s\n",
               killed.size(), result->status().to_string().c_str());
}

// A prefill worker is stopped (SIGSTOP) early in a many-step prompt; the gateway loses it,
// replays the request on the other worker (which completes it, token-exact) and owes the
// stopped one a cancel. Resumed, the worker must drop the request within a step, not compute
// the rest of the prompt for nobody (before: it ran to the end and tried a hand-off).
TEST(PoisonPill, AnAbandonedPrefillStopsWithinAStepOfItsWorkerComingBack) {
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 1;
  o.prefill_args = {"--token-budget", "256"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);

  const auto prompt = random_prompt(12000, 5200);
  std::optional<Result<api::Completion>> result;
  std::thread request([&] {
    result =
        client->generate(testing_support::request_for(prompt, 4), {}, std::chrono::seconds(120));
  });
  const ServeProcess* stopped = nullptr;
  for (const auto until = Clock::now() + std::chrono::seconds(30);
       stopped == nullptr && Clock::now() < until;) {
    std::this_thread::sleep_for(milliseconds(5));
    stopped = placed_on(cluster, prompt.size());
  }
  if (stopped == nullptr) request.join();
  ASSERT_NE(stopped, nullptr) << "the request was never placed\n" << cluster.logs();
  std::this_thread::sleep_for(milliseconds(300));
  ::kill(stopped->pid(), SIGSTOP);
  // Lost after its missed probes; the request goes to the other worker meanwhile.
  std::this_thread::sleep_for(std::chrono::seconds(10));
  ::kill(stopped->pid(), SIGCONT);
  const auto resumed = Clock::now();
  bool dropped = false;
  while (!dropped && Clock::now() - resumed < std::chrono::seconds(20)) {
    std::this_thread::sleep_for(milliseconds(50));
    dropped = stopped->log().find("was cancelled") != std::string::npos;
  }
  const double drop_s = std::chrono::duration<double>(Clock::now() - resumed).count();
  request.join();

  ASSERT_TRUE(result.has_value());
  ASSERT_TRUE(result->is_ok()) << result->status().to_string() << "\n" << cluster.logs();
  EXPECT_EQ((*result)->tokens, reference_tokens(prompt, 4));
  EXPECT_GE((*result)->usage.attempts(), 2u);
  EXPECT_TRUE(dropped) << "the resumed worker did not drop the abandoned request\n"
                       << cluster.logs();
  const std::string log = stopped->log();
  EXPECT_EQ(log.find("prefill_done"), std::string::npos) << log;
  EXPECT_EQ(log.find("refused the hand-off"), std::string::npos) << log;
  std::fprintf(stderr,
               "[ info ] abandoned prefill: dropped %.2f s after its worker resumed; the request "
               "completed on attempt %u, token-exact\n",
               drop_s, (*result)->usage.attempts());
}

// A prefill longer than the decode workers' reservation timeout: the gateway renews the
// reservation while it runs, so the hand-off is accepted on the first placement (it used to
// expire, be refused, and the request be placed again).
TEST(PoisonPill, ALongPrefillKeepsItsDecodeReservation) {
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.decode_args = {"--reservation-timeout-ms", "1500"};
  o.gateway_args = {"--reservation-renewal-ms", "300"};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  auto client = connect_client(cluster);
  ASSERT_TRUE(client);
  const auto prompt = random_prompt(20000, 5300);
  auto r = client->generate(testing_support::request_for(prompt, 3), {}, std::chrono::seconds(180));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string() << "\n" << cluster.logs();
  EXPECT_EQ(r->tokens, reference_tokens(prompt, 3));
  // The prefill took longer than the reservation timeout (or this test proves nothing).
  ASSERT_GT(r->usage.time_to_first_token_ms(), 1500.0) << "the prompt was prefilled too fast";
  EXPECT_EQ(r->usage.attempts(), 1u) << cluster.logs();
  EXPECT_EQ(cluster.decode[0]->log().find("reservation_expired"), std::string::npos)
      << cluster.decode[0]->log();
  std::fprintf(stderr,
               "[ info ] long prefill: %.0f ms to the first token, reservation timeout 1500 ms, "
               "%u placement(s)\n",
               r->usage.time_to_first_token_ms(), r->usage.attempts());
}

}  // namespace
}  // namespace dserve
