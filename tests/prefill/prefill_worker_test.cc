// The prefill worker's hand-off over the in-process transport: a decode worker (its own engine
// over the tiny model) published on a free loopback port, a prefill worker in a second actor
// runtime of the same process; the test plays the gateway. The prefill worker puts the state
// into the region the decode worker reserved (a memcpy through kvstore::InProcessTransport),
// sends the HandoffDone over the control plane, and answers once the decode worker acknowledged;
// the tokens then stream to the test's sink.

#include "dserve/prefill/prefill_worker.h"

#include <gtest/gtest.h>

#include <caf/all.hpp>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/decode_interface.h"
#include "dserve/decode/decode_worker.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/kvstore/in_process_transport.h"
#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::prefill {
namespace {

using namespace actors;  // NOLINT: the message vocabulary
using model::testing_support::greedy_tokens;
using model::testing_support::prompt_of;
using model::testing_support::tiny_engine;
using model::testing_support::tiny_model_shared;

constexpr uint32_t kMaxNewTokens = 4;

// The chunks a sink actor received, readable from the test's thread.
struct Received {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<TokenChunk> chunks;

  // Waits up to `timeout` for a finished chunk; returns every chunk so far.
  std::vector<TokenChunk> until_finished(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu);
    cv.wait_for(lock, timeout, [&] { return !chunks.empty() && chunks.back().finished; });
    return chunks;
  }
};

TokenSinkActor::behavior_type collect_chunks(TokenSinkActor::pointer /*self*/,
                                             std::shared_ptr<Received> received) {
  return {[received](TokenChunk& chunk) {
    std::lock_guard lock(received->mu);
    received->chunks.push_back(std::move(chunk));
    received->cv.notify_all();
  }};
}

class PrefillWorkerTest : public ::testing::Test {
 protected:
  void start(const PrefillWorkerOptions& prefill_options) {
    // The decode side computes on an engine of its own: the two workers run on different
    // threads, and an engine has one owner.
    auto engine = model::make_engine(tiny_model_shared(), model::EngineOptions{});
    ASSERT_TRUE(engine.is_ok()) << engine.status().to_string();
    decode_engine_ = std::move(engine).value();

    RuntimeConfig decode_config;
    decode_config.role = Role::kDecode;
    auto decode_rt = ActorRuntime::start(decode_config);
    ASSERT_TRUE(decode_rt.is_ok()) << decode_rt.status().to_string();
    decode_rt_ = std::move(decode_rt).value();
    decode::DecodeWorkerOptions decode_options;
    decode_options.max_batch = 4;
    decode_options.kv_budget_bytes = 64u << 20;
    auto decode_worker =
        decode::spawn_decode_worker(decode_rt_->system(), *decode_engine_, decode_transport_,
                                    decode_rt_->epoch(), "decode-0", decode_options);
    ASSERT_TRUE(decode_worker.is_ok()) << decode_worker.status().to_string();
    auto port = decode_rt_->publish(*decode_worker);
    ASSERT_TRUE(port.is_ok()) << port.status().to_string();
    decode_port_ = *port;

    RuntimeConfig prefill_config;
    prefill_config.role = Role::kPrefill;
    auto prefill_rt = ActorRuntime::start(prefill_config);
    ASSERT_TRUE(prefill_rt.is_ok()) << prefill_rt.status().to_string();
    prefill_rt_ = std::move(prefill_rt).value();
    auto cache = model::PrefixCache::open(tiny_engine(), "prefill-worker-test", {});
    ASSERT_TRUE(cache.is_ok()) << cache.status().to_string();
    cache_ = std::move(cache).value();
    prefill_ = spawn_prefill_worker(prefill_rt_->system(), *cache_, prefill_transport_,
                                    prefill_rt_->epoch(), "prefill-0", prefill_options);
    prefill_rt_->own(prefill_);
    sink_ = prefill_rt_->system().spawn(collect_chunks, received_);
    prefill_rt_->own(sink_);
    auto decode = prefill_rt_->connect<DecodeActor>("127.0.0.1", decode_port_);
    ASSERT_TRUE(decode.is_ok()) << decode.status().to_string();
    decode_ = *decode;
  }

  // The gateway's reservation for `prompt`.
  ReserveReply reserve(RequestId id, const std::vector<int32_t>& prompt) {
    ReserveRequest req;
    req.request_id = id;
    req.prompt_tokens = static_cast<uint32_t>(prompt.size());
    req.max_new_tokens = kMaxNewTokens;
    req.stream_to = sink_;
    auto reply = prefill_rt_->call<ReserveReply>(decode_, std::move(req));
    EXPECT_TRUE(reply.is_ok()) << reply.status().to_string();
    return reply.is_ok() ? std::move(reply).value() : ReserveReply{};
  }

  // The gateway's PrefillRequest for a granted reservation; the prefill worker's reply.
  Result<PrefillReply> prefill(RequestId id, const std::vector<int32_t>& prompt,
                               const ReserveReply& grant) {
    PrefillRequest req;
    req.request_id = id;
    req.prompt = prompt;
    req.target = {"127.0.0.1", decode_port_, grant.decode_epoch, grant.reservation_id,
                  grant.transfer_keys};
    return prefill_rt_->call<PrefillReply>(prefill_, std::move(req), std::chrono::seconds(60));
  }

  HealthReport decode_health() {
    auto report = prefill_rt_->call<HealthReport>(decode_, HealthProbe{Role::kGateway, 1, 0});
    EXPECT_TRUE(report.is_ok()) << report.status().to_string();
    return report.is_ok() ? std::move(report).value() : HealthReport{};
  }

  // Declared first, destroyed last: the runtimes' actors hold regions of the transports and
  // requests of the engines.
  kvstore::InProcessTransport decode_transport_{{.name = "decode", .epoch = 0, .digest_bytes = 0}};
  kvstore::InProcessTransport prefill_transport_{
      {.name = "prefill", .epoch = 0, .digest_bytes = 0}};
  std::unique_ptr<model::Engine> decode_engine_;
  std::unique_ptr<model::PrefixCache> cache_;
  std::shared_ptr<Received> received_ = std::make_shared<Received>();
  std::unique_ptr<ActorRuntime> decode_rt_;
  std::unique_ptr<ActorRuntime> prefill_rt_;
  uint16_t decode_port_ = 0;
  PrefillActor prefill_;
  TokenSinkActor sink_;
  DecodeActor decode_;
};

// The prefill worker computes the prompt, puts [state][logits] into the decode worker's region
// through the in-process transport, and answers done once the decode worker accepted; the
// decode worker then streams the tokens of a greedy generate.
TEST_F(PrefillWorkerTest, PutsTheStateIntoTheDecodeRegionAndTheRequestDecodes) {
  const std::vector<int32_t> prompt = prompt_of(40, 11);
  const std::vector<int32_t> expected = greedy_tokens(tiny_engine(), prompt, kMaxNewTokens);
  start({});
  if (HasFatalFailure()) return;
  const ReserveReply grant = reserve(1, prompt);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;

  auto reply = prefill(1, prompt, grant);
  ASSERT_TRUE(reply.is_ok()) << reply.status().to_string();
  EXPECT_EQ(reply->outcome, actors::PrefillOutcome::kDone) << reply->reason;
  EXPECT_EQ(reply->computed_tokens + reply->cached_prefix_tokens, prompt.size());
  EXPECT_GT(reply->transfer_bytes, 0u);
  EXPECT_EQ(decode_transport_.puts_received(), 1u);

  const std::vector<TokenChunk> chunks = received_->until_finished(std::chrono::seconds(30));
  ASSERT_FALSE(chunks.empty());
  std::vector<int32_t> streamed;
  for (const TokenChunk& chunk : chunks) {
    EXPECT_TRUE(chunk.error.empty()) << chunk.error;
    streamed.insert(streamed.end(), chunk.tokens.begin(), chunk.tokens.end());
  }
  EXPECT_TRUE(chunks.back().finished);
  EXPECT_EQ(streamed, expected);
}

// With a corrupted hand-off injected, the bytes in the region no longer match the digests: the
// decode worker refuses the HandoffDone, and the prefill worker answers failed, saying so.
TEST_F(PrefillWorkerTest, ACorruptedHandoffIsRefusedByTheDecodeWorker) {
  PrefillWorkerOptions options;
  options.inject_corrupt_handoffs = 1;
  start(options);
  if (HasFatalFailure()) return;
  const std::vector<int32_t> prompt = prompt_of(30, 12);
  const ReserveReply grant = reserve(2, prompt);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  auto reply = prefill(2, prompt, grant);
  ASSERT_TRUE(reply.is_ok()) << reply.status().to_string();
  EXPECT_EQ(reply->outcome, actors::PrefillOutcome::kFailed);
  EXPECT_NE(reply->reason.find("refused the hand-off"), std::string::npos) << reply->reason;
  EXPECT_EQ(decode_transport_.puts_received(), 2u);  // the state, then the flipped byte
  const HealthReport report = decode_health();
  EXPECT_EQ(report.handoffs_rejected, 1u);
  EXPECT_EQ(report.handoffs_corrupt, 1u);
  EXPECT_EQ(report.active_requests, 0u);
}

// Keys of a decode transport that is gone (its process restarted): the put fails before any
// byte moves and the prefill worker answers failed, naming the transfer.
TEST_F(PrefillWorkerTest, KeysOfAGoneTransportFailThePrefill) {
  start({});
  if (HasFatalFailure()) return;
  const std::vector<int32_t> prompt = prompt_of(20, 13);
  ReserveReply grant = reserve(3, prompt);
  ASSERT_EQ(grant.outcome, ReserveOutcome::kGranted) << grant.reason;
  {
    // Keys naming a transport of this process that no longer exists.
    kvstore::InProcessTransport gone({.name = "decode", .epoch = 0, .digest_bytes = 0});
    auto region = gone.allocate_memory(1u << 20);
    ASSERT_TRUE(region.is_ok());
    grant.transfer_keys =
        kvstore::encode_handoff_keys({gone.local_address(), gone.describe(*region).value()});
  }
  auto reply = prefill(3, prompt, grant);
  ASSERT_TRUE(reply.is_ok()) << reply.status().to_string();
  EXPECT_EQ(reply->outcome, actors::PrefillOutcome::kFailed);
  EXPECT_NE(reply->reason.find("no such transport"), std::string::npos) << reply->reason;
  EXPECT_EQ(decode_transport_.puts_received(), 0u);
}

}  // namespace
}  // namespace dserve::prefill
