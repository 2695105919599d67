#include "dserve/kvstore/in_process_transport.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <utility>

namespace dserve::kvstore {

struct InProcessTransport::Endpoint {
  uint64_t id = 0;
  std::string name;
  uint64_t epoch = 0;

  std::mutex mu;  // guards everything below; held while a put copies into a region
  struct Region {
    uint64_t key = 0;  // the rkey a peer names it by
    std::byte* base = nullptr;
    uint64_t bytes = 0;
    std::unique_ptr<std::byte[]> owned;  // allocate_memory()
  };
  // By key. A MemoryRegion's handle points at its entry (the nodes of an unordered_map do not
  // move on rehash).
  std::unordered_map<uint64_t, Region> regions;
  uint64_t next_key = 1;
  uint64_t puts = 0;
};

namespace {

// An address is this tag and the endpoint's id, so that another transport's address is never
// taken for one of ours.
constexpr uint32_t kAddressTag = 0x52504e49;  // "INPR"
constexpr size_t kAddressBytes = 12;
constexpr size_t kKeyBytes = 8;

struct Registry {
  std::mutex mu;
  std::unordered_map<uint64_t, std::weak_ptr<InProcessTransport::Endpoint>> endpoints;
  uint64_t next_id = 1;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: transports may outlive statics
  return *r;
}

void put_le(std::vector<uint8_t>& out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i)
    out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t get_le(std::span<const uint8_t> in, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i)
    v |= static_cast<uint64_t>(in[i]) << (8 * i);
  return v;
}

// Distinct for every transport of the process, random across processes, never 0.
uint64_t fresh_epoch() {
  static std::atomic<uint64_t> next{[] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }()};
  uint64_t e = next.fetch_add(0x9e3779b97f4a7c15ULL);
  return e == 0 ? next.fetch_add(0x9e3779b97f4a7c15ULL) | 1 : e;
}

}  // namespace

InProcessTransport::InProcessTransport(InProcessTransportOptions options)
    : options_(std::move(options)), self_(std::make_shared<Endpoint>()) {
  if (options_.epoch == 0) options_.epoch = fresh_epoch();
  self_->name = options_.name;
  self_->epoch = options_.epoch;
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  self_->id = r.next_id++;
  r.endpoints.emplace(self_->id, self_);
}

InProcessTransport::~InProcessTransport() {
  {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    r.endpoints.erase(self_->id);
  }
  std::lock_guard lock(self_->mu);
  DSERVE_CHECK_MSG(self_->regions.empty(),
                   "a MemoryRegion outlives its transport (destroy regions first)");
}

PeerAddress InProcessTransport::local_address() const {
  PeerAddress address{options_.name, options_.epoch, {}};
  put_le(address.worker, kAddressTag, 4);
  put_le(address.worker, self_->id, 8);
  return address;
}

Result<MemoryRegion> InProcessTransport::register_memory(void* base, uint64_t bytes) {
  if (base == nullptr || bytes == 0) return invalid_argument("cannot register an empty region");
  std::lock_guard lock(self_->mu);
  const uint64_t key = self_->next_key++;
  auto it = self_->regions
                .emplace(key, Endpoint::Region{key, static_cast<std::byte*>(base), bytes, nullptr})
                .first;
  return make_region(static_cast<std::byte*>(base), bytes, &it->second);
}

Result<MemoryRegion> InProcessTransport::allocate_memory(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("cannot allocate an empty region");
  auto owned = std::make_unique<std::byte[]>(bytes);  // zero-filled
  std::byte* base = owned.get();
  std::lock_guard lock(self_->mu);
  const uint64_t key = self_->next_key++;
  auto it = self_->regions.emplace(key, Endpoint::Region{key, base, bytes, std::move(owned)}).first;
  return make_region(base, bytes, &it->second);
}

void InProcessTransport::release_region(std::byte* /*base*/, uint64_t /*bytes*/, void* handle) {
  std::lock_guard lock(self_->mu);
  // Found by address, not read through the handle: a handle released twice points nowhere.
  auto it = std::find_if(self_->regions.begin(), self_->regions.end(),
                         [&](const auto& entry) { return &entry.second == handle; });
  DSERVE_CHECK_MSG(it != self_->regions.end(), "a region released twice, or of another transport");
  self_->regions.erase(it);
}

Result<RemoteRegion> InProcessTransport::describe(const MemoryRegion& region) {
  DSERVE_CHECK_MSG(region.transport() == this, "describe() of a region of another transport");
  RemoteRegion out;
  out.owner_epoch = options_.epoch;
  out.address = reinterpret_cast<uint64_t>(region.data());
  out.bytes = region.bytes();
  {
    std::lock_guard lock(self_->mu);
    put_le(out.rkey, static_cast<const Endpoint::Region*>(region.handle())->key, kKeyBytes);
  }
  return out;
}

Result<PeerId> InProcessTransport::connect(const PeerAddress& peer) {
  if (peer.worker.size() != kAddressBytes || get_le(peer.worker, 4) != kAddressTag) {
    return invalid_argument("peer '" + peer.name + "' has no in-process address");
  }
  if (peer.epoch == 0) return invalid_argument("peer '" + peer.name + "' has epoch 0");
  std::shared_ptr<Endpoint> endpoint;
  {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    auto it = r.endpoints.find(get_le(std::span(peer.worker).subspan(4), 8));
    if (it != r.endpoints.end()) endpoint = it->second.lock();
  }
  if (endpoint == nullptr || endpoint->epoch != peer.epoch) {
    return unavailable("cannot connect to peer '" + peer.name + "' (epoch " +
                       std::to_string(peer.epoch) + "): no such transport in this process");
  }
  std::lock_guard lock(mu_);
  for (auto it = peers_.begin(); it != peers_.end(); ++it) {
    if (it->second.name != peer.name) continue;
    if (it->second.epoch == peer.epoch && !it->second.endpoint.expired()) return it->second.id;
    // The peer restarted (new epoch): a new id; the old id and its regions become stale.
    peers_.erase(it);
    break;
  }
  const PeerId id{next_peer_id_++};
  peers_.emplace(id.value, Peer{id, peer.name, peer.epoch, endpoint});
  return id;
}

void InProcessTransport::disconnect(PeerId peer) {
  std::lock_guard lock(mu_);
  peers_.erase(peer.value);
}

Result<std::vector<SpanDigest>> InProcessTransport::put(PeerId peer_id, const RemoteRegion& region,
                                                        std::span<const PutOp> ops) {
  if (Status refused = check_put_ops(region, ops); !refused.is_ok()) return refused;
  std::shared_ptr<Endpoint> target;
  std::string who;
  {
    std::lock_guard lock(mu_);
    auto it = peers_.find(peer_id.value);
    if (it == peers_.end()) {
      return unavailable("unknown peer id " + std::to_string(peer_id.value) +
                         " (disconnected, or replaced when the peer reconnected)");
    }
    const Peer& peer = it->second;
    who = "peer '" + peer.name + "' (epoch " + std::to_string(peer.epoch) + ")";
    if (region.owner_epoch != peer.epoch) {
      return invalid_argument("stale remote region: registered by epoch " +
                              std::to_string(region.owner_epoch) + ", but " + who +
                              " is now connected; refusing to use its rkey");
    }
    target = peer.endpoint.lock();
  }
  if (target == nullptr) return unavailable("put to " + who + " failed: the peer is gone");
  if (region.rkey.size() != kKeyBytes) {
    return invalid_argument("the rkey of a region of " + who + " is not an in-process key");
  }
  const uint64_t key = get_le(region.rkey, kKeyBytes);
  {
    std::lock_guard lock(target->mu);
    auto it = target->regions.find(key);
    if (it == target->regions.end() ||
        reinterpret_cast<uint64_t>(it->second.base) != region.address ||
        it->second.bytes != region.bytes) {
      return invalid_argument("unknown remote region at " + std::to_string(region.address) +
                              " of " + who + " (deregistered, or never registered there)");
    }
    for (const PutOp& op : ops) {
      if (op.bytes > 0) std::memcpy(it->second.base + op.remote_offset, op.local, op.bytes);
    }
    ++target->puts;
  }
  return span_digests(ops, options_.digest_bytes);
}

size_t InProcessTransport::registered_regions() const {
  std::lock_guard lock(self_->mu);
  return self_->regions.size();
}

uint64_t InProcessTransport::puts_received() const {
  std::lock_guard lock(self_->mu);
  return self_->puts;
}

}  // namespace dserve::kvstore
