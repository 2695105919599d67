#pragma once
// InProcessTransport: a kvstore::Transport whose peers live in the same process, for tests of
// the workers without UCX. A put is a memcpy into the region the peer registered; it returns
// the digests the UCX transport returns (XXH3-64 per span, or per piece of digest_bytes) and
// refuses what it refuses: a region of another epoch than the connected peer's, an op outside
// the region, an op without a source. It also refuses a region the peer no longer has
// registered (unknown key), as RDMA does once a key is revoked.
//
// Peers find each other through a process-wide registry keyed by the address that
// local_address() hands out; a transport leaves it when destroyed, and puts to it then fail
// kUnavailable. Every method may be called from any thread.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "dserve/kvstore/transfer.h"

namespace dserve::kvstore {

struct InProcessTransportOptions {
  std::string name = "in-process";
  // 0: a fresh epoch, never used by another transport of this process.
  uint64_t epoch = 0;
  // As TransferOptions::digest_bytes: 0, one digest per op; > 0, per piece of that many bytes.
  uint64_t digest_bytes = 0;
};

class InProcessTransport final : public Transport {
 public:
  explicit InProcessTransport(InProcessTransportOptions options = {});
  ~InProcessTransport() override;  // regions must be destroyed first

  uint64_t epoch() const override { return options_.epoch; }
  PeerAddress local_address() const override;
  Result<MemoryRegion> register_memory(void* base, uint64_t bytes) override;
  Result<MemoryRegion> allocate_memory(uint64_t bytes) override;
  Result<RemoteRegion> describe(const MemoryRegion& region) override;
  Result<PeerId> connect(const PeerAddress& peer) override;
  void disconnect(PeerId peer) override;
  Result<std::vector<SpanDigest>> put(PeerId peer, const RemoteRegion& region,
                                      std::span<const PutOp> ops) override;
  bool progress() override { return false; }  // puts complete on the caller's thread

  // Regions registered now (tests check that a worker gave its regions back).
  size_t registered_regions() const;
  // Puts by peers (or this transport) that wrote their bytes into this transport's regions.
  uint64_t puts_received() const;

  // What the registry holds of a transport (internal to in_process_transport.cc).
  struct Endpoint;

 private:
  void release_region(std::byte* base, uint64_t bytes, void* handle) override;

  struct Peer {
    PeerId id;
    std::string name;
    uint64_t epoch = 0;
    std::weak_ptr<Endpoint> endpoint;
  };

  InProcessTransportOptions options_;
  std::shared_ptr<Endpoint> self_;
  mutable std::mutex mu_;  // guards the peers
  std::unordered_map<uint64_t, Peer> peers_;
  uint64_t next_peer_id_ = 1;
};

}  // namespace dserve::kvstore
