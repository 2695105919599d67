// HandoffArena: leases, fencing and reuse of ranges, and what late puts from a second engine
// (over TCP, where nothing on the receiving side can refuse them) do to abandoned and reused
// ranges: they land inside the arena's mapping, never in unmapped memory.

#include "dserve/decode/handoff_arena.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "gtest/gtest.h"

namespace dserve::decode {
namespace {

using Clock = HandoffArena::Clock;

std::unique_ptr<kvstore::Transport> make_engine(const std::string& name) {
  kvstore::TransferOptions options;
  options.transports = "tcp";
  options.name = name;
  options.timeout = std::chrono::seconds(10);
  auto engine = kvstore::Transport::create_ucx(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().to_string();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

constexpr uint64_t kPage = 4096;

TEST(HandoffArena, LeasesFirstFitAndCoalescesWhatIsReleased) {
  auto engine = make_engine("decode");
  ASSERT_TRUE(engine);
  auto arena = HandoffArena::create(*engine, 10 * kPage);
  ASSERT_TRUE(arena.is_ok()) << arena.status().to_string();
  HandoffArena& a = **arena;
  EXPECT_EQ(a.capacity(), 10 * kPage);

  auto first = a.lease(1);  // rounded up to a page
  auto second = a.lease(3 * kPage);
  auto third = a.lease(kPage + 1);
  ASSERT_TRUE(first.is_ok() && second.is_ok() && third.is_ok());
  EXPECT_EQ(first->offset, 0u);
  EXPECT_EQ(first->bytes, kPage);
  EXPECT_EQ(second->offset, kPage);
  EXPECT_EQ(third->offset, 4 * kPage);
  EXPECT_EQ(third->bytes, 2 * kPage);
  EXPECT_EQ(a.leased_bytes(), 6 * kPage);
  EXPECT_EQ(first->region.data(), a.base());

  // 4 pages free at the end: 5 do not fit.
  auto too_big = a.lease(5 * kPage);
  ASSERT_FALSE(too_big.is_ok());
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted);

  // Released neighbours coalesce: pages 0..3 then hold a 4-page lease again.
  a.release(std::move(first).value());
  a.release(std::move(second).value());
  auto again = a.lease(4 * kPage);
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->offset, 0u);
  a.release(std::move(again).value());
  a.release(std::move(third).value());
  EXPECT_EQ(a.leased_bytes(), 0u);
  auto whole = a.lease(10 * kPage);
  ASSERT_TRUE(whole.is_ok()) << whole.status().to_string();
  a.release(std::move(whole).value());
}

TEST(HandoffArena, AbandonedRangesStayFencedUntilTheirTime) {
  auto engine = make_engine("decode");
  ASSERT_TRUE(engine);
  auto arena = HandoffArena::create(*engine, 4 * kPage);
  ASSERT_TRUE(arena.is_ok());
  HandoffArena& a = **arena;
  auto lease = a.lease(2 * kPage);
  ASSERT_TRUE(lease.is_ok());
  const auto now = Clock::now();
  a.abandon(std::move(lease).value(), now + std::chrono::seconds(30));
  EXPECT_EQ(a.leased_bytes(), 0u);
  EXPECT_EQ(a.fenced_bytes(), 2 * kPage);
  EXPECT_EQ(a.fenced_ranges(), 1u);

  // The fenced range is not handed out: the next lease goes after it, and the whole arena does
  // not fit.
  auto next = a.lease(kPage);
  ASSERT_TRUE(next.is_ok());
  EXPECT_EQ(next->offset, 2 * kPage);
  EXPECT_FALSE(a.lease(3 * kPage).is_ok());
  EXPECT_EQ(a.reclaim(now + std::chrono::seconds(29)), 0u);
  EXPECT_EQ(a.fenced_bytes(), 2 * kPage);
  EXPECT_EQ(a.reclaim(now + std::chrono::seconds(30)), 2 * kPage);
  EXPECT_EQ(a.fenced_ranges(), 0u);
  auto reused = a.lease(2 * kPage);
  ASSERT_TRUE(reused.is_ok());
  EXPECT_EQ(reused->offset, 0u);
  a.release(std::move(reused).value());
  a.release(std::move(next).value());
}

// A worker that stops with reservations still held: their leases are destroyed (deregistering
// themselves), then the arena; nothing aborts.
TEST(HandoffArena, StopsWithLeasesStillHeld) {
  auto engine = make_engine("decode");
  ASSERT_TRUE(engine);
  auto arena = HandoffArena::create(*engine, 4 * kPage);
  ASSERT_TRUE(arena.is_ok());
  {
    auto lease = (*arena)->lease(kPage);
    ASSERT_TRUE(lease.is_ok());
  }
  arena->reset();
}

// The remote crash of the red-team report, in one process: a sender keeps the keys of a region
// whose reservation was dropped and puts after the range was given up (and after it was reused).
// With a region freed on abandon, that put wrote into unmapped memory (SIGSEGV in UCX's put
// handler, in the receiving process). Here it lands inside the arena, in the range it names.
TEST(HandoffArena, LatePutsLandInsideTheArena) {
  auto decode = make_engine("decode");
  auto prefill = make_engine("prefill");
  ASSERT_TRUE(decode && prefill);
  auto arena = HandoffArena::create(*decode, 64 * kPage);
  ASSERT_TRUE(arena.is_ok());
  HandoffArena& a = **arena;

  auto lease = a.lease(8 * kPage);
  ASSERT_TRUE(lease.is_ok());
  auto remote = decode->describe(lease->region);
  ASSERT_TRUE(remote.is_ok()) << remote.status().to_string();
  auto peer = prefill->connect(decode->local_address());
  ASSERT_TRUE(peer.is_ok());
  std::vector<uint8_t> bytes(8 * kPage, 0x5A);
  const kvstore::PutOp op{bytes.data(), bytes.size(), 0};
  ASSERT_TRUE(prefill->put(*peer, *remote, std::span(&op, 1)).is_ok());  // wired up

  // Abandoned, fenced, then reclaimed (the grace has passed): the sender puts late.
  const auto t0 = Clock::now();
  a.abandon(std::move(lease).value(), t0);
  EXPECT_EQ(a.reclaim(t0), 8 * kPage);
  std::fill(bytes.begin(), bytes.end(), 0xC3);
  auto late = prefill->put(*peer, *remote, std::span(&op, 1));
  // Over TCP nothing refuses it (over RDMA the deregistration voids the key and it fails).
  ASSERT_TRUE(late.is_ok()) << late.status().to_string();
  EXPECT_EQ(std::to_integer<uint8_t>(a.base()[0]), 0xC3);
  EXPECT_EQ(std::to_integer<uint8_t>(a.base()[8 * kPage - 1]), 0xC3);

  // The range is reused; another late put lands in it, and only in it: the next page of the
  // arena (another lease) is untouched.
  auto reused = a.lease(8 * kPage);
  auto neighbour = a.lease(kPage);
  ASSERT_TRUE(reused.is_ok() && neighbour.is_ok());
  EXPECT_EQ(reused->offset, 0u);
  EXPECT_EQ(neighbour->offset, 8 * kPage);
  std::memset(neighbour->region.data(), 0x11, kPage);
  std::fill(bytes.begin(), bytes.end(), 0x77);
  late = prefill->put(*peer, *remote, std::span(&op, 1));
  ASSERT_TRUE(late.is_ok()) << late.status().to_string();
  EXPECT_EQ(std::to_integer<uint8_t>(reused->region.data()[0]), 0x77);
  EXPECT_EQ(std::to_integer<uint8_t>(neighbour->region.data()[0]), 0x11);
  a.release(std::move(reused).value());
  a.release(std::move(neighbour).value());
}

}  // namespace
}  // namespace dserve::decode
