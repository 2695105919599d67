// The UCX transport on real UCX endpoints: two transports in one process, and a real peer
// process (transfer_peer) that registers memory, hands its address and rkey over a pipe, and
// verifies what lands. Also: a killed peer, a stalled peer, a restarted peer's stale rkey, and
// bytes corrupted after they landed.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dserve/kvstore/transfer.h"
#include "gtest/gtest.h"

namespace dserve::kvstore {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMiB = 1u << 20;

std::vector<std::byte> random_bytes(uint64_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (uint64_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    std::memcpy(out.data() + i, &v, 8);
  }
  return out;
}

// A transfer_peer child process, spoken to through two pipes.
class PeerProcess {
 public:
  // The receiving side.
  PeerProcess(const std::string& transports, uint64_t bytes, bool detect_peer_failure = true,
              bool allocate = false)
      : PeerProcess({transports, std::to_string(bytes),
                     std::string("-") + (detect_peer_failure ? "d" : "") + (allocate ? "a" : "")}) {
  }
  // transfer_peer with these arguments (three of them).
  explicit PeerProcess(const std::vector<std::string>& args) {
    int to_child[2], from_child[2];
    EXPECT_EQ(pipe2(to_child, O_CLOEXEC), 0);
    EXPECT_EQ(pipe2(from_child, O_CLOEXEC), 0);
    pid_ = fork();
    if (pid_ == 0) {
      dup2(to_child[0], 0);
      dup2(from_child[1], 1);
      execl(DSERVE_TRANSFER_PEER, DSERVE_TRANSFER_PEER, args.at(0).c_str(), args.at(1).c_str(),
            args.at(2).c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    out_ = to_child[1];
    in_ = from_child[0];
  }
  ~PeerProcess() {
    close(out_);
    close(in_);
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;

  // Reads the peer's address and region; false if the child did not start.
  bool handshake(PeerAddress& address, RemoteRegion& region) {
    auto a = read_frame();
    auto r = read_frame();
    if (!a || !r) return false;
    auto pa = decode_peer_address(*a);
    auto pr = decode_remote_region(*r);
    if (!pa.is_ok() || !pr.is_ok()) return false;
    address = *pa;
    region = *pr;
    return true;
  }
  // Sends digests; returns the child's verdict ("OK" or a Status text).
  std::string verify(std::span<const SpanDigest> digests) {
    auto bytes = encode_digests(digests);
    auto n = static_cast<uint32_t>(bytes.size());
    if (write(out_, &n, sizeof n) != sizeof n) return "write failed";
    if (write(out_, bytes.data(), n) != static_cast<ssize_t>(n)) return "write failed";
    auto answer = read_frame();
    return answer ? std::string(answer->begin(), answer->end()) : "no answer";
  }
  bool send(std::span<const uint8_t> bytes) {
    auto n = static_cast<uint32_t>(bytes.size());
    return write(out_, &n, sizeof n) == sizeof n &&
           write(out_, bytes.data(), n) == static_cast<ssize_t>(n);
  }
  bool send_text(const std::string& text) {
    return send({reinterpret_cast<const uint8_t*>(text.data()), text.size()});
  }
  // The next frame as text, or "no answer" (none within 10 s).
  std::string answer() {
    auto frame = read_frame();
    return frame ? std::string(frame->begin(), frame->end()) : "no answer";
  }
  void signal(int sig) { kill(pid_, sig); }
  void reap() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  bool read_exact(void* data, size_t n) {
    auto* p = static_cast<char*>(data);
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (n > 0) {
      pollfd pfd{in_, POLLIN, 0};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0 || poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return false;
      ssize_t r = read(in_, p, n);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }
  std::optional<std::vector<uint8_t>> read_frame() {
    uint32_t n = 0;
    if (!read_exact(&n, sizeof n)) return std::nullopt;
    std::vector<uint8_t> out(n);
    if (!read_exact(out.data(), n)) return std::nullopt;
    return out;
  }

  pid_t pid_ = -1;
  int out_ = -1;
  int in_ = -1;
};

std::unique_ptr<Transport> make_engine(const std::string& transports, const std::string& name,
                                       std::chrono::milliseconds timeout = std::chrono::seconds(10),
                                       bool detect_peer_failure = true) {
  TransferOptions options;
  options.detect_peer_failure = detect_peer_failure;
  options.transports = transports;
  options.name = name;
  options.timeout = timeout;
  auto engine = Transport::create_ucx(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().to_string();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

// `count` ops of `span` bytes each from `source`, laid out back to back in the region.
std::vector<PutOp> contiguous_ops(const std::vector<std::byte>& source, uint64_t span) {
  std::vector<PutOp> ops;
  for (uint64_t off = 0; off < source.size(); off += span) {
    ops.push_back({source.data() + off, std::min<uint64_t>(span, source.size() - off), off});
  }
  return ops;
}

TEST(TransferInProcess, PutsSpansAndTheReceiverVerifiesThem) {
  auto prefill = make_engine("tcp,sm,self", "prefill");
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(prefill && decode);

  std::vector<std::byte> pages(1 * kMiB);
  auto region = decode->register_memory(pages.data(), pages.size());
  ASSERT_TRUE(region.is_ok()) << region.status().to_string();
  auto described = decode->describe(*region);
  ASSERT_TRUE(described.is_ok());
  // What crosses the control plane is bytes: round-trip both messages.
  auto remote = decode_remote_region(encode_remote_region(*described));
  auto address = decode_peer_address(encode_peer_address(decode->local_address()));
  ASSERT_TRUE(remote.is_ok() && address.is_ok());
  EXPECT_EQ(remote->rkey, described->rkey);
  EXPECT_EQ(address->epoch, decode->epoch());

  auto peer = prefill->connect(*address);
  ASSERT_TRUE(peer.is_ok()) << peer.status().to_string();
  EXPECT_EQ(prefill->connect(*address).value(), *peer);  // same peer, same epoch: same id

  // Five spans of different sizes at scattered offsets (pages of different pools).
  auto source = random_bytes(300000, 7);
  std::vector<PutOp> ops = {{source.data(), 4096, 0},
                            {source.data() + 4096, 65536, 131072},
                            {source.data() + 69632, 100000, 500000},
                            {source.data() + 169632, 8, 1048568},
                            {source.data() + 169640, 130360, 700000}};
  auto digests = prefill->put(*peer, *remote, ops);
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  ASSERT_EQ(digests->size(), ops.size());
  for (const PutOp& op : ops) {
    EXPECT_EQ(std::memcmp(pages.data() + op.remote_offset, op.local, op.bytes), 0)
        << "offset " << op.remote_offset;
  }
  auto wire = decode_digests(encode_digests(*digests));
  ASSERT_TRUE(wire.is_ok());
  EXPECT_TRUE(verify_landed(pages, *wire).is_ok());
}

TEST(TransferInProcess, PutsIntoMemoryTheEngineAllocated) {
  auto prefill = make_engine("tcp,sm,self", "prefill");
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(prefill && decode);
  auto region = decode->allocate_memory(3 * kMiB + 5);
  ASSERT_TRUE(region.is_ok()) << region.status().to_string();
  ASSERT_EQ(region->bytes(), 3 * kMiB + 5);
  std::span<const std::byte> landed(region->data(), region->bytes());
  EXPECT_TRUE(
      std::all_of(landed.begin(), landed.end(), [](std::byte b) { return b == std::byte{0}; }));
  auto peer = prefill->connect(decode->local_address());
  ASSERT_TRUE(peer.is_ok());
  auto source = random_bytes(3 * kMiB, 17);
  auto digests =
      prefill->put(*peer, decode->describe(*region).value(), contiguous_ops(source, kMiB));
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  EXPECT_TRUE(verify_landed(landed, *digests).is_ok());
  EXPECT_EQ(std::memcmp(landed.data(), source.data(), source.size()), 0);
}

TEST(TransferInProcess, CorruptedBytesFailVerification) {
  auto prefill = make_engine("tcp,sm,self", "prefill");
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(prefill && decode);
  std::vector<std::byte> pages(256 * 1024);
  auto region = decode->register_memory(pages.data(), pages.size());
  ASSERT_TRUE(region.is_ok());
  auto peer = prefill->connect(decode->local_address());
  ASSERT_TRUE(peer.is_ok());
  auto source = random_bytes(pages.size(), 11);
  auto ops = contiguous_ops(source, 64 * 1024);
  auto digests = prefill->put(*peer, decode->describe(*region).value(), ops);
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  ASSERT_TRUE(verify_landed(pages, *digests).is_ok());

  pages[3 * 64 * 1024 + 17] ^= std::byte{0x40};  // one bit, in the fourth span
  Status st = verify_landed(pages, *digests);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("span 3"), std::string::npos) << st.message();

  // A digest that points outside the region, and a truncated digest message, are refused too.
  std::vector<SpanDigest> outside = {{pages.size() - 4, 8, 0}};
  EXPECT_EQ(verify_landed(pages, outside).code(), StatusCode::kDataLoss);
  auto wire = encode_digests(*digests);
  wire.pop_back();
  EXPECT_EQ(decode_digests(wire).status().code(), StatusCode::kDataLoss);
  // Control messages of the wrong kind, or cut short, are refused as well.
  auto region_bytes = encode_remote_region(decode->describe(*region).value());
  EXPECT_EQ(decode_peer_address(region_bytes).status().code(), StatusCode::kDataLoss);
  region_bytes.resize(region_bytes.size() - 3);
  EXPECT_EQ(decode_remote_region(region_bytes).status().code(), StatusCode::kDataLoss);
}

TEST(TransferInProcess, OpOutsideTheRegionIsRefused) {
  auto prefill = make_engine("tcp,sm,self", "prefill");
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(prefill && decode);
  std::vector<std::byte> pages(4096);
  auto region = decode->register_memory(pages.data(), pages.size());
  ASSERT_TRUE(region.is_ok());
  auto peer = prefill->connect(decode->local_address());
  ASSERT_TRUE(peer.is_ok());
  auto source = random_bytes(4096, 3);
  std::vector<PutOp> ops = {{source.data(), 4096, 1}};
  auto result = prefill->put(*peer, decode->describe(*region).value(), ops);
  EXPECT_EQ(result.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pages[4095], std::byte{0});
}

std::unique_ptr<Transport> make_engine_with(TransferOptions options) {
  auto engine = Transport::create_ucx(std::move(options));
  EXPECT_TRUE(engine.is_ok()) << engine.status().to_string();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

// Digests hashed beside the puts (checksum_threads > 0, a put over 4 MiB) are the digests of
// the sources, the same as hashed before the puts, for ops of every size, empty ones included.
TEST(TransferInProcess, ChecksumsBesideThePutsMatchChecksumsBeforeThem) {
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(decode);
  const uint64_t bytes = 9 * kMiB + 4099;
  auto region = decode->allocate_memory(bytes);
  ASSERT_TRUE(region.is_ok()) << region.status().to_string();
  auto source = random_bytes(bytes, 23);
  std::vector<PutOp> ops = {{source.data(), 5 * kMiB + 3, 0},
                            {nullptr, 0, 5 * kMiB + 3},
                            {source.data() + 5 * kMiB + 3, 17, 5 * kMiB + 3},
                            {source.data() + 5 * kMiB + 20, bytes - 5 * kMiB - 20, 5 * kMiB + 20}};
  std::span<const std::byte> landed(region->data(), region->bytes());
  for (unsigned threads : {0u, 1u, 3u}) {
    TransferOptions options;
    options.name = "prefill-" + std::to_string(threads);
    options.checksum_threads = threads;
    auto prefill = make_engine_with(options);
    ASSERT_TRUE(prefill);
    auto peer = prefill->connect(decode->local_address());
    ASSERT_TRUE(peer.is_ok());
    auto digests = prefill->put(*peer, decode->describe(*region).value(), ops);
    ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
    ASSERT_EQ(digests->size(), ops.size()) << threads << " threads";
    for (size_t i = 0; i < ops.size(); ++i) {
      EXPECT_EQ((*digests)[i].remote_offset, ops[i].remote_offset);
      EXPECT_EQ((*digests)[i].bytes, ops[i].bytes);
      EXPECT_EQ((*digests)[i].xxh3, span_checksum(ops[i].local, ops[i].bytes))
          << "op " << i << ", " << threads << " threads";
    }
    EXPECT_TRUE(verify_landed(landed, *digests).is_ok());
    EXPECT_TRUE(verify_landed(landed, *digests, VerifyOptions{}).is_ok());
  }
}

// With digest_bytes, each op gets one digest per piece, in order, covering exactly its bytes.
TEST(TransferInProcess, DigestPiecesCoverEachOpInOrder) {
  auto decode = make_engine("tcp,sm,self", "decode");
  ASSERT_TRUE(decode);
  const uint64_t bytes = 6 * kMiB;
  auto region = decode->allocate_memory(bytes);
  ASSERT_TRUE(region.is_ok()) << region.status().to_string();
  TransferOptions options;
  options.name = "prefill";
  options.digest_bytes = kMiB;
  auto prefill = make_engine_with(options);
  ASSERT_TRUE(prefill);
  auto peer = prefill->connect(decode->local_address());
  ASSERT_TRUE(peer.is_ok());
  auto source = random_bytes(bytes, 29);
  // 2.5 MiB -> three pieces, 1 MiB -> one, empty -> one empty, the rest (2.5 MiB) -> three.
  const uint64_t half = kMiB / 2;
  std::vector<PutOp> ops = {{source.data(), 5 * half, 0},
                            {source.data() + 5 * half, kMiB, 5 * half},
                            {nullptr, 0, 7 * half},
                            {source.data() + 7 * half, 5 * half, 7 * half}};
  auto digests = prefill->put(*peer, decode->describe(*region).value(), ops);
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  const std::vector<std::pair<uint64_t, uint64_t>> pieces = {
      {0, kMiB},     {kMiB, kMiB},     {2 * kMiB, half}, {5 * half, kMiB},
      {7 * half, 0}, {7 * half, kMiB}, {9 * half, kMiB}, {11 * half, half}};
  ASSERT_EQ(digests->size(), pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) {
    const SpanDigest& d = (*digests)[i];
    EXPECT_EQ(d.remote_offset, pieces[i].first) << "piece " << i;
    EXPECT_EQ(d.bytes, pieces[i].second) << "piece " << i;
    EXPECT_EQ(d.xxh3, span_checksum(source.data() + d.remote_offset, d.bytes)) << "piece " << i;
  }
  std::vector<std::byte> landed(region->data(), region->data() + bytes);
  EXPECT_TRUE(verify_landed(landed, *digests, VerifyOptions{}).is_ok());
  landed[9 * half + 5] ^= std::byte{1};  // in piece 6
  Status st = verify_landed(landed, *digests, VerifyOptions{});
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("span 6 "), std::string::npos) << st.message();
}

// Verification on several threads names the same first failure, in the same words, as the
// serial one: a corrupt span before a span outside the region, and the other way round.
TEST(VerifyLanded, ThreadsReportWhatTheSerialCheckReports) {
  const uint64_t span = kMiB;
  auto region = random_bytes(24 * span, 31);
  std::vector<SpanDigest> digests;
  for (uint64_t off = 0; off < region.size(); off += span)
    digests.push_back({off, span, span_checksum(region.data() + off, span)});
  VerifyOptions options;
  options.threads = 3;
  options.min_bytes_per_thread = span;
  EXPECT_TRUE(verify_landed(region, digests, options).is_ok());

  auto same = [&](std::span<const SpanDigest> claimed) {
    Status serial = verify_landed(region, claimed);
    Status threaded = verify_landed(region, claimed, options);
    EXPECT_EQ(threaded.code(), serial.code());
    EXPECT_EQ(threaded.message(), serial.message());
    return serial;
  };
  auto corrupt = digests;
  corrupt[17].xxh3 ^= 1;
  corrupt[5].xxh3 ^= 1;
  EXPECT_NE(same(corrupt).message().find("span 5 "), std::string::npos);
  auto outside = digests;
  outside[9].remote_offset = region.size() - 8;
  outside[3].xxh3 ^= 1;
  EXPECT_NE(same(outside).message().find("span 3 "), std::string::npos);
  outside[3].xxh3 ^= 1;
  outside[12].xxh3 ^= 1;
  EXPECT_NE(same(outside).message().find("span 9 "), std::string::npos);
  // Too few bytes for a second thread, and no spans at all: the serial check answers.
  EXPECT_EQ(same(std::span(corrupt).subspan(5, 1)).code(), StatusCode::kDataLoss);
  EXPECT_TRUE(same({}).is_ok());
}

// A whole state through a real peer process: `bytes` in 1 MiB spans (a decode worker's pages),
// then a second, different state into the same region.
void transfer_to_process(const std::string& transports, uint64_t bytes, bool detect,
                         bool allocate) {
  PeerProcess child(transports, bytes, detect, allocate);
  PeerAddress address;
  RemoteRegion region;
  ASSERT_TRUE(child.handshake(address, region)) << "transfer_peer did not start";
  EXPECT_EQ(address.name, "decode");
  auto prefill = make_engine(transports, "prefill", std::chrono::seconds(10), detect);
  ASSERT_TRUE(prefill);
  auto peer = prefill->connect(address);
  ASSERT_TRUE(peer.is_ok()) << peer.status().to_string();
  for (uint32_t round = 0; round < 2; ++round) {
    auto state = random_bytes(bytes, 100 + round);
    auto t0 = Clock::now();
    auto digests = prefill->put(*peer, region, contiguous_ops(state, kMiB));
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
    EXPECT_EQ(child.verify(*digests), "OK");
    std::printf("[ %s ] %llu bytes in %.1f ms (%.2f GB/s)\n", transports.c_str(),
                static_cast<unsigned long long>(bytes), ms, static_cast<double>(bytes) / ms / 1e6);
  }
}

TEST(TransferTwoProcesses, StateOverTcp) {
  transfer_to_process("tcp", 16 * kMiB, true, false);
}
// UCX 1.13's shared-memory transports have no peer-failure detection: see TransferOptions.
TEST(TransferTwoProcesses, StateOverSharedMemory) {
  transfer_to_process("sm,self", 16 * kMiB, false, false);
}
// Into memory UCX allocated, shared memory writes straight into the mapped segment.
TEST(TransferTwoProcesses, StateOverSharedMemoryIntoAllocatedRegion) {
  transfer_to_process("sm,self", 16 * kMiB, false, true);
}
TEST(TransferTwoProcesses, StateOverTcpIntoAllocatedRegion) {
  transfer_to_process("tcp", 4 * kMiB, true, true);
}
// The default transports with failure detection off pick shared memory between local processes.
TEST(TransferTwoProcesses, StateOverDefaultTransportsWithoutFailureDetection) {
  transfer_to_process(TransferOptions{}.transports, 8 * kMiB, false, true);
}

// A region the peer never wrote to verifies only against digests of its own (zero) bytes.
TEST(TransferTwoProcesses, ReceiverRefusesDigestsThatDoNotMatch) {
  PeerProcess child("tcp", kMiB);
  PeerAddress address;
  RemoteRegion region;
  ASSERT_TRUE(child.handshake(address, region));
  std::vector<SpanDigest> claimed = {{0, kMiB, 12345}};
  EXPECT_NE(child.verify(claimed).find("DATA_LOSS"), std::string::npos);
}

void killed_peer_fails_put(const std::string& transports, bool detect) {
  PeerProcess child(transports, 4 * kMiB, detect);
  PeerAddress address;
  RemoteRegion region;
  ASSERT_TRUE(child.handshake(address, region));
  auto prefill = make_engine(transports, "prefill", std::chrono::seconds(2), detect);
  ASSERT_TRUE(prefill);
  auto peer = prefill->connect(address);
  ASSERT_TRUE(peer.is_ok());
  auto state = random_bytes(4 * kMiB, 5);
  auto ops = contiguous_ops(state, kMiB);
  ASSERT_TRUE(prefill->put(*peer, region, ops).is_ok());

  child.reap();  // kill -9: the decode worker is gone
  auto t0 = Clock::now();
  auto result = prefill->put(*peer, region, ops);
  auto took = Clock::now() - t0;
  ASSERT_FALSE(result.is_ok()) << "a put to a killed peer reported success";
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable);
  EXPECT_LT(took, std::chrono::milliseconds(2500));
  std::printf(
      "[ %s ] killed peer: %s (after %lld ms)\n", transports.c_str(),
      result.status().to_string().c_str(),
      static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(took).count()));
  // The endpoint stays failed until the caller connects again.
  EXPECT_EQ(prefill->put(*peer, region, ops).status().code(), StatusCode::kUnavailable);
}

TEST(TransferTwoProcesses, KilledPeerFailsPutOverTcp) {
  killed_peer_fails_put("tcp", true);
}
TEST(TransferTwoProcesses, KilledPeerFailsPutOverSharedMemory) {
  killed_peer_fails_put("sm,self", false);
}

// A peer that stops progressing (SIGSTOP) must not hang the put: it fails at the timeout.
TEST(TransferTwoProcesses, StalledPeerTimesOut) {
  PeerProcess child("tcp", 64 * kMiB);
  PeerAddress address;
  RemoteRegion region;
  ASSERT_TRUE(child.handshake(address, region));
  auto prefill = make_engine("tcp", "prefill", std::chrono::milliseconds(1000));
  ASSERT_TRUE(prefill);
  auto peer = prefill->connect(address);
  ASSERT_TRUE(peer.is_ok());
  auto state = random_bytes(64 * kMiB, 9);
  std::vector<PutOp> first = {{state.data(), 4096, 0}};
  ASSERT_TRUE(prefill->put(*peer, region, first).is_ok());  // wired up

  child.signal(SIGSTOP);
  auto t0 = Clock::now();
  auto result = prefill->put(*peer, region, contiguous_ops(state, kMiB));
  auto took = Clock::now() - t0;
  child.reap();
  ASSERT_FALSE(result.is_ok());
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(result.status().message().find("within 1000 ms"), std::string::npos)
      << result.status().message();
  EXPECT_LT(took, std::chrono::milliseconds(4000));
}

// The decode worker restarts under the same name: the old rkey must be refused, not used.
TEST(TransferTwoProcesses, StaleRegionOfARestartedPeerIsRefused) {
  auto prefill = make_engine("tcp", "prefill");
  ASSERT_TRUE(prefill);
  auto state = random_bytes(kMiB, 13);
  auto ops = contiguous_ops(state, kMiB);

  RemoteRegion old_region;
  PeerId old_peer;
  {
    PeerProcess first("tcp", kMiB);
    PeerAddress address;
    ASSERT_TRUE(first.handshake(address, old_region));
    auto peer = prefill->connect(address);
    ASSERT_TRUE(peer.is_ok());
    old_peer = *peer;
    ASSERT_TRUE(prefill->put(old_peer, old_region, ops).is_ok());
  }  // killed

  PeerProcess second("tcp", kMiB);
  PeerAddress address;
  RemoteRegion region;
  ASSERT_TRUE(second.handshake(address, region));
  ASSERT_NE(address.epoch, old_region.owner_epoch);
  auto peer = prefill->connect(address);
  ASSERT_TRUE(peer.is_ok());
  EXPECT_NE(*peer, old_peer);

  auto stale = prefill->put(*peer, old_region, ops);
  EXPECT_EQ(stale.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(stale.status().message().find("stale"), std::string::npos) << stale.status().message();
  // The old id is gone with the old endpoint.
  EXPECT_EQ(prefill->put(old_peer, region, ops).status().code(), StatusCode::kUnavailable);
  // Nothing landed in the new peer's memory: its zeroes still verify, the state does not.
  std::vector<SpanDigest> zeros = {
      {0, kMiB, span_checksum(std::vector<std::byte>(kMiB).data(), kMiB)}};
  EXPECT_EQ(second.verify(zeros), "OK");
  // And the fresh region works.
  auto digests = prefill->put(*peer, region, ops);
  ASSERT_TRUE(digests.is_ok()) << digests.status().to_string();
  EXPECT_EQ(second.verify(*digests), "OK");
}

}  // namespace
}  // namespace dserve::kvstore
