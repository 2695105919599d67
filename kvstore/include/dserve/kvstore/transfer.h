#pragma once
// The KV transport: one-sided puts of a request's state from a prefill worker straight into
// memory a decode worker registered. `Transport` is the interface the workers use; two
// implementations: UCX (Transport::create_ucx: TCP and shared memory here, RDMA where the NIC
// has it; only kvstore/src/ucx/ sees UCX, this header has no UCX types) and in-process
// (in_process_transport.h: a put is a memcpy into a region of a transport in the same process,
// for tests of the workers).
//
// The hand-off, as the two workers run it (the control messages travel through actors/):
//   decode : transport.allocate_memory(n) or register_memory(pages) -> MemoryRegion;
//            transport.describe(region) and
//            transport.local_address() go to the prefill worker (encode_* below make the bytes).
//   prefill: transport.connect(peer address) -> PeerId; transport.put(peer, remote region, ops)
//            -> one SpanDigest per op (XXH3-64 of the bytes it wrote; per piece of an op with
//            TransferOptions::digest_bytes); the digests go back in the "done" message.
//   decode : verify_landed(region, digests[, VerifyOptions]) before any page is read.
// Every failure (peer gone, timeout, stale region, bytes outside the region) is a Status;
// nothing waits longer than the transport's timeout (TransferOptions::timeout over UCX).
//
// Identity: a transport has a name (stable across restarts, e.g. "decode-3") and an epoch (new
// at every create). A RemoteRegion carries the epoch of the transport that registered it; a put
// refuses, before issuing anything, a region whose epoch is not the connected peer's, so a key
// from before a restart is never used.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::kvstore {

// Options of the UCX transport (Transport::create_ucx).
struct TransferOptions {
  // UCX transports (UCX_TLS). "tcp" works everywhere; "sm" (posix/sysv shared memory) only
  // between processes on one host; "self" is this process. Over "sm" a put into memory from
  // allocate_memory() is a memcpy into the mapped segment; into register_memory() memory UCX
  // 1.13 emulates it with messages the target copies (its cma transport does no ucp RMA).
  std::string transports = "tcp,sm,self";
  // Network devices for TCP (UCX_NET_DEVICES); "lo" keeps every lane on loopback.
  std::string net_devices = "lo";
  // Upper bound on one put: wire-up (endpoints connect lazily), the puts and the flush.
  std::chrono::milliseconds timeout{10000};
  // Stable identity of this worker; a peer that reconnects under the same name with a new
  // epoch replaces the old endpoint.
  std::string name = "transfer";
  // 0: a fresh random epoch (the normal case). Tests may fix it.
  uint64_t epoch = 0;
  // UCX peer-failure detection on endpoints (keepalive, connection reset): a killed peer fails
  // a put at once. Debian's UCX 1.13 shared-memory transports (posix, sysv) have none, so with
  // this on UCX never picks "sm" and TCP carries everything, even between local processes.
  // Off: "sm" is used; a dead peer is then found by a failing copy or by the timeout.
  bool detect_peer_failure = true;
  // A background thread progresses the worker so that puts by peers land (UCX's TCP RMA needs
  // the target to progress). Turn off only when the owner calls Transport::progress().
  bool progress_thread = true;
  // Threads a put starts to compute the span digests while the caller issues and progresses
  // the puts: hashing then overlaps the copy instead of preceding it (over shared memory the
  // copy is the caller's memcpy, so overlap needs a second thread). 0: the caller hashes every
  // span before the first put. Puts under 4 MiB in all are hashed by the caller regardless.
  unsigned checksum_threads = 1;
  // 0: one digest per op. > 0: each op is cut into pieces of at most this many bytes, one
  // digest each, in order (still covering exactly the op's bytes), so that the receiver can
  // verify one op with several threads (VerifyOptions). Every byte stays covered either way.
  uint64_t digest_bytes = 0;
};

// What a peer needs to connect to this transport. Plain bytes: safe to copy between processes.
struct PeerAddress {
  std::string name;
  uint64_t epoch = 0;
  std::vector<uint8_t> worker;  // the transport's own address bytes (UCX: the ucp worker address)
};

// A region registered by a (possibly remote) transport: where a put may write.
struct RemoteRegion {
  uint64_t owner_epoch = 0;  // epoch of the transport that registered it
  uint64_t address = 0;      // base virtual address in the owner's process
  uint64_t bytes = 0;
  std::vector<uint8_t> rkey;  // the key a put needs (UCX: the packed remote key)
};

// One span of a put: `bytes` bytes from `local` to region base + `remote_offset`.
struct PutOp {
  const void* local = nullptr;
  uint64_t bytes = 0;
  uint64_t remote_offset = 0;
};

// What a put wrote, for the receiver to check (XXH3-64, seed 0).
struct SpanDigest {
  uint64_t remote_offset = 0;
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;
};

// Opaque handle to a connected peer; valid until the peer reconnects with a new epoch.
struct PeerId {
  uint64_t value = 0;
  friend bool operator==(PeerId, PeerId) = default;
};

// How verify_landed spreads the hashing over threads. Each span is hashed
// whole by one thread (XXH3 of one span is sequential): a single large span gains nothing,
// several do (TransferOptions::digest_bytes cuts large ops into several).
struct VerifyOptions {
  // Threads that hash, the caller included; 1 is the caller alone.
  unsigned threads = 2;
  // Each thread gets at least this many bytes; with fewer, fewer threads start (one costs
  // ~50 us), and a single one is the serial verify_landed.
  uint64_t min_bytes_per_thread = uint64_t{4} << 20;
};

class Transport;

// A registration of local memory with a transport; deregisters on destruction. Must not outlive
// its transport. Move-only. Memory from register_memory() stays owned by the caller and must
// outlive the region; memory from allocate_memory() is owned by the region.
class MemoryRegion {
 public:
  MemoryRegion() = default;
  ~MemoryRegion();
  MemoryRegion(MemoryRegion&& other) noexcept;
  MemoryRegion& operator=(MemoryRegion&& other) noexcept;
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  bool valid() const { return transport_ != nullptr; }
  std::byte* data() const { return base_; }
  uint64_t bytes() const { return bytes_; }
  // The transport that registered it (null when empty).
  Transport* transport() const { return transport_; }
  // What the transport keeps for it (UCX: the ucp_mem_h); opaque to everyone else.
  void* handle() const { return handle_; }

 private:
  friend class Transport;
  MemoryRegion(Transport* transport, std::byte* base, uint64_t bytes, void* handle)
      : transport_(transport), base_(base), bytes_(bytes), handle_(handle) {}
  void reset();

  Transport* transport_ = nullptr;
  std::byte* base_ = nullptr;
  uint64_t bytes_ = 0;
  void* handle_ = nullptr;
};

// What a worker needs of a transport to hand a request's state over. Every method may be
// called from any thread (implementations serialise what they must).
class Transport {
 public:
  // The UCX transport (kvstore/src/ucx/). Fails (kUnavailable / kInternal) when UCX cannot open
  // the requested transports. One UCX context and worker; calls into UCX are serialised by one
  // lock, which a put holds while it progresses the worker, so puts on one transport run one at
  // a time (use one per thread for parallel hand-offs). A put may start
  // TransferOptions::checksum_threads short-lived threads; it joins them before it returns.
  static Result<std::unique_ptr<Transport>> create_ucx(TransferOptions options);

  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // New at every create: a region described by an earlier incarnation is refused by puts.
  virtual uint64_t epoch() const = 0;
  // Name, epoch and address bytes: what the control plane sends to peers.
  virtual PeerAddress local_address() const = 0;

  // Registers [base, base + bytes) for remote writes. The memory must stay valid until the
  // returned region is destroyed.
  virtual Result<MemoryRegion> register_memory(void* base, uint64_t bytes) = 0;
  // Allocates `bytes` (zero-filled) and registers them; the region owns the memory and frees
  // it on destruction. Over UCX prefer this for memory peers write into: UCX's shared-memory
  // transport can put into such memory directly (a memcpy into a mapped segment), whereas into
  // memory from register_memory() it emulates the put with messages the target copies.
  virtual Result<MemoryRegion> allocate_memory(uint64_t bytes) = 0;
  // The key, base address and this transport's epoch, for the peer. `region` must be one of
  // this transport's (a programmer error otherwise).
  virtual Result<RemoteRegion> describe(const MemoryRegion& region) = 0;

  // Connects to a peer (over UCX lazily: wire-up happens on the first put). Connecting again to
  // the same name and epoch returns the same PeerId; a new epoch for a known name drops the old
  // connection and makes its PeerId stale.
  virtual Result<PeerId> connect(const PeerAddress& peer) = 0;
  // Closes the connection; later puts on `peer` fail. No-op for an unknown id.
  virtual void disconnect(PeerId peer) = 0;

  // Writes every op into `region` on `peer` and waits until they are complete there: on return
  // ok, the bytes are in the peer's memory. Refuses (kInvalidArgument, nothing written) a
  // region of another epoch than the peer's, or an op outside the region. Fails kUnavailable
  // when the peer is gone or the put does not complete in time; the peer must then connect
  // again. Returns the digest of every op, in order (with TransferOptions::digest_bytes > 0, of
  // every piece of every op, in order). The source bytes must not change until it returns.
  virtual Result<std::vector<SpanDigest>> put(PeerId peer, const RemoteRegion& region,
                                              std::span<const PutOp> ops) = 0;

  // Lets puts by peers make progress once (only needed where the transport has no progress
  // thread of its own); returns whether anything happened.
  virtual bool progress() = 0;

 protected:
  Transport() = default;
  // A region of this transport over [base, base + bytes); `handle` comes back to
  // release_region when the region ends.
  MemoryRegion make_region(std::byte* base, uint64_t bytes, void* handle) {
    return MemoryRegion(this, base, bytes, handle);
  }
  // Ends the registration that make_region() made (MemoryRegion's destructor calls it).
  virtual void release_region(std::byte* base, uint64_t bytes, void* handle) = 0;

  friend class MemoryRegion;
};

// What put() refuses before a byte moves, whatever the transport: an op outside the region, an
// op without a source, a region without a key.
Status check_put_ops(const RemoteRegion& region, std::span<const PutOp> ops);

// The digests put() returns for `ops`: XXH3-64 of each op, or of each piece of at most
// `digest_bytes` of each op (0: whole ops), in order.
std::vector<SpanDigest> span_digests(std::span<const PutOp> ops, uint64_t digest_bytes = 0);

// XXH3-64 (seed 0) of a span: what SpanDigest::xxh3 holds.
uint64_t span_checksum(const void* data, uint64_t bytes);

// Checks that every digest's span lies inside `region` and that its bytes hash to the digest;
// kDataLoss names the first span that does not. Call before reading landed pages.
Status verify_landed(std::span<const std::byte> region, std::span<const SpanDigest> digests);

// verify_landed with the spans spread over up to options.threads threads. Same result as the
// serial one, including which span a kDataLoss names (the first in order). Blocks until done.
Status verify_landed(std::span<const std::byte> region, std::span<const SpanDigest> digests,
                     const VerifyOptions& options);

// Byte encodings for the control plane (little-endian, versioned); decode_* refuse malformed
// or truncated input with kDataLoss.
std::vector<uint8_t> encode_peer_address(const PeerAddress& address);
Result<PeerAddress> decode_peer_address(std::span<const uint8_t> bytes);
std::vector<uint8_t> encode_remote_region(const RemoteRegion& region);
Result<RemoteRegion> decode_remote_region(std::span<const uint8_t> bytes);
std::vector<uint8_t> encode_digests(std::span<const SpanDigest> digests);
Result<std::vector<SpanDigest>> decode_digests(std::span<const uint8_t> bytes);

}  // namespace dserve::kvstore
