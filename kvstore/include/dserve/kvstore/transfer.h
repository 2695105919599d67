#pragma once
// The KV transfer engine: one-sided RMA puts of a request's state from a prefill worker straight
// into pages a decode worker registered, over UCX (TCP and shared memory here, RDMA where the
// NIC has it). Only kvstore/src/transfer*.cc sees UCX; this header has no UCX types.
//
// The hand-off, as the two workers run it (the control messages travel through actors/):
//   decode : engine->allocate_memory(n) or register_memory(pages) -> MemoryRegion;
//            engine->describe(region) and
//            engine->local_address() go to the prefill worker (encode_* below make the bytes).
//   prefill: engine->connect(peer address) -> PeerId; engine->put(peer, remote region, ops)
//            -> one SpanDigest per op (XXH3-64 of the bytes it wrote; per piece of an op with
//            TransferOptions::digest_bytes); the digests go back in the "done" message.
//   decode : verify_landed(region, digests[, VerifyOptions]) before any page is read.
// Pipelined, so that verification overlaps the copy instead of following it:
//   decode : engine->watch(region, handoff id) -> LandedWatcher, before the id goes out;
//   prefill: engine->put_pipelined(peer, remote region, ops, {handoff id, piece bytes}):
//            after each piece (piece_bytes of the ops) is complete in the peer's memory (a
//            flush, not a local completion), its digests go to the peer as a UCX active
//            message (and to an optional callback, for a caller that carries them itself);
//   decode : watcher.wait(timeout) verifies each piece as it lands, and returns once the last
//            one is verified; a corrupt or missing piece is kDataLoss naming it.
// Every failure (peer gone, timeout, stale region, corrupt bytes) is a Status; nothing waits
// longer than TransferOptions::timeout (a watcher: than the timeout its caller gives).
//
// Identity: an engine has a name (stable across restarts, e.g. "decode-3") and an epoch (new
// at every create). A RemoteRegion carries the epoch of the engine that registered it; a put
// refuses, before issuing anything, a region whose epoch is not the connected peer's, so an
// rkey from before a restart is never used.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::kvstore {

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
  // the target to progress). Turn off only when the owner calls TransferEngine::progress().
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

// What a peer needs to connect to this engine. Plain bytes: safe to copy between processes.
struct PeerAddress {
  std::string name;
  uint64_t epoch = 0;
  std::vector<uint8_t> worker;  // ucp worker address
};

// A region registered by a (possibly remote) engine: where a put may write.
struct RemoteRegion {
  uint64_t owner_epoch = 0;  // epoch of the engine that registered it
  uint64_t address = 0;      // base virtual address in the owner's process
  uint64_t bytes = 0;
  std::vector<uint8_t> rkey;  // packed UCX remote key
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

// How verify_landed and LandedWatcher spread the hashing over threads. Each span is hashed
// whole by one thread (XXH3 of one span is sequential): a single large span gains nothing,
// several do (TransferOptions::digest_bytes cuts large ops into several).
struct VerifyOptions {
  // Threads that hash, the caller included; 1 is the caller alone.
  unsigned threads = 2;
  // Each thread gets at least this many bytes; with fewer, fewer threads start (one costs
  // ~50 us), and a single one is the serial verify_landed.
  uint64_t min_bytes_per_thread = uint64_t{4} << 20;
};

// How TransferEngine::put_pipelined cuts a put into pieces and announces them.
struct PipelineOptions {
  // Names the hand-off to the receiver's LandedWatcher (TransferEngine::watch); must not be 0.
  // Unique per region among hand-offs that may overlap in time (a request id will do).
  uint64_t handoff_id = 0;
  // Bytes per piece (the ops, in order, cut at these boundaries; an op may straddle two). The
  // receiver verifies piece i while i + 1 is copied, so what remains after the last byte lands
  // is one piece's verification: smaller pieces shorten that tail, and each costs one flush and
  // one message. Must be > 0.
  uint64_t piece_bytes = uint64_t{8} << 20;
  // Send each piece's notification to the peer over UCX (an active message on the endpoint the
  // puts used, sent once the flush of the piece completed). false: only the callback sees them,
  // for a caller that carries them on its own channel (LandedWatcher::deliver on the far side).
  bool notify_peer = true;
};

// "Piece `index` of `count` of hand-off `handoff_id` has landed in the region at
// `region_address` (RemoteRegion::address), and these are its digests". The digests are those
// of the piece's fragments (the parts of ops inside it, in op order); zero-byte ops have none.
struct LandedPiece {
  uint64_t handoff_id = 0;
  uint64_t region_address = 0;
  uint32_t index = 0;
  uint32_t count = 0;
  std::vector<SpanDigest> digests;
};

// Called by put_pipelined on its own thread once piece `piece` has landed and (with
// notify_peer) its notification was handed to UCX, in piece order. It runs with the engine's
// lock held: it must not call into the same engine, and it stalls the pipeline while it runs.
using PieceLandedCallback = std::function<void(const LandedPiece& piece)>;

class TransferEngine;

// A registration of local memory; deregisters on destruction. Must not outlive its engine.
// Move-only. Memory from register_memory() stays owned by the caller and must outlive the
// region; memory from allocate_memory() is owned by the region.
class MemoryRegion {
 public:
  MemoryRegion() = default;
  ~MemoryRegion();
  MemoryRegion(MemoryRegion&& other) noexcept;
  MemoryRegion& operator=(MemoryRegion&& other) noexcept;
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  bool valid() const { return engine_ != nullptr; }
  std::byte* data() const { return base_; }
  uint64_t bytes() const { return bytes_; }

 private:
  friend class TransferEngine;
  MemoryRegion(TransferEngine* engine, std::byte* base, uint64_t bytes, void* memh)
      : engine_(engine), base_(base), bytes_(bytes), memh_(memh) {}
  void reset();

  TransferEngine* engine_ = nullptr;
  std::byte* base_ = nullptr;
  uint64_t bytes_ = 0;
  void* memh_ = nullptr;  // ucp_mem_h
};

// The receiving side of one pipelined hand-off into one region: collects the notifications of
// landed pieces (from the engine's progress, or deliver()) and verifies each piece's bytes
// against its digests on the thread that calls poll() or wait(). Nothing is verified outside
// those calls, so a piece is checked only after its notification arrived, i.e. after its bytes
// were complete in this memory. Move-only; must not outlive its engine or its region. poll(),
// wait() and deliver() may be called from different threads, but poll()/wait() by one at a
// time. Once an error is found it sticks: every later call returns it.
class LandedWatcher {
 public:
  LandedWatcher();
  ~LandedWatcher();  // stops accepting notifications for this hand-off
  LandedWatcher(LandedWatcher&& other) noexcept;
  LandedWatcher& operator=(LandedWatcher&& other) noexcept;
  LandedWatcher(const LandedWatcher&) = delete;
  LandedWatcher& operator=(const LandedWatcher&) = delete;

  bool valid() const { return state_ != nullptr; }
  uint64_t handoff_id() const;

  struct Progress {
    uint32_t pieces = 0;  // the hand-off's piece count; 0 until a first notification arrived
    uint32_t landed = 0;  // pieces whose notification arrived
    uint32_t verified = 0;
    uint64_t bytes_verified = 0;
    bool done() const { return pieces > 0 && verified == pieces; }
  };
  // Verifies every piece that landed since the last call; never waits for one. kDataLoss names
  // the first piece (and span) whose bytes do not match, or a notification that contradicts
  // the others (another piece count, a piece twice, a span outside the region).
  Result<Progress> poll(const VerifyOptions& verify = {});
  // Verifies pieces as they land until the last one is verified; returns the digests of every
  // piece, in piece order (what put_pipelined returned to the sender). Errors as poll(); a
  // piece that has not landed within `timeout` is kDataLoss naming it (sender gone, stalled,
  // or a notification lost). Without a progress thread (TransferOptions) it progresses the
  // engine itself.
  Result<std::vector<SpanDigest>> wait(std::chrono::milliseconds timeout,
                                       const VerifyOptions& verify = {});
  // A notification that came another way (PipelineOptions::notify_peer = false and the caller's
  // channel). Its bytes must already have landed (put_pipelined's callback runs after that).
  // kInvalidArgument for another hand-off or region; contradictions as poll().
  Status deliver(const LandedPiece& piece);

  struct State;  // internal to kvstore/src/transfer*.cc

 private:
  friend class TransferEngine;
  LandedWatcher(TransferEngine* engine, std::shared_ptr<State> state);
  void reset();

  TransferEngine* engine_ = nullptr;
  std::shared_ptr<State> state_;
};

// One UCX context and worker. Thread-safe: every method may be called from any thread. Calls
// into UCX are serialised by one lock, which a put holds while it progresses the worker, so
// puts on one engine run one at a time (use one engine per thread for parallel hand-offs). A
// put may start TransferOptions::checksum_threads short-lived threads; it joins them before it
// returns.
class TransferEngine {
 public:
  // Fails (kUnavailable / kInternal) when UCX cannot open the requested transports.
  static Result<std::unique_ptr<TransferEngine>> create(TransferOptions options);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  const TransferOptions& options() const { return options_; }
  uint64_t epoch() const { return options_.epoch; }
  // Name, epoch and worker address: what the control plane sends to peers.
  PeerAddress local_address() const;

  // Registers [base, base + bytes) for remote writes. The memory must stay valid until the
  // returned region is destroyed.
  Result<MemoryRegion> register_memory(void* base, uint64_t bytes);
  // Allocates `bytes` through UCX (zero-filled) and registers them; the region owns the memory
  // and frees it on destruction. Prefer this for memory peers write into: UCX's shared-memory
  // transport can put into such memory directly (a memcpy into a mapped segment), whereas
  // into memory from register_memory() it emulates the put with messages the target copies.
  Result<MemoryRegion> allocate_memory(uint64_t bytes);
  // The packed remote key, base address and this engine's epoch, for the peer.
  Result<RemoteRegion> describe(const MemoryRegion& region);

  // Connects to a peer (lazily: wire-up happens on the first put). Connecting again to the
  // same name and epoch returns the same PeerId; a new epoch for a known name closes the old
  // endpoint and makes its PeerId stale.
  Result<PeerId> connect(const PeerAddress& peer);
  // Closes the endpoint; later puts on `peer` fail. No-op for an unknown id.
  void disconnect(PeerId peer);

  // Writes every op into `region` on `peer`, then flushes: on return ok, the bytes are in the
  // peer's memory. Refuses (kInvalidArgument, nothing issued) a region of another epoch than
  // the peer's, or an op outside the region. Fails kUnavailable when the peer is gone or the
  // put does not complete within the timeout; the endpoint is then closed and the peer must
  // connect again. Returns the digest of every op, in order (with options().digest_bytes > 0,
  // of every piece of every op, in order). The source bytes must not change until it returns.
  Result<std::vector<SpanDigest>> put(PeerId peer, const RemoteRegion& region,
                                      std::span<const PutOp> ops);

  // put(), cut into pieces of options.piece_bytes: each piece is flushed (complete in the
  // peer's memory) and then announced with its digests to the peer's LandedWatcher for
  // options.handoff_id (notify_peer) and to `on_piece_landed` (if set), in piece order, while
  // later pieces are still being written. Returns the digests of every piece, in order, as the
  // notifications carried them (so a single "done" message can still carry them all). Refuses
  // what put() refuses, and a handoff_id of 0 or a piece_bytes of 0 (kInvalidArgument). Fails
  // kUnavailable as put() does; the peer's watcher then times out. Bounded by the timeout.
  Result<std::vector<SpanDigest>> put_pipelined(PeerId peer, const RemoteRegion& region,
                                                std::span<const PutOp> ops,
                                                const PipelineOptions& options,
                                                const PieceLandedCallback& on_piece_landed = {});

  // Starts collecting the notifications of hand-off `handoff_id` into `region`. Call before the
  // id reaches the sender: a notification for a hand-off nobody watches is dropped. Refuses
  // (kInvalidArgument) id 0, a region of another engine, and an id already watched on the region.
  Result<LandedWatcher> watch(const MemoryRegion& region, uint64_t handoff_id);

  // Progresses the worker once (only needed with progress_thread = false); returns whether
  // anything happened.
  bool progress();

 private:
  struct Impl;
  friend class MemoryRegion;
  friend class LandedWatcher;
  TransferEngine(TransferOptions options, std::unique_ptr<Impl> impl);
  void deregister(void* memh);

  TransferOptions options_;
  std::unique_ptr<Impl> impl_;
};

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
// A LandedPiece, for a caller that carries notifications itself (and the active message's
// payload).
std::vector<uint8_t> encode_landed_piece(const LandedPiece& piece);
Result<LandedPiece> decode_landed_piece(std::span<const uint8_t> bytes);

}  // namespace dserve::kvstore
