#pragma once
// Internal to kvstore/src/transfer*.cc: the UCX state behind TransferEngine. Never included
// from outside this module (it pulls in UCX's headers).

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
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
namespace transfer_detail {

using Clock = std::chrono::steady_clock;

inline std::string ucs_error(ucs_status_t status) {
  return ucs_status_string(status);
}

// Completion state of one put batch. Heap-allocated: a request can outlive a failed put (over
// shared memory without failure detection a forced close leaves it pending), and then the
// engine keeps the batch until the worker is destroyed, so no callback touches freed memory.
struct Batch {
  size_t outstanding = 0;
  ucs_status_t first_error = UCS_OK;
  // A pipelined put's flushes, one per piece (a deque: callbacks hold their addresses), and the
  // notification payloads pending sends still read.
  struct Flush {
    Batch* batch = nullptr;
    bool done = false;
  };
  std::deque<Flush> flushes;
  std::vector<std::vector<uint8_t>> payloads;
};

// The active message that carries a LandedPiece (encode_landed_piece) to the receiver.
constexpr unsigned kLandedPieceAm = 7;

}  // namespace transfer_detail

// What a LandedWatcher shares with the engine's notification handler. The handler runs in
// ucp_worker_progress (engine lock held) and takes `mu` only to record a piece; verification
// happens in the watcher's caller, without either lock.
struct LandedWatcher::State {
  uint64_t handoff_id = 0;
  std::span<const std::byte> region;

  std::mutex mu;  // guards everything below
  std::condition_variable landed_cv;
  uint32_t count = 0;                           // 0 until the first notification
  std::vector<std::vector<SpanDigest>> pieces;  // by index, once count is known
  std::vector<uint8_t> seen;                    // by index: its notification arrived
  std::deque<uint32_t> unverified;              // landed, in arrival order
  uint32_t landed = 0;
  uint32_t verified = 0;
  uint64_t bytes_verified = 0;
  Status error;  // sticky

  // Records a notification; a contradiction becomes the sticky error. Takes `mu`.
  Status accept(LandedPiece piece);
};

struct TransferEngine::Impl {
  using Batch = transfer_detail::Batch;
  using Clock = transfer_detail::Clock;
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

  // Watched hand-offs by (region base address, hand-off id). Lock order: mu, watch_mu.
  std::mutex watch_mu;
  std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<LandedWatcher::State>> watchers;
  uint64_t notifications_dropped = 0;  // for no watcher (guarded by watch_mu)

  // Callers blocked in put/close progress the worker themselves; the thread then stands back.
  std::atomic<int> waiters{0};
  std::atomic<bool> stop{false};
  std::thread progress_thread;

  static void on_peer_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    auto* peer = static_cast<Peer*>(arg);
    peer->failed = true;
    peer->failure = transfer_detail::ucs_error(status);
  }

  // The kLandedPieceAm handler (in ucp_worker_progress, lock held): hands the piece to its
  // watcher. The payload is copied; nothing here calls into UCX.
  static ucs_status_t on_landed_piece(void* arg, const void* /*header*/, size_t /*header_bytes*/,
                                      void* data, size_t bytes, const ucp_am_recv_param_t* param) {
    auto* impl = static_cast<Impl*>(arg);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) return UCS_OK;  // never sent so
    auto piece = decode_landed_piece({static_cast<const uint8_t*>(data), bytes});
    std::shared_ptr<LandedWatcher::State> state;
    {
      std::lock_guard lock(impl->watch_mu);
      if (piece.is_ok()) {
        auto it = impl->watchers.find({piece->region_address, piece->handoff_id});
        if (it != impl->watchers.end()) state = it->second;
      }
      if (state == nullptr) ++impl->notifications_dropped;
    }
    // A contradiction is recorded in the watcher, whose caller sees it.
    if (state != nullptr) (void)state->accept(std::move(piece).value());
    return UCS_OK;
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
