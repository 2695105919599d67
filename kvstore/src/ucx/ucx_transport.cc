// UcxTransport over UCX's ucp API: one context and one worker, a lock that serialises every
// call into them, and a thread that progresses the worker when no caller is waiting on it.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "ucx_transport.h"

namespace dserve::kvstore {
namespace {

using ucx_detail::Batch;
using ucx_detail::Clock;
using ucx_detail::ucs_error;

void on_request_done(void* request, ucs_status_t status, void* user_data) {
  auto* batch = static_cast<Batch*>(user_data);
  if (status != UCS_OK && batch->first_error == UCS_OK) batch->first_error = status;
  --batch->outstanding;
  ucp_request_free(request);
}

// Parameters of a put from host memory whose completion is counted in `batch`.
ucp_request_param_t host_put_param(Batch& batch) {
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  param.cb.send = &on_request_done;
  param.user_data = &batch;
  param.memory_type = UCS_MEMORY_TYPE_HOST;
  return param;
}

// Adds the result of a non-blocking call to `batch`: done at once, failed, or pending.
void track(Batch& batch, ucs_status_ptr_t ptr) {
  if (ptr == nullptr) return;
  if (UCS_PTR_IS_ERR(ptr)) {
    if (batch.first_error == UCS_OK) batch.first_error = UCS_PTR_STATUS(ptr);
    return;
  }
  ++batch.outstanding;
}

// Below this many bytes a put's digests are computed by the caller before the puts: starting a
// thread (~50 us) costs more than the overlap saves.
constexpr uint64_t kMinOverlappedHashBytes = uint64_t{4} << 20;

// The digests of a put: one per op, or per piece of at most `digest_bytes`. Helper threads
// (start) and the caller (finish) take pieces in turn, so hashing runs beside the puts, which
// read the same source bytes but share no state with it.
class SpanHasher {
 public:
  SpanHasher(std::span<const PutOp> ops, uint64_t digest_bytes) {
    for (const PutOp& op : ops) {
      const auto* local = static_cast<const std::byte*>(op.local);
      uint64_t step = digest_bytes == 0 ? op.bytes : digest_bytes;
      uint64_t off = 0;
      do {  // a zero-byte op still gets its digest, as it always has
        uint64_t n = std::min(step, op.bytes - off);
        pieces_.push_back({local == nullptr ? nullptr : local + off, op.remote_offset + off, n});
        off += n;
      } while (off < op.bytes);
      bytes_ += op.bytes;
    }
    digests_.resize(pieces_.size());
  }
  // Stops handing out pieces and waits for the helpers (a put that failed drops the digests).
  ~SpanHasher() {
    next_.store(pieces_.size());
    join();
  }
  SpanHasher(const SpanHasher&) = delete;
  SpanHasher& operator=(const SpanHasher&) = delete;

  uint64_t bytes() const { return bytes_; }
  // Starts up to `threads` helpers; any that cannot be started leave their share to finish().
  void start(unsigned threads) {
    for (unsigned t = 0; t < threads && t < pieces_.size(); ++t) {
      try {
        helpers_.emplace_back([this] { drain(); });
      } catch (const std::system_error&) {
        break;
      }
    }
  }
  // Hashes what no helper has taken, waits for the helpers, and returns every digest in order.
  std::vector<SpanDigest> finish() {
    drain();
    join();
    return std::move(digests_);
  }

 private:
  struct Piece {
    const std::byte* local;
    uint64_t remote_offset;
    uint64_t bytes;
  };
  void hash(size_t i) {
    const Piece& p = pieces_[i];
    digests_[i] = {p.remote_offset, p.bytes, span_checksum(p.local, p.bytes)};
  }
  void drain() {
    for (size_t i = next_.fetch_add(1); i < pieces_.size(); i = next_.fetch_add(1))
      hash(i);
  }
  void join() {
    for (std::thread& t : helpers_)
      t.join();
    helpers_.clear();
  }

  std::vector<Piece> pieces_;
  std::vector<SpanDigest> digests_;
  uint64_t bytes_ = 0;
  std::atomic<size_t> next_{0};
  std::vector<std::thread> helpers_;
};

uint64_t fresh_epoch() {
  std::random_device rd;
  uint64_t e = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
               static_cast<uint64_t>(Clock::now().time_since_epoch().count()) ^
               (static_cast<uint64_t>(getpid()) << 16);
  return e == 0 ? 1 : e;
}

}  // namespace

Result<std::unique_ptr<Transport>> Transport::create_ucx(TransferOptions options) {
  return UcxTransport::create(std::move(options));
}

// ---- UcxTransport ----

Result<std::unique_ptr<Transport>> UcxTransport::create(TransferOptions options) {
  if (options.timeout.count() <= 0) return invalid_argument("transfer timeout must be positive");
  if (options.epoch == 0) options.epoch = fresh_epoch();
  auto impl = std::make_unique<Impl>();

  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return internal_error("ucp_config_read: " + ucs_error(st));
  st = ucp_config_modify(config, "TLS", options.transports.c_str());
  if (st == UCS_OK && !options.net_devices.empty()) {
    st = ucp_config_modify(config, "NET_DEVICES", options.net_devices.c_str());
  }
  if (st != UCS_OK) {
    ucp_config_release(config);
    return invalid_argument("UCX transports '" + options.transports + "' / devices '" +
                            options.net_devices + "': " + ucs_error(st));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA;
  st = ucp_init(&params, config, &impl->context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    return unavailable("UCX cannot open transports '" + options.transports + "' on devices '" +
                       options.net_devices + "': " + ucs_error(st));
  }
  ucp_worker_params_t wparams{};
  wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wparams.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  st = ucp_worker_create(impl->context, &wparams, &impl->worker);
  if (st != UCS_OK) {
    ucp_cleanup(impl->context);
    return unavailable("ucp_worker_create: " + ucs_error(st));
  }
  ucp_address_t* address = nullptr;
  size_t address_bytes = 0;
  st = ucp_worker_get_address(impl->worker, &address, &address_bytes);
  if (st != UCS_OK) {
    ucp_worker_destroy(impl->worker);
    ucp_cleanup(impl->context);
    return internal_error("ucp_worker_get_address: " + ucs_error(st));
  }
  const auto* a = reinterpret_cast<const uint8_t*>(address);
  impl->worker_address.assign(a, a + address_bytes);
  ucp_worker_release_address(impl->worker, address);

  std::unique_ptr<UcxTransport> transport(new UcxTransport(std::move(options), std::move(impl)));
  if (transport->options_.progress_thread) {
    Impl* raw = transport->impl_.get();
    raw->progress_thread = std::thread([raw] { raw->run_progress(); });
  }
  return std::unique_ptr<Transport>(std::move(transport));
}

UcxTransport::UcxTransport(TransferOptions options, std::unique_ptr<Impl> impl)
    : options_(std::move(options)), impl_(std::move(impl)) {}

UcxTransport::~UcxTransport() {
  impl_->stop = true;
  if (impl_->progress_thread.joinable()) impl_->progress_thread.join();
  std::unique_lock lock(impl_->mu);
  DSERVE_CHECK_MSG(impl_->live_regions == 0,
                   "a MemoryRegion outlives its transport (destroy regions first)");
  for (auto& [id, peer] : impl_->peers)
    impl_->close_peer(lock, *peer);
  impl_->peers.clear();
  ucp_worker_destroy(impl_->worker);
  impl_->orphans.clear();
  ucp_cleanup(impl_->context);
}

PeerAddress UcxTransport::local_address() const {
  return {options_.name, options_.epoch, impl_->worker_address};
}

bool UcxTransport::progress() {
  std::lock_guard lock(impl_->mu);
  return ucp_worker_progress(impl_->worker) != 0;
}

Result<PeerId> UcxTransport::connect(const PeerAddress& peer) {
  if (peer.worker.empty()) return invalid_argument("peer '" + peer.name + "' has no address");
  if (peer.epoch == 0) return invalid_argument("peer '" + peer.name + "' has epoch 0");
  impl_->waiters.fetch_add(1);
  std::unique_lock lock(impl_->mu);
  impl_->waiters.fetch_sub(1);
  for (auto it = impl_->peers.begin(); it != impl_->peers.end(); ++it) {
    Impl::Peer& known = *it->second;
    if (known.name != peer.name) continue;
    if (known.epoch == peer.epoch && !known.failed) return known.id;
    // The peer restarted (new epoch) or its endpoint failed: a new endpoint, a new id, and the
    // old id and every region of the old epoch become stale.
    impl_->close_peer(lock, known);
    impl_->peers.erase(it);
    break;
  }
  auto fresh = std::make_unique<Impl::Peer>();
  fresh->id = PeerId{impl_->next_peer_id++};
  fresh->name = peer.name;
  fresh->epoch = peer.epoch;
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(peer.worker.data());
  params.err_mode =
      options_.detect_peer_failure ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  params.err_handler.cb = &Impl::on_peer_error;
  params.err_handler.arg = fresh.get();
  ucs_status_t st = ucp_ep_create(impl_->worker, &params, &fresh->ep);
  if (st != UCS_OK) {
    return unavailable("cannot connect to peer '" + peer.name + "': " + ucs_error(st));
  }
  PeerId id = fresh->id;
  impl_->peers.emplace(id.value, std::move(fresh));
  return id;
}

void UcxTransport::disconnect(PeerId peer) {
  std::unique_lock lock(impl_->mu);
  auto it = impl_->peers.find(peer.value);
  if (it == impl_->peers.end()) return;
  impl_->close_peer(lock, *it->second);
  impl_->peers.erase(it);
}

Status UcxTransport::Impl::open_peer(PeerId id, const RemoteRegion& region, Peer*& peer,
                                     ucp_rkey_h& rkey, std::string& who) {
  auto it = peers.find(id.value);
  if (it == peers.end()) {
    return unavailable("unknown peer id " + std::to_string(id.value) +
                       " (disconnected, or replaced when the peer reconnected)");
  }
  peer = it->second.get();
  who = "peer '" + peer->name + "' (epoch " + std::to_string(peer->epoch) + ")";
  if (peer->failed) {
    return unavailable(who + " failed earlier (" + peer->failure + "); connect again");
  }
  if (region.owner_epoch != peer->epoch) {
    return invalid_argument("stale remote region: registered by epoch " +
                            std::to_string(region.owner_epoch) + ", but " + who +
                            " is now connected; refusing to use its rkey");
  }
  ucs_status_t st = rkey_for(*peer, region.rkey, rkey);
  if (st != UCS_OK) {
    return invalid_argument("cannot unpack the rkey of " + who + ": " + ucs_error(st));
  }
  return Status::ok();
}

Result<std::vector<SpanDigest>> UcxTransport::put(PeerId peer_id, const RemoteRegion& region,
                                                  std::span<const PutOp> ops) {
  // Everything that can be refused is refused before a byte moves.
  if (Status refused = check_put_ops(region, ops); !refused.is_ok()) return refused;

  // Over shared memory the put is a memcpy on this thread and costs about as much as hashing
  // the same bytes (bench/RESULTS.md, "Transfer"): helpers hash while this thread copies. A
  // small put, or checksum_threads = 0, hashes first, without the lock, so the progress thread
  // is not held back meanwhile. Declared before the lock: a failed put releases the lock first.
  SpanHasher hasher(ops, options_.digest_bytes);
  std::vector<SpanDigest> digests;
  const bool overlap = options_.checksum_threads > 0 && hasher.bytes() >= kMinOverlappedHashBytes;
  if (overlap) {
    hasher.start(options_.checksum_threads);
  } else {
    digests = hasher.finish();
  }

  impl_->waiters.fetch_add(1);
  std::unique_lock lock(impl_->mu);
  struct WaiterGuard {
    std::atomic<int>& w;
    ~WaiterGuard() { w.fetch_sub(1); }
  } guard{impl_->waiters};

  Impl::Peer* found = nullptr;
  ucp_rkey_h rkey = nullptr;
  std::string who;
  if (Status refused = impl_->open_peer(peer_id, region, found, rkey, who); !refused.is_ok()) {
    return refused;
  }
  Impl::Peer& peer = *found;

  auto batch = std::make_unique<Batch>();
  const ucp_request_param_t param = host_put_param(*batch);
  for (const PutOp& op : ops) {
    if (op.bytes == 0) continue;
    track(*batch, ucp_put_nbx(peer.ep, op.local, op.bytes, region.address + op.remote_offset, rkey,
                              &param));
    if (batch->first_error != UCS_OK) break;
  }
  // The flush completes once every put before it is complete at the target.
  if (batch->first_error == UCS_OK) {
    ucp_request_param_t flush{};
    flush.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    flush.cb.send = &on_request_done;
    flush.user_data = batch.get();
    track(*batch, ucp_ep_flush_nbx(peer.ep, &flush));
  }
  bool in_time = impl_->wait(lock, *batch, Clock::now() + options_.timeout);
  Status result;
  if (!in_time) {
    result = unavailable("put of " + std::to_string(ops.size()) + " spans to " + who +
                         " did not complete within " + std::to_string(options_.timeout.count()) +
                         " ms (peer stalled or unreachable); endpoint closed");
    impl_->fail_peer(lock, peer, "timed out", *batch);
  } else if (batch->first_error != UCS_OK || peer.failed) {
    std::string why = batch->first_error != UCS_OK ? ucs_error(batch->first_error) : peer.failure;
    result = unavailable("put to " + who + " failed: " + why + " (peer gone?); endpoint closed");
    impl_->fail_peer(lock, peer, why, *batch);
  }
  // A batch still pending after the forced close stays with the transport (see Batch).
  if (batch->outstanding > 0) impl_->orphans.push_back(std::move(batch));
  lock.unlock();
  if (!result.is_ok()) return result;
  // The bytes have landed; what the helpers have not hashed yet, this thread hashes with them.
  if (overlap) digests = hasher.finish();
  return digests;
}

}  // namespace dserve::kvstore
