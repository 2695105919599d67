// TransferEngine's memory regions: registering caller memory, allocating through UCX, packing
// the remote keys peers write with, and watching what a pipelined put lands in them.

#include <cstring>
#include <string>
#include <utility>

#include "ucx_transport.h"

namespace dserve::kvstore {

using transfer_detail::ucs_error;

// ---- MemoryRegion ----

MemoryRegion::~MemoryRegion() {
  reset();
}

MemoryRegion::MemoryRegion(MemoryRegion&& other) noexcept
    : engine_(other.engine_), base_(other.base_), bytes_(other.bytes_), memh_(other.memh_) {
  other.engine_ = nullptr;
  other.memh_ = nullptr;
}

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& other) noexcept {
  if (this != &other) {
    reset();
    engine_ = other.engine_;
    base_ = other.base_;
    bytes_ = other.bytes_;
    memh_ = other.memh_;
    other.engine_ = nullptr;
    other.memh_ = nullptr;
  }
  return *this;
}

void MemoryRegion::reset() {
  if (engine_ != nullptr) engine_->deregister(memh_);
  engine_ = nullptr;
  memh_ = nullptr;
}

Result<MemoryRegion> TransferEngine::register_memory(void* base, uint64_t bytes) {
  if (base == nullptr || bytes == 0) return invalid_argument("cannot register an empty region");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = base;
  params.length = bytes;
  ucp_mem_h memh = nullptr;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_map(impl_->context, &params, &memh);
  if (st != UCS_OK) {
    return unavailable("cannot register " + std::to_string(bytes) + " bytes: " + ucs_error(st));
  }
  ++impl_->live_regions;
  return MemoryRegion(this, static_cast<std::byte*>(base), bytes, memh);
}

Result<MemoryRegion> TransferEngine::allocate_memory(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("cannot allocate an empty region");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;
  params.length = bytes;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h memh = nullptr;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_map(impl_->context, &params, &memh);
  if (st != UCS_OK) {
    return unavailable("cannot allocate " + std::to_string(bytes) + " bytes: " + ucs_error(st));
  }
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  st = ucp_mem_query(memh, &attr);
  if (st != UCS_OK || attr.length < bytes) {
    ucp_mem_unmap(impl_->context, memh);
    return internal_error("ucp_mem_query: " + ucs_error(st));
  }
  // UCX may hand back recycled or hugepage memory: the contract is zero-filled.
  std::memset(attr.address, 0, bytes);
  ++impl_->live_regions;
  return MemoryRegion(this, static_cast<std::byte*>(attr.address), bytes, memh);
}

void TransferEngine::deregister(void* memh) {
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_unmap(impl_->context, static_cast<ucp_mem_h>(memh));
  DSERVE_CHECK_MSG(st == UCS_OK, "ucp_mem_unmap: " + ucs_error(st));
  --impl_->live_regions;
}

Result<RemoteRegion> TransferEngine::describe(const MemoryRegion& region) {
  DSERVE_CHECK_MSG(region.engine_ == this, "describe() of a region of another engine");
  void* packed = nullptr;
  size_t packed_bytes = 0;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st =
      ucp_rkey_pack(impl_->context, static_cast<ucp_mem_h>(region.memh_), &packed, &packed_bytes);
  if (st != UCS_OK) return internal_error("ucp_rkey_pack: " + ucs_error(st));
  RemoteRegion out;
  out.owner_epoch = options_.epoch;
  out.address = reinterpret_cast<uint64_t>(region.base_);
  out.bytes = region.bytes_;
  const auto* p = static_cast<const uint8_t*>(packed);
  out.rkey.assign(p, p + packed_bytes);
  ucp_rkey_buffer_release(packed);
  return out;
}

// ---- LandedWatcher ----

Status LandedWatcher::State::accept(LandedPiece piece) {
  std::lock_guard lock(mu);
  if (!error.is_ok()) return error;
  auto contradiction = [&](const std::string& why) {
    error = data_loss("hand-off " + std::to_string(handoff_id) + ": piece " +
                      std::to_string(piece.index) + " " + why);
    landed_cv.notify_all();
    return error;
  };
  if (piece.count == 0 || piece.index >= piece.count) {
    return contradiction("of " + std::to_string(piece.count) + " is out of range");
  }
  if (count == 0) {
    count = piece.count;
    pieces.resize(count);
    seen.assign(count, 0);
  } else if (piece.count != count) {
    return contradiction("claims " + std::to_string(piece.count) + " pieces, earlier ones " +
                         std::to_string(count));
  }
  if (seen[piece.index] != 0) return contradiction("was announced twice");
  seen[piece.index] = 1;
  pieces[piece.index] = std::move(piece.digests);
  unverified.push_back(piece.index);
  ++landed;
  landed_cv.notify_all();
  return Status::ok();
}

LandedWatcher::LandedWatcher() = default;

LandedWatcher::LandedWatcher(TransferEngine* engine, std::shared_ptr<State> state)
    : engine_(engine), state_(std::move(state)) {}

LandedWatcher::~LandedWatcher() {
  reset();
}

LandedWatcher::LandedWatcher(LandedWatcher&& other) noexcept
    : engine_(std::exchange(other.engine_, nullptr)), state_(std::move(other.state_)) {}

LandedWatcher& LandedWatcher::operator=(LandedWatcher&& other) noexcept {
  if (this != &other) {
    reset();
    engine_ = std::exchange(other.engine_, nullptr);
    state_ = std::move(other.state_);
  }
  return *this;
}

void LandedWatcher::reset() {
  if (engine_ != nullptr && state_ != nullptr) {
    std::lock_guard lock(engine_->impl_->watch_mu);
    engine_->impl_->watchers.erase(
        {reinterpret_cast<uint64_t>(state_->region.data()), state_->handoff_id});
  }
  engine_ = nullptr;
  state_.reset();
}

uint64_t LandedWatcher::handoff_id() const {
  return state_ == nullptr ? 0 : state_->handoff_id;
}

Result<LandedWatcher::Progress> LandedWatcher::poll(const VerifyOptions& verify) {
  DSERVE_CHECK_MSG(state_ != nullptr, "poll() on an empty LandedWatcher");
  State& s = *state_;
  for (;;) {
    uint32_t index = 0;
    const std::vector<SpanDigest>* digests = nullptr;
    {
      std::lock_guard lock(s.mu);
      if (!s.error.is_ok()) return s.error;
      if (s.unverified.empty()) return Progress{s.count, s.landed, s.verified, s.bytes_verified};
      index = s.unverified.front();
      s.unverified.pop_front();
      // Written once, before the index was queued, and never again: readable without the lock.
      digests = &s.pieces[index];
    }
    Status landed = verify_landed(s.region, *digests, verify);
    uint64_t bytes = 0;
    for (const SpanDigest& d : *digests)
      bytes += d.bytes;
    std::lock_guard lock(s.mu);
    if (!landed.is_ok()) {
      if (s.error.is_ok()) {
        s.error = data_loss("hand-off " + std::to_string(s.handoff_id) + ": piece " +
                            std::to_string(index) + " of " + std::to_string(s.count) + ": " +
                            std::string(landed.message()));
      }
      return s.error;
    }
    ++s.verified;
    s.bytes_verified += bytes;
  }
}

Result<std::vector<SpanDigest>> LandedWatcher::wait(std::chrono::milliseconds timeout,
                                                    const VerifyOptions& verify) {
  DSERVE_CHECK_MSG(state_ != nullptr, "wait() on an empty LandedWatcher");
  State& s = *state_;
  const auto deadline = transfer_detail::Clock::now() + timeout;
  const bool self_progress = !engine_->options().progress_thread;
  for (;;) {
    auto progress = poll(verify);
    if (!progress.is_ok()) return progress.status();
    std::unique_lock lock(s.mu);
    if (progress->done() && s.unverified.empty()) {
      std::vector<SpanDigest> all;
      for (const auto& piece : s.pieces)
        all.insert(all.end(), piece.begin(), piece.end());
      return all;
    }
    bool more = !s.unverified.empty() || !s.error.is_ok();
    if (!more && self_progress) {
      lock.unlock();
      (void)engine_->progress();
      lock.lock();
      more = !s.unverified.empty() || !s.error.is_ok();
    } else if (!more) {
      more = s.landed_cv.wait_until(lock, deadline,
                                    [&] { return !s.unverified.empty() || !s.error.is_ok(); });
    }
    if (!more && transfer_detail::Clock::now() >= deadline) {
      std::string when = " within " + std::to_string(timeout.count()) +
                         " ms (sender gone or stalled, or a notification lost)";
      if (s.count == 0) {
        return data_loss("hand-off " + std::to_string(s.handoff_id) + ": no piece landed" + when);
      }
      uint32_t first = 0;
      while (first < s.count && s.seen[first] != 0)
        ++first;
      return data_loss("hand-off " + std::to_string(s.handoff_id) + ": piece " +
                       std::to_string(first) + " of " + std::to_string(s.count) + " (and " +
                       std::to_string(s.count - s.landed - 1) + " more) did not land" + when);
    }
  }
}

Status LandedWatcher::deliver(const LandedPiece& piece) {
  DSERVE_CHECK_MSG(state_ != nullptr, "deliver() on an empty LandedWatcher");
  if (piece.handoff_id != state_->handoff_id ||
      piece.region_address != reinterpret_cast<uint64_t>(state_->region.data())) {
    return invalid_argument("a notification of hand-off " + std::to_string(piece.handoff_id) +
                            " into region " + std::to_string(piece.region_address) +
                            " delivered to the watcher of hand-off " +
                            std::to_string(state_->handoff_id));
  }
  return state_->accept(piece);
}

Result<LandedWatcher> TransferEngine::watch(const MemoryRegion& region, uint64_t handoff_id) {
  if (handoff_id == 0) return invalid_argument("a watched hand-off needs a non-zero id");
  if (region.engine_ != this) return invalid_argument("watch() of a region of another engine");
  auto state = std::make_shared<LandedWatcher::State>();
  state->handoff_id = handoff_id;
  state->region = {region.data(), region.bytes()};
  std::lock_guard lock(impl_->watch_mu);
  auto [it, fresh] =
      impl_->watchers.try_emplace({reinterpret_cast<uint64_t>(region.data()), handoff_id}, state);
  if (!fresh) {
    return invalid_argument("hand-off " + std::to_string(handoff_id) +
                            " is already watched on this region");
  }
  return LandedWatcher(this, std::move(state));
}

}  // namespace dserve::kvstore
