// The peer process of tests/kvstore/transfer_test.cc: the receiving (decode) side, or, for the
// pipelined hand-off, the sending (prefill) side.
//
//   transfer_peer <transports> <region bytes> <flags>
//
// flags: a string with 'd' to detect peer failure (TransferOptions::detect_peer_failure) and
// 'a' to take the region from TransferEngine::allocate_memory instead of registering a vector.
// Opens a TransferEngine named "decode", makes a zero-filled region, and writes two frames
// to stdout: its encoded PeerAddress and its encoded RemoteRegion. Then, for every frame of
// encoded digests read from stdin, verifies the region against them and answers one frame:
// "OK" or the Status text. Exits 0 at end of input. A frame is a 4-byte little-endian length
// and that many bytes.
//
//   transfer_peer send <transports> <flags>
//
// Opens a TransferEngine named "prefill", reads two frames (the receiver's PeerAddress and
// RemoteRegion), then for every job frame, the text "<handoff id> <bytes> <seed> <piece bytes>
// <pause ms>", makes `bytes` bytes of state from `seed` (mt19937_64, 8 bytes at a time), puts
// them pipelined (1 MiB ops from offset 0), pausing `pause ms` after each piece, and answers
// "OK" or the Status text.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dserve/kvstore/transfer.h"

namespace {

bool read_all(int fd, void* data, size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool write_frame(std::span<const uint8_t> bytes) {
  auto n = static_cast<uint32_t>(bytes.size());
  return write_all(1, &n, sizeof n) && write_all(1, bytes.data(), bytes.size());
}

bool read_frame(std::vector<uint8_t>& out) {
  uint32_t n = 0;
  if (!read_all(0, &n, sizeof n)) return false;
  out.resize(n);
  return read_all(0, out.data(), n);
}

bool write_text(const std::string& text) {
  return write_frame({reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

int send(const std::string& transports, const std::string& flags) {
  using namespace dserve::kvstore;
  TransferOptions options;
  options.transports = transports;
  options.name = "prefill";
  options.detect_peer_failure = flags.find('d') != std::string::npos;
  auto engine = TransferEngine::create(options);
  std::vector<uint8_t> a, r;
  if (!engine.is_ok() || !read_frame(a) || !read_frame(r)) return 1;
  auto address = decode_peer_address(a);
  auto region = decode_remote_region(r);
  if (!address.is_ok() || !region.is_ok()) return 1;
  auto peer = (*engine)->connect(*address);
  if (!peer.is_ok()) return 1;
  std::vector<uint8_t> job;
  while (read_frame(job)) {
    std::string text(job.begin(), job.end());
    unsigned long long id = 0, bytes = 0, seed = 0, piece = 0, pause_ms = 0;
    if (std::sscanf(text.c_str(), "%llu %llu %llu %llu %llu", &id, &bytes, &seed, &piece,
                    &pause_ms) != 5) {
      return 2;
    }
    std::mt19937_64 rng(seed);
    std::vector<std::byte> state(bytes);
    for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
      uint64_t v = rng();
      std::memcpy(state.data() + i, &v, 8);
    }
    std::vector<PutOp> ops;
    for (uint64_t off = 0; off < bytes; off += 1u << 20)
      ops.push_back({state.data() + off, std::min<uint64_t>(1u << 20, bytes - off), off});
    PipelineOptions pipeline;
    pipeline.handoff_id = id;
    pipeline.piece_bytes = piece;
    auto pause = [pause_ms](const LandedPiece&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
    };
    auto digests = (*engine)->put_pipelined(*peer, *region, ops, pipeline, pause);
    if (!write_text(digests.is_ok() ? "OK" : digests.status().to_string())) return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dserve::kvstore;
  if (argc == 4 && std::string(argv[1]) == "send") return send(argv[2], argv[3]);
  if (argc != 4) {
    std::fprintf(stderr, "usage: transfer_peer <transports> <region bytes> <flags>\n");
    return 2;
  }
  TransferOptions options;
  options.transports = argv[1];
  options.name = "decode";
  uint64_t bytes = std::strtoull(argv[2], nullptr, 10);
  const std::string flags = argv[3];
  options.detect_peer_failure = flags.find('d') != std::string::npos;
  const bool allocate = flags.find('a') != std::string::npos;

  auto engine = TransferEngine::create(options);
  if (!engine.is_ok()) {
    std::fprintf(stderr, "transfer_peer: %s\n", engine.status().to_string().c_str());
    return 1;
  }
  std::vector<std::byte> vector_memory(allocate ? 0 : bytes);
  auto region = allocate ? (*engine)->allocate_memory(bytes)
                         : (*engine)->register_memory(vector_memory.data(), bytes);
  if (!region.is_ok()) {
    std::fprintf(stderr, "transfer_peer: %s\n", region.status().to_string().c_str());
    return 1;
  }
  std::span<const std::byte> memory(region->data(), region->bytes());
  auto remote = (*engine)->describe(*region);
  if (!remote.is_ok()) return 1;
  if (!write_frame(encode_peer_address((*engine)->local_address())) ||
      !write_frame(encode_remote_region(*remote))) {
    return 1;
  }
  std::vector<uint8_t> frame;
  while (read_frame(frame)) {
    auto digests = decode_digests(frame);
    // Two threads (VerifyOptions' default) where there are enough bytes, as a decode worker.
    dserve::Status st =
        digests.is_ok() ? verify_landed(memory, *digests, VerifyOptions{}) : digests.status();
    std::string answer = st.is_ok() ? "OK" : st.to_string();
    if (!write_frame({reinterpret_cast<const uint8_t*>(answer.data()), answer.size()})) return 1;
  }
  return 0;
}
