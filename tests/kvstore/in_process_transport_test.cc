// The in-process transport: puts land in the peer's memory with the digests the UCX transport
// computes (XXH3-64 per span, or per piece of digest_bytes), and it refuses what the UCX
// transport refuses: a stale epoch's region, an op outside the region, an unknown region, a
// peer that is gone.

#include "dserve/kvstore/in_process_transport.h"

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dserve::kvstore {
namespace {

std::vector<std::byte> random_bytes(uint64_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out)
    b = static_cast<std::byte>(rng());
  return out;
}

TEST(InProcessTransport, PutsLandWithTheDigestsOfEachSpan) {
  InProcessTransport decode({.name = "decode", .epoch = 0, .digest_bytes = 0});
  InProcessTransport prefill({.name = "prefill", .epoch = 0, .digest_bytes = 0});
  EXPECT_NE(decode.epoch(), prefill.epoch());
  std::vector<std::byte> memory(8192);
  auto region = decode.register_memory(memory.data(), memory.size());
  ASSERT_TRUE(region.is_ok()) << region.status().to_string();
  EXPECT_EQ(decode.registered_regions(), 1u);
  auto remote = decode.describe(*region);
  ASSERT_TRUE(remote.is_ok());
  EXPECT_EQ(remote->owner_epoch, decode.epoch());
  EXPECT_EQ(remote->bytes, 8192u);

  auto peer = prefill.connect(decode.local_address());
  ASSERT_TRUE(peer.is_ok()) << peer.status().to_string();
  EXPECT_EQ(prefill.connect(decode.local_address()).value(), *peer);  // same name and epoch
  const auto source = random_bytes(5000, 1);
  const PutOp ops[3] = {
      {source.data(), 3000, 100}, {nullptr, 0, 3100}, {source.data() + 3000, 2000, 6000}};
  auto digests = prefill.put(*peer, *remote, ops);
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  ASSERT_EQ(digests->size(), 3u);
  EXPECT_EQ(std::memcmp(memory.data() + 100, source.data(), 3000), 0);
  EXPECT_EQ(std::memcmp(memory.data() + 6000, source.data() + 3000, 2000), 0);
  EXPECT_EQ((*digests)[0].remote_offset, 100u);
  EXPECT_EQ((*digests)[0].bytes, 3000u);
  EXPECT_EQ((*digests)[0].xxh3, span_checksum(source.data(), 3000));
  EXPECT_EQ((*digests)[1].bytes, 0u);
  EXPECT_EQ((*digests)[2].xxh3, span_checksum(source.data() + 3000, 2000));
  EXPECT_EQ(decode.puts_received(), 1u);
  EXPECT_TRUE(verify_landed(memory, *digests).is_ok());
  // The same digests as the shared helper (the UCX transport's).
  const auto expected = span_digests(ops);
  for (size_t i = 0; i < expected.size(); ++i)
    EXPECT_EQ((*digests)[i].xxh3, expected[i].xxh3) << i;

  // Bytes changed after they landed fail verification, as over UCX.
  memory[6001] ^= std::byte{1};
  EXPECT_EQ(verify_landed(memory, *digests).code(), StatusCode::kDataLoss);
}

TEST(InProcessTransport, DigestPiecesCoverEachOpInOrder) {
  InProcessTransport decode({.name = "decode", .epoch = 0, .digest_bytes = 0});
  InProcessTransport prefill({.name = "prefill", .epoch = 0, .digest_bytes = 1000});
  auto region = decode.allocate_memory(4096);
  ASSERT_TRUE(region.is_ok());
  EXPECT_EQ(region->data()[4095], std::byte{0});  // zero-filled
  auto peer = prefill.connect(decode.local_address());
  ASSERT_TRUE(peer.is_ok());
  const auto source = random_bytes(2500, 2);
  const PutOp op{source.data(), 2500, 10};
  auto digests = prefill.put(*peer, decode.describe(*region).value(), std::span(&op, 1));
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  ASSERT_EQ(digests->size(), 3u);
  EXPECT_EQ((*digests)[1].remote_offset, 1010u);
  EXPECT_EQ((*digests)[2].bytes, 500u);
  EXPECT_TRUE(verify_landed({region->data(), region->bytes()}, *digests).is_ok());
}

TEST(InProcessTransport, RefusesOpsOutsideTheRegionAndWritesNothing) {
  InProcessTransport decode({.name = "decode", .epoch = 0, .digest_bytes = 0});
  InProcessTransport prefill({.name = "prefill", .epoch = 0, .digest_bytes = 0});
  auto region = decode.allocate_memory(1024);
  ASSERT_TRUE(region.is_ok());
  auto peer = prefill.connect(decode.local_address());
  ASSERT_TRUE(peer.is_ok());
  const auto source = random_bytes(2048, 3);
  const PutOp ops[2] = {{source.data(), 512, 0}, {source.data(), 600, 512}};
  auto put = prefill.put(*peer, decode.describe(*region).value(), ops);
  EXPECT_EQ(put.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(put.status().message().find("exceeds the 1024-byte remote region"), std::string::npos)
      << put.status().message();
  EXPECT_EQ(region->data()[0], std::byte{0});  // the first op was not issued either
  const PutOp no_source{nullptr, 8, 0};
  EXPECT_EQ(prefill.put(*peer, decode.describe(*region).value(), std::span(&no_source, 1))
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(decode.puts_received(), 0u);
}

// A region of an earlier incarnation (same name, older epoch) is refused as stale, and a region
// deregistered since it was described is refused as unknown.
TEST(InProcessTransport, RefusesStaleAndUnknownRegions) {
  InProcessTransport prefill({.name = "prefill", .epoch = 0, .digest_bytes = 0});
  const auto source = random_bytes(64, 4);
  const PutOp op{source.data(), 64, 0};
  RemoteRegion old_region;
  PeerId old_peer;
  {
    auto first = std::make_unique<InProcessTransport>(
        InProcessTransportOptions{.name = "decode", .epoch = 0, .digest_bytes = 0});
    auto region = first->allocate_memory(4096);
    ASSERT_TRUE(region.is_ok());
    old_region = first->describe(*region).value();
    old_peer = prefill.connect(first->local_address()).value();
    ASSERT_TRUE(prefill.put(old_peer, old_region, std::span(&op, 1)).is_ok());
  }
  // The first incarnation is gone: its peer id fails as unavailable.
  EXPECT_EQ(prefill.put(old_peer, old_region, std::span(&op, 1)).status().code(),
            StatusCode::kUnavailable);

  InProcessTransport second({.name = "decode", .epoch = 0, .digest_bytes = 0});
  auto region = second.allocate_memory(4096);
  ASSERT_TRUE(region.is_ok());
  auto peer = prefill.connect(second.local_address());
  ASSERT_TRUE(peer.is_ok());
  EXPECT_NE(*peer, old_peer);
  auto stale = prefill.put(*peer, old_region, std::span(&op, 1));
  EXPECT_EQ(stale.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(stale.status().message().find("stale"), std::string::npos) << stale.status().message();
  // The old id went with the reconnect.
  EXPECT_EQ(prefill.put(old_peer, old_region, std::span(&op, 1)).status().code(),
            StatusCode::kUnavailable);

  const RemoteRegion described = second.describe(*region).value();
  *region = MemoryRegion{};  // deregistered
  EXPECT_EQ(second.registered_regions(), 0u);
  auto unknown = prefill.put(*peer, described, std::span(&op, 1));
  EXPECT_EQ(unknown.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("unknown remote region"), std::string::npos)
      << unknown.status().message();
  // A region of the right epoch but another size is not the registered one either.
  auto other = second.allocate_memory(4096);
  ASSERT_TRUE(other.is_ok());
  RemoteRegion resized = second.describe(*other).value();
  resized.bytes = 8192;
  EXPECT_EQ(prefill.put(*peer, resized, std::span(&op, 1)).status().code(),
            StatusCode::kInvalidArgument);

  prefill.disconnect(*peer);
  EXPECT_EQ(prefill.put(*peer, second.describe(*other).value(), std::span(&op, 1)).status().code(),
            StatusCode::kUnavailable);
}

TEST(InProcessTransport, RefusesAddressesItCannotReach) {
  InProcessTransport prefill({.name = "prefill", .epoch = 0, .digest_bytes = 0});
  PeerAddress ucx_like{"decode", 5, {1, 2, 3}};
  EXPECT_EQ(prefill.connect(ucx_like).status().code(), StatusCode::kInvalidArgument);
  PeerAddress gone;
  {
    InProcessTransport decode({.name = "decode", .epoch = 0, .digest_bytes = 0});
    gone = decode.local_address();
    PeerAddress wrong_epoch = gone;
    wrong_epoch.epoch += 1;
    EXPECT_EQ(prefill.connect(wrong_epoch).status().code(), StatusCode::kUnavailable);
  }
  EXPECT_EQ(prefill.connect(gone).status().code(), StatusCode::kUnavailable);
  // Addresses survive the control plane's encoding.
  InProcessTransport decode({.name = "decode", .epoch = 0, .digest_bytes = 0});
  auto decoded = decode_peer_address(encode_peer_address(decode.local_address()));
  ASSERT_TRUE(decoded.is_ok());
  EXPECT_TRUE(prefill.connect(*decoded).is_ok());
}

// A put into this transport's own region (a co-located hand-off) works as any other.
TEST(InProcessTransport, PutsIntoItsOwnRegions) {
  InProcessTransport both({.name = "both", .epoch = 0, .digest_bytes = 0});
  auto region = both.allocate_memory(128);
  ASSERT_TRUE(region.is_ok());
  auto peer = both.connect(both.local_address());
  ASSERT_TRUE(peer.is_ok());
  const auto source = random_bytes(128, 5);
  const PutOp op{source.data(), 128, 0};
  auto digests = both.put(*peer, both.describe(*region).value(), std::span(&op, 1));
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  EXPECT_EQ(std::memcmp(region->data(), source.data(), 128), 0);
}

}  // namespace
}  // namespace dserve::kvstore
