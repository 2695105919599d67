// Two (three) real CAF actor systems in one process, talking over loopback TCP through the
// middleman: every control message type makes a round trip through the wire format.

#include "dserve/actors/actor_runtime.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "fake_roles.h"
#include "test_runtime.h"

namespace dserve::actors {
namespace {

using namespace std::chrono_literals;

using testing::start_runtime;

class ActorRuntimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    gateway_ = start_runtime(Role::kGateway);
    decode_ = start_runtime(Role::kDecode);
    prefill_ = start_runtime(Role::kPrefill);
    collector_ = std::make_shared<testing::TokenCollector>();

    auto gw = testing::spawn_fake_gateway(gateway_->system(), gateway_->epoch(), collector_);
    auto gw_port = gateway_->publish(gw);
    ASSERT_TRUE(gw_port.is_ok()) << gw_port.status().to_string();
    gateway_actor_ = gw;

    auto dec = decode_->publish(testing::spawn_fake_decode(decode_->system(), decode_->epoch(),
                                                           /*capacity_tokens=*/4096));
    ASSERT_TRUE(dec.is_ok()) << dec.status().to_string();
    decode_port_ = *dec;
    auto pre =
        prefill_->publish(testing::spawn_fake_prefill(prefill_->system(), prefill_->epoch()));
    ASSERT_TRUE(pre.is_ok()) << pre.status().to_string();
    prefill_port_ = *pre;
  }

  std::unique_ptr<ActorRuntime> gateway_, decode_, prefill_;
  std::shared_ptr<testing::TokenCollector> collector_;
  GatewayActor gateway_actor_;
  uint16_t decode_port_ = 0;
  uint16_t prefill_port_ = 0;
};

TEST_F(ActorRuntimeTest, PublishReportsTheBoundPortAndEpochsDiffer) {
  EXPECT_NE(decode_port_, 0);
  EXPECT_NE(prefill_port_, 0);
  EXPECT_EQ(decode_->published_port(), decode_port_);
  EXPECT_NE(gateway_->epoch(), 0u);
  EXPECT_NE(gateway_->epoch(), decode_->epoch());
  EXPECT_NE(decode_->epoch(), prefill_->epoch());
  EXPECT_EQ(decode_->config().node_name, "decode@127.0.0.1:" + std::to_string(decode_port_));
}

TEST_F(ActorRuntimeTest, EveryMessageTypeRoundTripsBetweenSystems) {
  auto decode = gateway_->connect<DecodeActor>("127.0.0.1", decode_port_);
  ASSERT_TRUE(decode.is_ok()) << decode.status().to_string();
  auto prefill = gateway_->connect<PrefillActor>("127.0.0.1", prefill_port_);
  ASSERT_TRUE(prefill.is_ok()) << prefill.status().to_string();

  // gateway -> decode: reserve (granted), with the gateway's sink travelling as a handle.
  ReserveRequest reserve{7, 100, 20, 1'700'000'000'000, gateway_actor_};
  auto granted = gateway_->call<ReserveReply>(*decode, reserve);
  ASSERT_TRUE(granted.is_ok()) << granted.status().to_string();
  EXPECT_EQ(granted->request_id, 7u);
  EXPECT_EQ(granted->outcome, ReserveOutcome::kGranted);
  EXPECT_EQ(granted->decode_epoch, decode_->epoch());
  ASSERT_EQ(granted->transfer_keys.size(), 16u);
  EXPECT_NE(granted->reservation_id, 0u);
  EXPECT_TRUE(validate(*granted).is_ok()) << validate(*granted).to_string();

  // ... and refused, with a reason.
  auto refused = gateway_->call<ReserveReply>(*decode, ReserveRequest{8, 5000, 1, 0, {}});
  ASSERT_TRUE(refused.is_ok()) << refused.status().to_string();
  EXPECT_EQ(refused->outcome, ReserveOutcome::kRefused);
  EXPECT_NE(refused->reason.find("4096 free"), std::string::npos) << refused->reason;
  EXPECT_TRUE(validate(*refused).is_ok());

  // gateway -> prefill: token ids, deadline and the decode target with its blob.
  PrefillRequest prefill_req;
  prefill_req.request_id = 7;
  prefill_req.prompt = {1, 2, 3, 100000, -1};
  prefill_req.deadline_unix_ms = 1'700'000'000'000;
  prefill_req.target = {"127.0.0.1", decode_port_, granted->decode_epoch, granted->reservation_id,
                        granted->transfer_keys};
  ASSERT_TRUE(validate(prefill_req).is_ok()) << validate(prefill_req).to_string();
  auto done = gateway_->call<PrefillReply>(*prefill, prefill_req);
  ASSERT_TRUE(done.is_ok()) << done.status().to_string();
  EXPECT_EQ(done->outcome, PrefillOutcome::kDone);
  EXPECT_EQ(done->computed_tokens, 5u);
  EXPECT_EQ(done->reason, "127.0.0.1:" + std::to_string(decode_port_) + "/" +
                              std::to_string(granted->reservation_id) + "/16");
  auto failed = gateway_->call<PrefillReply>(*prefill, PrefillRequest{9, {}, 0, {}});
  ASSERT_TRUE(failed.is_ok());
  EXPECT_EQ(failed->outcome, PrefillOutcome::kFailed);
  EXPECT_EQ(failed->reason, "empty prompt");

  // prefill -> decode: hand-off, from the prefill process's own connection.
  auto decode_from_prefill = prefill_->connect<DecodeActor>("127.0.0.1", decode_port_);
  ASSERT_TRUE(decode_from_prefill.is_ok()) << decode_from_prefill.status().to_string();
  auto stale = prefill_->call<HandoffAck>(
      *decode_from_prefill,
      HandoffDone{7, granted->reservation_id, granted->decode_epoch + 1, 100, 0xabc, 42, {}});
  ASSERT_TRUE(stale.is_ok());
  EXPECT_FALSE(stale->accepted);
  EXPECT_NE(stale->reason.find("stale epoch"), std::string::npos);
  auto ack = prefill_->call<HandoffAck>(
      *decode_from_prefill,
      HandoffDone{7, granted->reservation_id, granted->decode_epoch, 100, 0xabc, 42, {}});
  ASSERT_TRUE(ack.is_ok()) << ack.status().to_string();
  EXPECT_TRUE(ack->accepted) << ack->reason;

  // decode -> gateway: the token stream arrives at the sink named in ReserveRequest.
  auto chunks = collector_->wait_finished(7, 5000);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].first_index, 0u);
  EXPECT_EQ(chunks[0].tokens, std::vector<TokenId>({42}));
  EXPECT_FALSE(chunks[0].finished);
  EXPECT_EQ(chunks[1].first_index, 1u);
  EXPECT_EQ(chunks[1].tokens, std::vector<TokenId>({43, 44}));
  EXPECT_TRUE(chunks[1].finished);
  EXPECT_TRUE(chunks[1].error.empty());
  EXPECT_EQ(chunks[1].decode_epoch, decode_->epoch());

  // gateway -> decode / prefill: cancellation.
  auto second = gateway_->call<ReserveReply>(*decode, ReserveRequest{11, 10, 10, 0, {}});
  ASSERT_TRUE(second.is_ok());
  auto cancelled = gateway_->call<CancelReply>(*decode, CancelRequest{11, "client went away"});
  ASSERT_TRUE(cancelled.is_ok());
  EXPECT_TRUE(cancelled->was_active);
  auto again = gateway_->call<CancelReply>(*decode, CancelRequest{11, "again"});
  ASSERT_TRUE(again.is_ok());
  EXPECT_FALSE(again->was_active);
  auto prefill_cancel = gateway_->call<CancelReply>(*prefill, CancelRequest{7, "x"});
  ASSERT_TRUE(prefill_cancel.is_ok());
  EXPECT_EQ(prefill_cancel->request_id, 7u);

  // any -> any: health with epochs.
  HealthProbe probe{Role::kGateway, gateway_->epoch(), 123};
  auto dh = gateway_->call<HealthReport>(*decode, probe);
  ASSERT_TRUE(dh.is_ok());
  EXPECT_EQ(dh->role, Role::kDecode);
  EXPECT_EQ(dh->epoch, decode_->epoch());
  auto ph = gateway_->call<HealthReport>(*prefill, probe);
  ASSERT_TRUE(ph.is_ok());
  EXPECT_EQ(ph->role, Role::kPrefill);
  EXPECT_EQ(ph->epoch, prefill_->epoch());
  auto gateway_from_decode =
      decode_->connect<GatewayActor>("127.0.0.1", *gateway_->published_port());
  ASSERT_TRUE(gateway_from_decode.is_ok()) << gateway_from_decode.status().to_string();
  auto gh = decode_->call<HealthReport>(*gateway_from_decode,
                                        HealthProbe{Role::kDecode, decode_->epoch(), 0});
  ASSERT_TRUE(gh.is_ok());
  EXPECT_EQ(gh->epoch, gateway_->epoch());
}

TEST_F(ActorRuntimeTest, ConnectingWhereNothingListensNamesTheAddress) {
  // Publish and close a runtime to get a port that nobody listens on any more.
  uint16_t dead_port = 0;
  {
    auto rt = start_runtime(Role::kDecode);
    auto p = rt->publish(testing::spawn_fake_decode(rt->system(), rt->epoch(), 1));
    ASSERT_TRUE(p.is_ok());
    dead_port = *p;
  }
  auto r = gateway_->connect<DecodeActor>("127.0.0.1", dead_port, 1000ms);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("127.0.0.1:" + std::to_string(dead_port)), std::string::npos)
      << r.status().message();
}

TEST_F(ActorRuntimeTest, ConnectingWithTheWrongInterfaceIsRejected) {
  auto r = gateway_->connect<PrefillActor>("127.0.0.1", decode_port_);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("does not implement"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("dserve.PrefillRequest"), std::string::npos)
      << r.status().message();
}

TEST_F(ActorRuntimeTest, OneControlAddressPerProcess) {
  auto again = decode_->publish(testing::spawn_fake_decode(decode_->system(), 1, 1));
  ASSERT_FALSE(again.is_ok());
  EXPECT_NE(again.status().message().find("already published"), std::string::npos);
}

TEST(ActorRuntimeConfigTest, PublishOnAnAddressThatIsNotLocalFailsWithIt) {
  RuntimeConfig cfg;
  cfg.role = Role::kPrefill;
  cfg.listen_host = "192.0.2.1";  // TEST-NET-1: never a local address
  auto rt = ActorRuntime::start(cfg);
  ASSERT_TRUE(rt.is_ok());
  auto p = (*rt)->publish(testing::spawn_fake_prefill((*rt)->system(), 1));
  ASSERT_FALSE(p.is_ok());
  EXPECT_NE(p.status().message().find("192.0.2.1:0"), std::string::npos) << p.status().message();
}

TEST(ActorRuntimeConfigTest, PortInUseIsReported) {
  auto first = start_runtime(Role::kDecode);
  auto p = first->publish(testing::spawn_fake_decode(first->system(), 1, 1));
  ASSERT_TRUE(p.is_ok());
  RuntimeConfig cfg;
  cfg.role = Role::kDecode;
  cfg.listen_port = *p;
  auto second = ActorRuntime::start(cfg);
  ASSERT_TRUE(second.is_ok());
  auto q = (*second)->publish(testing::spawn_fake_decode((*second)->system(), 2, 1));
  ASSERT_FALSE(q.is_ok()) << "two processes bound the same control port";
  EXPECT_NE(q.status().message().find("127.0.0.1:" + std::to_string(*p)), std::string::npos)
      << q.status().message();
}

TEST(ActorRuntimeConfigTest, InvalidConfigurationIsRejected) {
  RuntimeConfig cfg;
  cfg.listen_host = "";
  EXPECT_EQ(ActorRuntime::start(cfg).status().code(), StatusCode::kInvalidArgument);
  cfg.listen_host = "127.0.0.1";
  cfg.scheduler_threads = 0;
  EXPECT_EQ(ActorRuntime::start(cfg).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dserve::actors
