// The decode worker's hand-off protocol, deterministically: the worker runs in an actor system
// whose scheduler is CAF's test coordinator (every message is delivered on this thread when the
// test says so, and time moves only when the test fires the next timeout), over the in-process
// transport and the tiny model. The "gateway" is a scoped actor that sends the requests and reads
// the answers; the "prefill worker" is this test, which computes a prompt's state on the same
// engine and puts it into the reserved region through a second in-process transport.
//
// CAF's own test DSL (caf/test/dsl.hpp: test_coordinator_fixture, expect/allow) reports through
// CAF's unit-test engine, which is not linked here; its scheduler and clock are plain libcaf_core
// (caf/scheduler/test_coordinator.hpp), used directly with GoogleTest's checks.

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include "dserve/actors/messages.h"
#include "dserve/decode/decode_worker.h"
#include "dserve/decode/handoff_arena.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/kvstore/in_process_transport.h"
#include "dserve/model/sampler.h"
#include "dserve/model/state_handoff.h"
#include "dserve/model/state_packing.h"
#include "test_model.h"

namespace dserve::actors {
// Readable outcomes in failure messages.
void PrintTo(ReserveOutcome outcome, std::ostream* out) {
  *out << (outcome == ReserveOutcome::kGranted ? "granted" : "refused");
}
}  // namespace dserve::actors

namespace dserve::decode {
namespace {

using namespace actors;  // NOLINT: the message vocabulary
using model::testing_support::greedy_tokens;
using model::testing_support::prompt_of;
using model::testing_support::tiny_engine;

constexpr Epoch kEpoch = 77;
constexpr auto kReservationTimeout = std::chrono::seconds(5);
constexpr auto kRegionGrace = std::chrono::seconds(30);

caf::actor_system_config& testing_config(caf::actor_system_config& cfg) {
  cfg.set("scheduler.policy", caf::atom("testing"));
  cfg.set("logger.file-verbosity", caf::atom("quiet"));
  cfg.set("logger.console-verbosity", caf::atom("quiet"));
  register_message_types(cfg);
  return cfg;
}

// Collects the chunks the worker streams.
TokenSinkActor::behavior_type collect_chunks(TokenSinkActor::pointer /*self*/,
                                             std::shared_ptr<std::vector<TokenChunk>> chunks) {
  return {[chunks](TokenChunk& chunk) { chunks->push_back(std::move(chunk)); }};
}

// What a prefill worker computes for a prompt: the request (its state's pages are put from
// where they lie) and the last token's logits.
struct PrefilledPrompt {
  model::RequestHandle request;
  Tensor logits;
};

PrefilledPrompt prefill_prompt(const std::vector<int32_t>& prompt) {
  model::Engine& engine = tiny_engine();
  auto request = engine.new_request();
  EXPECT_TRUE(request.is_ok()) << request.status().to_string();
  const model::StepRows rows[1] = {{request->get(), prompt, model::LogitsFor::kLastToken}};
  auto logits = engine.step(rows);
  EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
  return {std::move(request).value(), std::move((*logits)[0])};
}

class DecodeProtocolTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kPromptTokens = 24;
  static constexpr uint32_t kMaxNewTokens = 4;

  DecodeProtocolTest()
      : decode_transport_({.name = "decode", .epoch = 0, .digest_bytes = 0}),
        prefill_transport_({.name = "prefill", .epoch = 0, .digest_bytes = 0}),
        sys_(testing_config(cfg_)),
        sched_(dynamic_cast<caf::scheduler::test_coordinator&>(sys_.scheduler())),
        gateway_(sys_, true),
        chunks_(std::make_shared<std::vector<TokenChunk>>()) {
    sink_ = sys_.spawn(collect_chunks, chunks_);
    // Not 0: the worker adds the reservation timeout and the grace to it.
    sched_.clock().current_time += std::chrono::hours(1);
  }

  ~DecodeProtocolTest() override {
    // The worker's leases deregister from the transport as its state goes, before the transport.
    if (worker_) caf::anon_send_exit(worker_, caf::exit_reason::kill);
    caf::anon_send_exit(sink_, caf::exit_reason::kill);
    sched_.run();
    worker_ = nullptr;
    sink_ = nullptr;
  }

  // What one request of kPromptTokens + kMaxNewTokens holds of the worker's budget.
  static uint64_t request_bytes() {
    const model::ModelConfig& config = tiny_engine().config();
    return std::max<uint64_t>(
        HandoffArena::lease_bytes(handoff_region_bytes(config, kPromptTokens)),
        model::packed_state_bytes(config, kPromptTokens + kMaxNewTokens));
  }

  void start_worker(int64_t max_batch, uint64_t kv_budget_bytes) {
    DecodeWorkerOptions options;
    options.max_batch = max_batch;
    options.kv_budget_bytes = kv_budget_bytes;
    options.reservation_timeout = kReservationTimeout;
    options.region_grace = kRegionGrace;
    auto worker =
        spawn_decode_worker(sys_, tiny_engine(), decode_transport_, kEpoch, "decode-0", options);
    ASSERT_TRUE(worker.is_ok()) << worker.status().to_string();
    worker_ = std::move(worker).value();
    sched_.run();
  }

  // Sends `message` from the gateway, runs every actor until nothing is left to do, and returns
  // the reply (none: the worker did not answer).
  template <class Reply, class Message>
  std::optional<Reply> ask(Message message) {
    gateway_->send(worker_, std::move(message));
    sched_.run();
    std::optional<Reply> reply;
    gateway_->receive([&](Reply& r) { reply = std::move(r); },
                      caf::after(std::chrono::seconds(0)) >> [] {});
    return reply;
  }

  ReserveReply reserve(RequestId id) {
    ReserveRequest req;
    req.request_id = id;
    req.prompt_tokens = kPromptTokens;
    req.max_new_tokens = kMaxNewTokens;
    req.stream_to = sink_;
    req.trace_id = "trace-" + std::to_string(id);
    auto reply = ask<ReserveReply>(std::move(req));
    EXPECT_TRUE(reply.has_value()) << "no ReserveReply";
    return reply.value_or(ReserveReply{});
  }

  CancelReply cancel(RequestId id) {
    auto reply = ask<CancelReply>(CancelRequest{id, "client went away"});
    EXPECT_TRUE(reply.has_value()) << "no CancelReply";
    return reply.value_or(CancelReply{});
  }

  HealthReport health() {
    auto reply = ask<HealthReport>(HealthProbe{Role::kGateway, 1, 0});
    EXPECT_TRUE(reply.has_value()) << "no HealthReport";
    return reply.value_or(HealthReport{});
  }

  // The prefill worker's part: the prompt's state and logits put into the granted region.
  // Returns the HandoffDone it would send, or the put's failure.
  Result<HandoffDone> put_state(const ReserveReply& grant, const std::vector<int32_t>& prompt) {
    auto keys = kvstore::decode_handoff_keys(grant.transfer_keys);
    if (!keys.is_ok()) return keys.status();
    PrefilledPrompt state = prefill_prompt(prompt);
    auto peer = prefill_transport_.connect(keys->peer);
    if (!peer.is_ok()) return peer.status();
    const uint64_t logit_bytes = static_cast<uint64_t>(state.logits.numel()) * sizeof(float);
    auto source = model::handoff_source(tiny_engine(), *state.request);
    if (!source.is_ok()) return source.status();
    std::vector<kvstore::PutOp> ops = source->ops;
    ops.push_back({state.logits.data(), logit_bytes, source->bytes});
    auto digests = prefill_transport_.put(*peer, keys->region, ops);
    if (!digests.is_ok()) return digests.status();
    auto runs = model::handoff_run_digests(tiny_engine().config(), state.request->position(),
                                           std::span(*digests).first(digests->size() - 1));
    if (!runs.is_ok()) return runs.status();
    runs->push_back(digests->back());
    HandoffDone done;
    done.request_id = grant.request_id;
    done.reservation_id = grant.reservation_id;
    done.decode_epoch = grant.decode_epoch;
    done.kv_tokens = static_cast<uint32_t>(prompt.size());
    done.state_checksum = (*digests)[0].xxh3;
    done.span_digests = kvstore::encode_digests(*runs);
    return done;
  }

  HandoffAck hand_off(const HandoffDone& done) {
    auto ack = ask<HandoffAck>(done);
    EXPECT_TRUE(ack.has_value()) << "no HandoffAck";
    return ack.value_or(HandoffAck{});
  }

  // Fires the worker's next timer (the test clock jumps to it) and runs what follows.
  void fire_next_timer() {
    ASSERT_TRUE(sched_.trigger_timeout()) << "no timer pending";
    sched_.run();
  }

  kvstore::InProcessTransport decode_transport_;
  kvstore::InProcessTransport prefill_transport_;
  caf::actor_system_config cfg_;
  caf::actor_system sys_;
  caf::scheduler::test_coordinator& sched_;
  caf::scoped_actor gateway_;
  std::shared_ptr<std::vector<TokenChunk>> chunks_;
  TokenSinkActor sink_;
  DecodeActor worker_;
};

// Granted, the state put into the region, HandoffDone accepted: the request decodes and its
// tokens stream to the sink, those of a greedy generate, the last chunk finished; its budget
// comes back.
TEST_F(DecodeProtocolTest, HappyPathStreamsTheGreedyTokens) {
  start_worker(4, 4 * request_bytes());
  const std::vector<int32_t> prompt = prompt_of(kPromptTokens, 1);
  const ReserveReply grant = reserve(1);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  EXPECT_EQ(grant.decode_epoch, kEpoch);
  EXPECT_EQ(decode_transport_.registered_regions(), 1u);

  auto done = put_state(grant, prompt);
  ASSERT_TRUE(done.is_ok()) << done.status().to_string();
  EXPECT_EQ(decode_transport_.puts_received(), 1u);
  const HandoffAck ack = hand_off(*done);
  EXPECT_TRUE(ack.accepted) << ack.reason;

  // ask() ran the worker until it was idle: every step has run.
  std::vector<int32_t> streamed;
  ASSERT_FALSE(chunks_->empty());
  for (const TokenChunk& chunk : *chunks_) {
    EXPECT_EQ(chunk.request_id, 1u);
    EXPECT_EQ(chunk.decode_epoch, kEpoch);
    EXPECT_EQ(chunk.first_index, streamed.size());
    EXPECT_TRUE(chunk.error.empty()) << chunk.error;
    streamed.insert(streamed.end(), chunk.tokens.begin(), chunk.tokens.end());
  }
  EXPECT_TRUE(chunks_->back().finished);
  EXPECT_EQ(streamed, greedy_tokens(tiny_engine(), prompt, kMaxNewTokens));

  const HealthReport report = health();
  EXPECT_EQ(report.active_requests, 0u);
  EXPECT_EQ(report.queued_requests, 0u);
  EXPECT_EQ(report.kv_budget_bytes_in_use, 0u);
  EXPECT_EQ(decode_transport_.registered_regions(), 0u);
}

// (a) The batch is full: refused, retryable. A cancel frees the slot: granted.
TEST_F(DecodeProtocolTest, ReserveRefusedWhileTheBatchIsFullThenGrantedAfterACancel) {
  start_worker(1, 4 * request_bytes());
  ASSERT_EQ(reserve(1).outcome, ReserveOutcome::kGranted);
  const ReserveReply refused = reserve(2);
  EXPECT_EQ(refused.outcome, ReserveOutcome::kRefused);
  EXPECT_TRUE(refused.retryable);
  EXPECT_NE(refused.reason.find("batch full"), std::string::npos) << refused.reason;

  EXPECT_TRUE(cancel(1).was_active);
  const ReserveReply granted = reserve(2);
  EXPECT_EQ(granted.outcome, ReserveOutcome::kGranted) << granted.reason;
}

// (a) The KV budget is full: refused, retryable. A cancel does not give the bytes back at once
// (the region stays fenced for the grace period, a late put may still land), so the next
// reserve is still refused; once the grace has passed on the worker's clock, granted.
TEST_F(DecodeProtocolTest, ReserveRefusedWhileTheBudgetIsFullThenGrantedOnceTheGracePassed) {
  start_worker(8, request_bytes());
  ASSERT_EQ(reserve(1).outcome, ReserveOutcome::kGranted);
  const ReserveReply refused = reserve(2);
  EXPECT_EQ(refused.outcome, ReserveOutcome::kRefused);
  EXPECT_TRUE(refused.retryable);
  EXPECT_NE(refused.reason.find("KV byte budget full"), std::string::npos) << refused.reason;

  EXPECT_TRUE(cancel(1).was_active);
  const ReserveReply fenced = reserve(2);
  EXPECT_EQ(fenced.outcome, ReserveOutcome::kRefused);
  EXPECT_TRUE(fenced.retryable);
  EXPECT_EQ(health().quarantined_regions, 1u);

  // Timers pending: reservation 1's expiry (5 s, a no-op now) and the purge (30 s).
  fire_next_timer();
  EXPECT_EQ(reserve(2).outcome, ReserveOutcome::kRefused);
  fire_next_timer();
  EXPECT_EQ(health().quarantined_regions, 0u);
  const ReserveReply granted = reserve(2);
  EXPECT_EQ(granted.outcome, ReserveOutcome::kGranted) << granted.reason;
}

// (b) The state lands, then the CancelRequest arrives before the HandoffDone: the HandoffDone is
// refused, nothing decodes, the region is deregistered at once (a later put is refused) and the
// budget comes back after the grace period.
TEST_F(DecodeProtocolTest, CancelDuringTheHandoffRefusesTheHandoffAndReturnsTheBudget) {
  const uint64_t budget = 4 * request_bytes();
  start_worker(4, budget);
  const std::vector<int32_t> prompt = prompt_of(kPromptTokens, 2);
  const ReserveReply grant = reserve(5);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  auto done = put_state(grant, prompt);
  ASSERT_TRUE(done.is_ok()) << done.status().to_string();

  EXPECT_TRUE(cancel(5).was_active);
  EXPECT_EQ(decode_transport_.registered_regions(), 0u);
  const HandoffAck ack = hand_off(*done);
  EXPECT_FALSE(ack.accepted);
  EXPECT_NE(ack.reason.find("cancelled before its hand-off (client went away)"), std::string::npos)
      << ack.reason;
  EXPECT_TRUE(chunks_->empty());

  // A put that comes later still finds no region to write into.
  auto late = put_state(grant, prompt);
  EXPECT_EQ(late.status().code(), StatusCode::kInvalidArgument) << late.status().to_string();

  HealthReport report = health();
  EXPECT_EQ(report.active_requests, 0u);
  EXPECT_EQ(report.queued_requests, 0u);
  EXPECT_EQ(report.quarantined_regions, 1u);
  EXPECT_EQ(report.handoffs_rejected, 1u);
  EXPECT_GT(report.kv_budget_bytes_in_use, 0u);

  fire_next_timer();  // the reservation's expiry: already gone
  fire_next_timer();  // the purge, once the grace has passed
  report = health();
  EXPECT_EQ(report.quarantined_regions, 0u);
  EXPECT_EQ(report.kv_budget_bytes_in_use, 0u);
  EXPECT_EQ(report.free_kv_bytes, budget);
  EXPECT_TRUE(chunks_->empty());
}

// (c) The state lands but the lease timer fires (on the test clock) before the HandoffDone: the
// reservation expires, the late HandoffDone is refused naming expiry, and the region stays
// quarantined until the grace period has passed.
TEST_F(DecodeProtocolTest, HandoffDoneAfterTheReservationExpiredIsRefused) {
  const uint64_t budget = 4 * request_bytes();
  start_worker(4, budget);
  const std::vector<int32_t> prompt = prompt_of(kPromptTokens, 3);
  const ReserveReply grant = reserve(9);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  auto done = put_state(grant, prompt);
  ASSERT_TRUE(done.is_ok()) << done.status().to_string();

  const auto granted_at = sched_.clock().now();
  fire_next_timer();  // the lease
  EXPECT_EQ(sched_.clock().now() - granted_at, kReservationTimeout);
  HealthReport report = health();
  EXPECT_EQ(report.queued_requests, 0u);
  EXPECT_EQ(report.quarantined_regions, 1u);
  EXPECT_EQ(decode_transport_.registered_regions(), 0u);

  const HandoffAck ack = hand_off(*done);
  EXPECT_FALSE(ack.accepted);
  EXPECT_NE(ack.reason.find("expired before its hand-off"), std::string::npos) << ack.reason;
  EXPECT_TRUE(chunks_->empty());

  fire_next_timer();  // the purge
  EXPECT_EQ(sched_.clock().now() - granted_at, kReservationTimeout + kRegionGrace);
  report = health();
  EXPECT_EQ(report.quarantined_regions, 0u);
  EXPECT_EQ(report.free_kv_bytes, budget);
}

// A RenewReservation moves the expiry: the first timer finds the lease renewed and waits again.
TEST_F(DecodeProtocolTest, RenewedReservationOutlivesItsFirstTimer) {
  start_worker(4, 4 * request_bytes());
  const ReserveReply grant = reserve(3);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  sched_.clock().current_time += std::chrono::seconds(2);
  auto renewed = ask<RenewReply>(RenewReservation{3, grant.reservation_id});
  ASSERT_TRUE(renewed.has_value());
  EXPECT_TRUE(renewed->renewed);
  fire_next_timer();  // 5 s after the grant: renewed at 2 s, so it lives until 7 s
  EXPECT_EQ(health().queued_requests, 1u);
  fire_next_timer();  // 7 s
  EXPECT_EQ(health().queued_requests, 0u);
}

}  // namespace
}  // namespace dserve::decode
