// The message vocabulary without an actor system: validation rules, and that every type goes
// through CAF's binary wire format unchanged.

#include "dserve/actors/messages.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>

namespace dserve::actors {
namespace {

TEST(MessagesTest, GrantedReservationNeedsIdEpochAndBoundedKeys) {
  ReserveReply r{1, ReserveOutcome::kGranted, 5, 9, std::vector<uint8_t>(16, 1), ""};
  EXPECT_TRUE(validate(r).is_ok());
  r.reservation_id = 0;
  EXPECT_EQ(validate(r).code(), StatusCode::kInvalidArgument);
  r.reservation_id = 5;
  r.transfer_keys.assign(kMaxTransferKeysBytes + 1, 0);
  auto s = validate(r);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("exceed"), std::string::npos) << s.message();
}

TEST(MessagesTest, RefusedReservationNeedsAReasonAndNoKeys) {
  ReserveReply r{1, ReserveOutcome::kRefused, 0, 9, {}, "no free pages"};
  EXPECT_TRUE(validate(r).is_ok());
  r.reason.clear();
  EXPECT_FALSE(validate(r).is_ok());
  r.reason = "x";
  r.transfer_keys = {1};
  EXPECT_FALSE(validate(r).is_ok());
}

TEST(MessagesTest, PrefillRequestNeedsPromptAndTarget) {
  PrefillRequest p{3, {1, 2}, 0, {"127.0.0.1", 4000, 7, 1, {1, 2}}};
  EXPECT_TRUE(validate(p).is_ok());
  p.prompt.clear();
  EXPECT_NE(validate(p).message().find("request 3: empty prompt"), std::string::npos);
  p.prompt = {1};
  p.target.port = 0;
  EXPECT_FALSE(validate(p).is_ok());
}

TEST(MessagesTest, TraceIdIsBoundedAndTravels) {
  caf::actor_system_config cfg;
  register_message_types(cfg);
  caf::actor_system sys{cfg};
  ReserveRequest r;
  r.request_id = 4;
  r.trace_id = std::string(kMaxTraceIdBytes, 'x');
  EXPECT_TRUE(validate(r).is_ok());
  r.trace_id.push_back('x');
  EXPECT_NE(validate(r).message().find("request 4: trace id of 129 bytes"), std::string::npos)
      << validate(r).message();
  PrefillRequest p{3, {1, 2}, 0, {"127.0.0.1", 4000, 7, 1, {1, 2}}, std::string(129, 'y')};
  EXPECT_EQ(validate(p).code(), StatusCode::kInvalidArgument);
  p.trace_id = "client-req-1";
  EXPECT_TRUE(validate(p).is_ok());

  std::vector<char> buf;
  caf::binary_serializer sink{sys, buf};
  r.trace_id = "client \"req\" 2";
  ASSERT_FALSE(sink(r, p));
  ReserveRequest r2;
  PrefillRequest p2;
  caf::binary_deserializer source{sys, buf};
  ASSERT_FALSE(source(r2, p2));
  EXPECT_EQ(r2.trace_id, r.trace_id);
  EXPECT_EQ(p2.trace_id, "client-req-1");
}

TEST(MessagesTest, TokenChunkErrorImpliesFinished) {
  EXPECT_TRUE(validate(TokenChunk{1, 2, 0, {5}, false, ""}).is_ok());
  EXPECT_TRUE(validate(TokenChunk{1, 2, 0, {}, true, "oom"}).is_ok());
  EXPECT_FALSE(validate(TokenChunk{1, 2, 0, {5}, false, "oom"}).is_ok());
  EXPECT_FALSE(validate(TokenChunk{1, 2, 0, {}, false, ""}).is_ok());
}

template <class T>
T round_trip(caf::actor_system& sys, T x) {
  std::vector<char> buf;
  caf::binary_serializer sink{sys, buf};
  EXPECT_FALSE(sink(x));
  T y;
  caf::binary_deserializer source{sys, buf};
  EXPECT_FALSE(source(y));
  return y;
}

TEST(MessagesTest, WireFormatRoundTrips) {
  caf::actor_system_config cfg;
  register_message_types(cfg);
  caf::actor_system sys{cfg};

  auto a = round_trip(sys, ReserveReply{7, ReserveOutcome::kGranted, 3, 11, {0, 255, 7}, "r"});
  EXPECT_EQ(a.request_id, 7u);
  EXPECT_EQ(a.outcome, ReserveOutcome::kGranted);
  EXPECT_EQ(a.reservation_id, 3u);
  EXPECT_EQ(a.decode_epoch, 11u);
  EXPECT_EQ(a.transfer_keys, std::vector<uint8_t>({0, 255, 7}));
  EXPECT_EQ(a.reason, "r");

  auto b = round_trip(sys, PrefillRequest{9, {-1, 0, 129279}, 1234, {"h", 80, 5, 6, {9}}});
  EXPECT_EQ(b.prompt, std::vector<TokenId>({-1, 0, 129279}));
  EXPECT_EQ(b.deadline_unix_ms, 1234);
  EXPECT_EQ(b.target.host, "h");
  EXPECT_EQ(b.target.port, 80);
  EXPECT_EQ(b.target.epoch, 5u);
  EXPECT_EQ(b.target.reservation_id, 6u);
  EXPECT_EQ(b.target.transfer_keys, std::vector<uint8_t>({9}));

  auto c = round_trip(sys, TokenChunk{1, 2, 3, {4, 5}, true, "e"});
  EXPECT_EQ(c.first_index, 3u);
  EXPECT_EQ(c.tokens, std::vector<TokenId>({4, 5}));
  EXPECT_TRUE(c.finished);
  EXPECT_EQ(c.error, "e");

  auto d = round_trip(sys, HealthReport{Role::kDecode,
                                        42,
                                        "n",
                                        5,
                                        6,
                                        7,
                                        8,
                                        9,
                                        10,
                                        11,
                                        12,
                                        13,
                                        14,
                                        15,
                                        16,
                                        17,
                                        18,
                                        19,
                                        20,
                                        21,
                                        std::vector<double>{1.5, 0.0, 2.5}});
  EXPECT_EQ(d.role, Role::kDecode);
  EXPECT_EQ(d.epoch, 42u);
  EXPECT_EQ(d.free_kv_bytes, 8u);
  EXPECT_EQ(d.kv_budget_bytes_in_use, 9u);
  EXPECT_EQ(d.drafted_tokens, 18u);
  EXPECT_EQ(d.verify_committed_tokens, 21u);
  EXPECT_EQ(d.speculation_tokens_per_second, (std::vector<double>{1.5, 0.0, 2.5}));
  EXPECT_EQ(d.kv_pages_in_use, 10u);
  EXPECT_EQ(d.kv_page_bytes_in_use, 11u);
  EXPECT_EQ(d.cached_kv_bytes, 12u);
  EXPECT_EQ(d.handoff_regions, 13u);
  EXPECT_EQ(d.quarantined_regions, 14u);
  EXPECT_EQ(d.handoffs_rejected, 15u);
  EXPECT_EQ(d.handoffs_corrupt, 16u);
  EXPECT_EQ(d.injected_faults, 17u);

  auto e = round_trip(sys, HandoffDone{1, 2, 3, 4, 0xdeadbeefcafeULL, -7, {9, 8, 7}});
  EXPECT_EQ(e.state_checksum, 0xdeadbeefcafeULL);
  EXPECT_EQ(e.first_token, -7);
  EXPECT_EQ(e.span_digests, (std::vector<uint8_t>{9, 8, 7}));
  EXPECT_TRUE(validate(e).is_ok());
  EXPECT_FALSE(validate(HandoffDone{1, 2, 3, 4, 0, 0, {}}).is_ok());
  EXPECT_FALSE(validate(HandoffDone{1, 0, 3, 4, 0, 0, {1}}).is_ok());
}

}  // namespace
}  // namespace dserve::actors
