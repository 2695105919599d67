// The transport's byte encodings for the control plane, and the receiver's checks
// (serial and on several threads).
// No UCX here: a control-plane actor can decode and verify without opening a worker.

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>

#include "dserve/kvstore/transfer.h"

namespace dserve::kvstore {
namespace {

// Each encoding starts with a 4-byte tag and a version, so a message of one kind is never
// read as another.
constexpr uint32_t kPeerAddressTag = 0x50414444;  // "PADD"
constexpr uint32_t kRegionTag = 0x52474e31;       // "RGN1"
constexpr uint32_t kDigestsTag = 0x44475354;      // "DGST"
constexpr uint32_t kVersion = 1;
// A bound no valid blob (name, worker address, rkey) reaches: a corrupt length never allocates.
constexpr uint64_t kMaxBlob = 1u << 20;
constexpr uint64_t kDigestBytes = 24;

class Writer {
 public:
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void blob(std::span<const uint8_t> b) {
    u64(b.size());
    out_.insert(out_.end(), b.begin(), b.end());
  }
  std::vector<uint8_t> take() { return std::move(out_); }

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; ++i)
      out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool u32(uint32_t& v) {
    uint64_t w = 0;
    if (!get(w, 4)) return false;
    v = static_cast<uint32_t>(w);
    return true;
  }
  bool u64(uint64_t& v) { return get(v, 8); }
  bool blob(std::vector<uint8_t>& b) {
    uint64_t n = 0;
    if (!u64(n) || n > kMaxBlob || n > in_.size() - pos_) return false;
    b.assign(in_.begin() + static_cast<std::ptrdiff_t>(pos_),
             in_.begin() + static_cast<std::ptrdiff_t>(pos_ + n));
    pos_ += n;
    return true;
  }
  bool header(uint32_t tag) {
    uint32_t t = 0, v = 0;
    return u32(t) && t == tag && u32(v) && v == kVersion;
  }
  bool done() const { return pos_ == in_.size(); }

 private:
  bool get(uint64_t& v, int n) {
    if (in_.size() - pos_ < static_cast<size_t>(n)) return false;
    v = 0;
    for (int i = 0; i < n; ++i)
      v |= static_cast<uint64_t>(in_[pos_ + static_cast<size_t>(i)]) << (8 * i);
    pos_ += static_cast<size_t>(n);
    return true;
  }
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

// A counted list of span digests.
void write_digests(Writer& w, std::span<const SpanDigest> digests) {
  w.u64(digests.size());
  for (const SpanDigest& d : digests) {
    w.u64(d.remote_offset);
    w.u64(d.bytes);
    w.u64(d.xxh3);
  }
}

// False when the count or a digest is missing, or the count exceeds what `total_bytes` holds.
bool read_digests(Reader& r, size_t total_bytes, std::vector<SpanDigest>& out) {
  uint64_t n = 0;
  if (!r.u64(n) || n > total_bytes / kDigestBytes) return false;
  out.resize(n);
  for (SpanDigest& d : out) {
    if (!r.u64(d.remote_offset) || !r.u64(d.bytes) || !r.u64(d.xxh3)) return false;
  }
  return true;
}

Status malformed(const char* what) {
  return data_loss(std::string("malformed ") + what +
                   " message (truncated, wrong kind or version)");
}

}  // namespace

uint64_t span_checksum(const void* data, uint64_t bytes) {
  return XXH3_64bits(data, static_cast<size_t>(bytes));
}

Status verify_landed(std::span<const std::byte> region, std::span<const SpanDigest> digests) {
  for (size_t i = 0; i < digests.size(); ++i) {
    const SpanDigest& d = digests[i];
    if (d.remote_offset > region.size() || d.bytes > region.size() - d.remote_offset) {
      return data_loss("span " + std::to_string(i) + " [" + std::to_string(d.remote_offset) +
                       ", +" + std::to_string(d.bytes) + ") lies outside the " +
                       std::to_string(region.size()) + "-byte region");
    }
    uint64_t got = span_checksum(region.data() + d.remote_offset, d.bytes);
    if (got != d.xxh3) {
      return data_loss("span " + std::to_string(i) + " at offset " +
                       std::to_string(d.remote_offset) + " (" + std::to_string(d.bytes) +
                       " bytes) does not match its checksum: the landed bytes are corrupt");
    }
  }
  return Status::ok();
}

// With several threads: the same checks, the spans shared out among them.
Status verify_landed(std::span<const std::byte> region, std::span<const SpanDigest> digests,
                     const VerifyOptions& options) {
  // Spans outside the region are found first (no hashing); only the spans before the first of
  // them need hashing to know which failure comes first.
  size_t outside = digests.size();
  uint64_t bytes = 0;
  for (size_t i = 0; i < digests.size(); ++i) {
    const SpanDigest& d = digests[i];
    if (d.remote_offset > region.size() || d.bytes > region.size() - d.remote_offset) {
      outside = i;
      break;
    }
    bytes += d.bytes;
  }
  const uint64_t per_thread = std::max<uint64_t>(1, options.min_bytes_per_thread);
  const auto threads = static_cast<unsigned>(
      std::min<uint64_t>({options.threads, bytes / per_thread, static_cast<uint64_t>(outside)}));
  if (threads <= 1) return verify_landed(region, digests);

  std::vector<uint8_t> bad(outside, 0);
  std::atomic<size_t> next{0};
  auto drain = [&] {
    for (size_t i = next.fetch_add(1); i < outside; i = next.fetch_add(1)) {
      const SpanDigest& d = digests[i];
      bad[i] = span_checksum(region.data() + d.remote_offset, d.bytes) != d.xxh3;
    }
  };
  std::vector<std::thread> helpers;
  for (unsigned t = 1; t < threads; ++t) {
    try {
      helpers.emplace_back(drain);
    } catch (const std::system_error&) {
      break;  // the caller hashes their share
    }
  }
  drain();
  for (std::thread& t : helpers)
    t.join();

  // The same failure, and the same words, as the serial verify_landed.
  auto first_bad = std::find(bad.begin(), bad.end(), uint8_t{1});
  if (first_bad != bad.end()) {
    auto i = static_cast<size_t>(first_bad - bad.begin());
    return data_loss("span " + std::to_string(i) + " at offset " +
                     std::to_string(digests[i].remote_offset) + " (" +
                     std::to_string(digests[i].bytes) +
                     " bytes) does not match its checksum: the landed bytes are corrupt");
  }
  if (outside < digests.size()) {
    const SpanDigest& d = digests[outside];
    return data_loss("span " + std::to_string(outside) + " [" + std::to_string(d.remote_offset) +
                     ", +" + std::to_string(d.bytes) + ") lies outside the " +
                     std::to_string(region.size()) + "-byte region");
  }
  return Status::ok();
}

std::vector<uint8_t> encode_peer_address(const PeerAddress& address) {
  Writer w;
  w.u32(kPeerAddressTag);
  w.u32(kVersion);
  w.blob({reinterpret_cast<const uint8_t*>(address.name.data()), address.name.size()});
  w.u64(address.epoch);
  w.blob(address.worker);
  return w.take();
}

Result<PeerAddress> decode_peer_address(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  PeerAddress a;
  std::vector<uint8_t> name;
  if (!r.header(kPeerAddressTag) || !r.blob(name) || !r.u64(a.epoch) || !r.blob(a.worker) ||
      !r.done()) {
    return malformed("peer address");
  }
  a.name.assign(name.begin(), name.end());
  return a;
}

std::vector<uint8_t> encode_remote_region(const RemoteRegion& region) {
  Writer w;
  w.u32(kRegionTag);
  w.u32(kVersion);
  w.u64(region.owner_epoch);
  w.u64(region.address);
  w.u64(region.bytes);
  w.blob(region.rkey);
  return w.take();
}

Result<RemoteRegion> decode_remote_region(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  RemoteRegion g;
  if (!r.header(kRegionTag) || !r.u64(g.owner_epoch) || !r.u64(g.address) || !r.u64(g.bytes) ||
      !r.blob(g.rkey) || !r.done()) {
    return malformed("remote region");
  }
  return g;
}

std::vector<uint8_t> encode_digests(std::span<const SpanDigest> digests) {
  Writer w;
  w.u32(kDigestsTag);
  w.u32(kVersion);
  write_digests(w, digests);
  return w.take();
}

Result<std::vector<SpanDigest>> decode_digests(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  std::vector<SpanDigest> out;
  if (!r.header(kDigestsTag) || !read_digests(r, bytes.size(), out) || !r.done())
    return malformed("digests");
  return out;
}

}  // namespace dserve::kvstore
