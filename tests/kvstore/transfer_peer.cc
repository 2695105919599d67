// The peer process of tests/kvstore/transfer_test.cc: the receiving (decode) side.
//
//   transfer_peer <transports> <region bytes> <flags>
//
// flags: a string with 'd' to detect peer failure (TransferOptions::detect_peer_failure) and
// 'a' to take the region from Transport::allocate_memory instead of registering a vector.
// Opens a UCX transport named "decode", makes a zero-filled region, and writes two frames
// to stdout: its encoded PeerAddress and its encoded RemoteRegion. Then, for every frame of
// encoded digests read from stdin, verifies the region against them and answers one frame:
// "OK" or the Status text. Exits 0 at end of input. A frame is a 4-byte little-endian length
// and that many bytes.

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
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

}  // namespace

int main(int argc, char** argv) {
  using namespace dserve::kvstore;
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

  auto engine = Transport::create_ucx(options);
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
