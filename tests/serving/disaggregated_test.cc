// The disaggregated path as real processes: one `dserve serve --role prefill` and one
// `dserve serve --role decode` on loopback (CAF for control, UCX over TCP on lo for the state),
// with this test as the gateway. Every stream must be token-identical to a plain greedy forward
// loop over the same checkpoint (what `dserve generate` runs); reservations must not leak; a
// dead decode worker must fail a request with a clear error within its deadline.

#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor_cast.hpp>

#include "dserve/actors/actor_runtime.h"
#include "dserve/core/random.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/sampler.h"
#include "fake_roles.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

using namespace actors;  // NOLINT: the message vocabulary
using testing_support::random_prompt;
using testing_support::ServeProcess;

int64_t unix_ms(std::chrono::milliseconds from_now) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             (std::chrono::system_clock::now() + from_now).time_since_epoch())
      .count();
}

struct Gateway {
  std::unique_ptr<ActorRuntime> rt;
  std::shared_ptr<testing::TokenCollector> collector = std::make_shared<testing::TokenCollector>();
  TokenSinkActor sink;
  DecodeActor decode;
  PrefillActor prefill;
  uint16_t decode_port = 0;

  void start(uint16_t prefill_port, uint16_t dport) {
    auto started = ActorRuntime::start(RuntimeConfig{});
    ASSERT_TRUE(started.is_ok()) << started.status().to_string();
    rt = std::move(started).value();
    auto gw = testing::spawn_fake_gateway(rt->system(), rt->epoch(), collector);
    rt->own(gw);
    sink = caf::actor_cast<TokenSinkActor>(gw);
    auto d = rt->connect<DecodeActor>("127.0.0.1", dport);
    ASSERT_TRUE(d.is_ok()) << d.status().to_string();
    decode = *d;
    decode_port = dport;
    auto p = rt->connect<PrefillActor>("127.0.0.1", prefill_port);
    ASSERT_TRUE(p.is_ok()) << p.status().to_string();
    prefill = *p;
  }

  Result<ReserveReply> reserve(RequestId id, uint32_t prompt_tokens, uint32_t max_new,
                               std::chrono::milliseconds deadline,
                               const model::SamplingParams& params = {}) {
    return rt->call<ReserveReply>(
        decode, ReserveRequest{id, prompt_tokens, max_new, unix_ms(deadline), sink,
                               params.temperature, params.top_k, params.top_p, params.seed});
  }

  Result<PrefillReply> prefill_to(RequestId id, const std::vector<TokenId>& prompt,
                                  const ReserveReply& r, std::chrono::milliseconds deadline) {
    PrefillRequest req{
        id, prompt, unix_ms(deadline),
        DecodeTarget{"127.0.0.1", decode_port, r.decode_epoch, r.reservation_id, r.transfer_keys}};
    return rt->call<PrefillReply>(prefill, std::move(req), deadline + std::chrono::seconds(2));
  }

  HealthReport decode_health() {
    auto h = rt->call<HealthReport>(decode, HealthProbe{Role::kGateway, rt->epoch(), 0});
    EXPECT_TRUE(h.is_ok()) << h.status().to_string();
    return h.is_ok() ? *h : HealthReport{};
  }
};

TEST(Disaggregated, PrefillThenDecodeAcrossProcessesMatchesGenerate) {
  ServeProcess prefill("prefill", "127.0.0.1", 0, {"--token-budget", "256"});
  // The 20 requests below reserve at once and wait for the prefill batches ahead of them:
  // the timeout leaves room for a loaded machine, and the orphan check below waits it out.
  constexpr int kReservationTimeoutMs = 6000;
  ServeProcess decode("decode", "127.0.0.1", 0,
                      {"--reservation-timeout-ms", std::to_string(kReservationTimeoutMs)});
  ASSERT_NE(prefill.port(), 0) << prefill.log();
  ASSERT_NE(decode.port(), 0) << decode.log();
  Gateway gw;
  ASSERT_NO_FATAL_FAILURE(gw.start(prefill.port(), decode.port()));

  const std::vector<int64_t> lengths{1,   2,   5,   17,  63,  127, 128, 129, 130, 200,
                                     255, 256, 257, 300, 333, 384, 399, 400, 3,   150};
  const auto t0 = std::chrono::steady_clock::now();
  // All requests at once: the prefill worker batches them within its token budget and the
  // decode worker decodes them in one continuous batch.
  std::vector<std::future<void>> running;
  for (size_t i = 0; i < lengths.size(); ++i) {
    running.push_back(std::async(std::launch::async, [&, i] {
      const RequestId id = 100 + i;
      const auto prompt = random_prompt(lengths[i], 7 + i);
      const uint32_t max_new = 1 + static_cast<uint32_t>(i % 12);
      const auto deadline = std::chrono::milliseconds(60000);
      // Every third request samples (temperature, top-k, top-p, its own seed).
      model::SamplingParams params;
      if (i % 3 == 2) params = {0.8f, 40, 0.9f, 1000 + i};
      auto r = gw.reserve(id, static_cast<uint32_t>(prompt.size()), max_new, deadline, params);
      ASSERT_TRUE(r.is_ok()) << r.status().to_string();
      ASSERT_EQ(r->outcome, ReserveOutcome::kGranted) << r->reason;
      ASSERT_TRUE(validate(*r).is_ok());
      auto p = gw.prefill_to(id, prompt, *r, deadline);
      ASSERT_TRUE(p.is_ok()) << p.status().to_string();
      ASSERT_EQ(p->outcome, PrefillOutcome::kDone) << p->reason;
      EXPECT_EQ(p->cached_prefix_tokens + p->computed_tokens, prompt.size());
      const auto chunks = gw.collector->wait_finished(id, 60000);
      std::vector<TokenId> got;
      for (const TokenChunk& c : chunks) {
        EXPECT_TRUE(validate(c).is_ok());
        EXPECT_EQ(c.error, "") << "request " << id;
        EXPECT_EQ(c.first_index, got.size()) << "request " << id;
        got.insert(got.end(), c.tokens.begin(), c.tokens.end());
      }
      ASSERT_FALSE(chunks.empty());
      EXPECT_TRUE(chunks.back().finished);
      EXPECT_EQ(got, testing_support::reference_tokens(prompt, max_new, params))
          << "request " << id << ", prompt of " << prompt.size() << " tokens";
    }));
  }
  for (auto& f : running)
    f.get();
  std::fprintf(stderr, "[ info ] %zu requests end to end in %.2f s\n", lengths.size(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  // Nothing is left behind: no reservation (each holds a region), nothing decoding.
  HealthReport h = gw.decode_health();
  EXPECT_EQ(h.queued_requests, 0u);
  EXPECT_EQ(h.active_requests, 0u);

  // A reservation nobody hands off to is released after the timeout.
  auto orphan = gw.reserve(900, 10, 4, std::chrono::milliseconds(60000));
  ASSERT_TRUE(orphan.is_ok() && orphan->outcome == ReserveOutcome::kGranted);
  const auto reserved_at = std::chrono::steady_clock::now();
  EXPECT_EQ(gw.decode_health().queued_requests, 1u);
  const auto give_up = reserved_at + std::chrono::milliseconds(kReservationTimeoutMs + 10000);
  while (gw.decode_health().queued_requests != 0 && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const double released_after =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - reserved_at).count();
  EXPECT_EQ(gw.decode_health().queued_requests, 0u) << decode.log();
  EXPECT_GE(released_after, kReservationTimeoutMs / 1000.0 - 0.5) << "released before its timeout";
  // A late writer (a prefill whose put was slower than the reservation) still lands in mapped
  // memory: the expired range is fenced for --region-grace-ms, and its HandoffDone is
  // refused. The decode process stays up and healthy.
  {
    auto keys = kvstore::decode_handoff_keys(orphan->transfer_keys);
    ASSERT_TRUE(keys.is_ok()) << keys.status().to_string();
    kvstore::TransferOptions topts;
    topts.transports = "tcp";
    topts.name = "late-writer";
    topts.timeout = std::chrono::milliseconds(5000);
    auto engine = kvstore::Transport::create_ucx(topts);
    ASSERT_TRUE(engine.is_ok()) << engine.status().to_string();
    auto peer = (*engine)->connect(keys->peer);
    ASSERT_TRUE(peer.is_ok()) << peer.status().to_string();
    std::vector<uint8_t> junk(std::min<uint64_t>(keys->region.bytes, 4096), 0xAB);
    const kvstore::PutOp op{junk.data(), junk.size(), 0};
    auto put = (*engine)->put(*peer, keys->region, std::span(&op, 1));
    EXPECT_TRUE(put.is_ok()) << put.status().to_string();
    ASSERT_TRUE(put.is_ok());
    auto late = gw.rt->call<HandoffAck>(
        gw.decode, HandoffDone{900, orphan->reservation_id, orphan->decode_epoch, 10, 0, 0,
                               kvstore::encode_digests(*put)});
    ASSERT_TRUE(late.is_ok()) << late.status().to_string();
    EXPECT_FALSE(late->accepted);
    EXPECT_NE(late->reason.find("expired or cancelled"), std::string::npos) << late->reason;
    EXPECT_EQ(gw.decode_health().queued_requests, 0u) << decode.log();
  }

  // Cancelling a reservation releases it at once.
  auto cancelled = gw.reserve(901, 10, 4, std::chrono::milliseconds(60000));
  ASSERT_TRUE(cancelled.is_ok() && cancelled->outcome == ReserveOutcome::kGranted);
  auto c = gw.rt->call<CancelReply>(gw.decode, CancelRequest{901, "client left"});
  ASSERT_TRUE(c.is_ok());
  EXPECT_TRUE(c->was_active);
  EXPECT_EQ(gw.decode_health().queued_requests, 0u);

  // The decode process dies between reservation and hand-off: the prefill fails with a clear
  // error, well within the request's deadline, and a new reservation fails fast.
  auto doomed = gw.reserve(902, 50, 4, std::chrono::milliseconds(60000));
  ASSERT_TRUE(doomed.is_ok() && doomed->outcome == ReserveOutcome::kGranted);
  decode.kill(SIGKILL);
  const auto kill_t = std::chrono::steady_clock::now();
  auto dead = gw.prefill_to(902, random_prompt(50, 2), *doomed, std::chrono::milliseconds(8000));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - kill_t).count();
  ASSERT_TRUE(dead.is_ok()) << dead.status().to_string() << prefill.log();
  EXPECT_EQ(dead->outcome, PrefillOutcome::kFailed);
  EXPECT_NE(dead->reason.find("decode worker"), std::string::npos) << dead->reason;
  EXPECT_LT(took, 8.0);
  std::fprintf(stderr, "[ info ] dead decode worker: failed in %.2f s: %s\n", took,
               dead->reason.c_str());
  auto refused = gw.reserve(903, 10, 4, std::chrono::milliseconds(3000));
  EXPECT_FALSE(refused.is_ok());
  prefill.kill(SIGTERM);
}

}  // namespace
}  // namespace dserve
