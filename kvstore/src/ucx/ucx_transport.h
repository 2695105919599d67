#pragma once
// Internal to kvstore/src/ucx/: UcxTransport, the UCX implementation of kvstore::Transport
// (Transport::create_ucx). Never included from outside this directory (it pulls in UCX's
// headers).

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dserve/kvstore/transfer.h"

namespace dserve::kvstore {
namespace ucx_detail {

using Clock = std::chrono::steady_clock;

inline std::string ucs_error(ucs_status_t status) {
  return ucs_status_string(status);
}

// Completion state of one put batch. Heap-allocated: a request can outlive a failed put (over
// shared memory without failure detection a forced close leaves it pending), and then the
// transport keeps the batch until the worker is destroyed, so no callback touches freed memory.
struct Batch {
  size_t outstanding = 0;
  ucs_status_t first_error = UCS_OK;
};

}  // namespace ucx_detail

// One UCX context and worker (see Transport::create_ucx).
class UcxTransport final : public Transport {
 public:
  static Result<std::unique_ptr<Transport>> create(TransferOptions options);
  ~UcxTransport() override;

  const TransferOptions& options() const { return options_; }
  uint64_t epoch() const override { return options_.epoch; }
  PeerAddress local_address() const override;
  Result<MemoryRegion> register_memory(void* base, uint64_t bytes) override;
  Result<MemoryRegion> allocate_memory(uint64_t bytes) override;
  Result<RemoteRegion> describe(const MemoryRegion& region) override;
  Result<PeerId> connect(const PeerAddress& peer) override;
  void disconnect(PeerId peer) override;
  Result<std::vector<SpanDigest>> put(PeerId peer, const RemoteRegion& region,
                                      std::span<const PutOp> ops) override;
  bool progress() override;

 private:
  struct Impl;
  UcxTransport(TransferOptions options, std::unique_ptr<Impl> impl);
  void release_region(std::byte* base, uint64_t bytes, void* handle) override;

  TransferOptions options_;
  std::unique_ptr<Impl> impl_;
};

struct UcxTransport::Impl {
  using Batch = ucx_detail::Batch;
  using Clock = ucx_detail::Clock;
  struct Peer {
    PeerId id;
    std::string name;
    uint64_t epoch = 0;
    ucp_ep_h ep = nullptr;
    bool failed = false;
    std::string failure;
    // Unpacked remote keys by their packed bytes, oldest first. Unpacking is not free: for
    // shared memory it maps the peer's segment (and its pages fault in again on first write).
    std::vector<std::pair<std::vector<uint8_t>, ucp_rkey_h>> rkeys;
  };
  static constexpr size_t kMaxCachedRkeys = 64;

  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  std::vector<uint8_t> worker_address;

  std::mutex mu;  // guards every call into context/worker and everything below
  std::unordered_map<uint64_t, std::unique_ptr<Peer>> peers;
  uint64_t next_peer_id = 1;
  int64_t live_regions = 0;
  std::vector<std::unique_ptr<Batch>> orphans;

  // Callers blocked in put/close progress the worker themselves; the thread then stands back.
  std::atomic<int> waiters{0};
  std::atomic<bool> stop{false};
  std::thread progress_thread;

  static void on_peer_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    auto* peer = static_cast<Peer*>(arg);
    peer->failed = true;
    peer->failure = ucx_detail::ucs_error(status);
  }

  void run_progress() {
    auto idle = std::chrono::microseconds(0);
    while (!stop.load(std::memory_order_relaxed)) {
      if (waiters.load(std::memory_order_relaxed) > 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        continue;
      }
      unsigned events = 0;
      {
        std::lock_guard lock(mu);
        events = ucp_worker_progress(worker);
      }
      if (events != 0) {
        idle = std::chrono::microseconds(0);
        continue;
      }
      // Back off while nothing arrives, but not so far that a put's first packets wait long.
      idle = std::min(std::chrono::microseconds(200), idle + std::chrono::microseconds(10));
      std::this_thread::sleep_for(idle);
    }
  }

  // Progresses (lock held) until `batch` completes or `deadline` passes.
  bool wait(std::unique_lock<std::mutex>& lock, const Batch& batch, Clock::time_point deadline) {
    (void)lock;
    // The clock is read every 64 rounds: a progress round can be far cheaper than the read.
    for (unsigned round = 1; batch.outstanding > 0; ++round) {
      ucp_worker_progress(worker);
      if (round % 64 == 0 && Clock::now() > deadline) return batch.outstanding == 0;
    }
    return true;
  }

  // Force-closes an endpoint (its pending requests complete with an error). Lock held.
  void close_endpoint(std::unique_lock<std::mutex>& lock, ucp_ep_h ep) {
    if (ep == nullptr) return;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &param);
    if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
    auto deadline = Clock::now() + std::chrono::seconds(2);
    (void)lock;
    while (ucp_request_check_status(req) == UCS_INPROGRESS && Clock::now() < deadline) {
      ucp_worker_progress(worker);
    }
    ucp_request_free(req);
  }

  // Closes the peer's endpoint and drops its remote keys; they are leaked instead while a
  // request that may use them is still pending (see Batch).
  void close_peer(std::unique_lock<std::mutex>& lock, Peer& peer, bool requests_pending = false) {
    close_endpoint(lock, peer.ep);
    peer.ep = nullptr;
    if (!requests_pending) {
      for (auto& entry : peer.rkeys)
        ucp_rkey_destroy(entry.second);
    }
    peer.rkeys.clear();
  }

  void fail_peer(std::unique_lock<std::mutex>& lock, Peer& peer, std::string why,
                 const Batch& batch) {
    peer.failed = true;
    if (peer.failure.empty()) peer.failure = std::move(why);
    close_peer(lock, peer, batch.outstanding > 0);
  }

  // The connected, unfailed peer `id` and the unpacked key of `region` on its endpoint, or why
  // not (nothing issued). `who` names the peer for messages. Lock held.
  Status open_peer(PeerId id, const RemoteRegion& region, Peer*& peer, ucp_rkey_h& rkey,
                   std::string& who);

  // The unpacked key for `packed` on `peer`'s endpoint, from the cache or unpacked now.
  ucs_status_t rkey_for(Peer& peer, const std::vector<uint8_t>& packed, ucp_rkey_h& out) {
    for (auto& entry : peer.rkeys) {
      if (entry.first == packed) {
        out = entry.second;
        return UCS_OK;
      }
    }
    ucs_status_t st = ucp_ep_rkey_unpack(peer.ep, packed.data(), &out);
    if (st != UCS_OK) return st;
    if (peer.rkeys.size() == kMaxCachedRkeys) {
      ucp_rkey_destroy(peer.rkeys.front().second);
      peer.rkeys.erase(peer.rkeys.begin());
    }
    peer.rkeys.emplace_back(packed, out);
    return UCS_OK;
  }
};

}  // namespace dserve::kvstore
