#include "dserve/decode/handoff_arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

namespace dserve::decode {
namespace {

uint64_t page_bytes() {
  static const uint64_t bytes = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return bytes;
}

uint64_t round_to_pages(uint64_t bytes) {
  const uint64_t page = page_bytes();
  return (bytes + page - 1) / page * page;
}

}  // namespace

Result<std::unique_ptr<HandoffArena>> HandoffArena::create(kvstore::Transport& transport,
                                                           uint64_t bytes) {
  if (bytes == 0) return invalid_argument("a hand-off arena needs at least one byte");
  const uint64_t rounded = round_to_pages(bytes);
  void* base = mmap(nullptr, rounded, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    return resource_exhausted("cannot map a hand-off arena of " + std::to_string(rounded) +
                              " bytes: " + std::strerror(errno));
  }
  return std::unique_ptr<HandoffArena>(
      new HandoffArena(transport, static_cast<std::byte*>(base), rounded));
}

HandoffArena::HandoffArena(kvstore::Transport& transport, std::byte* base, uint64_t bytes)
    : transport_(transport), base_(base), bytes_(bytes) {
  free_.emplace(0, bytes);
}

HandoffArena::~HandoffArena() {
  // Leases still held when the worker stops deregister themselves as they are destroyed (before
  // this: the worker's state declares the arena first); the mapping goes last.
  munmap(base_, bytes_);
}

uint64_t HandoffArena::lease_bytes(uint64_t bytes) {
  return round_to_pages(bytes);
}

Result<HandoffArena::Lease> HandoffArena::lease(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("an empty hand-off lease");
  const uint64_t want = lease_bytes(bytes);
  auto it = std::find_if(free_.begin(), free_.end(),
                         [want](const auto& range) { return range.second >= want; });
  if (it == free_.end()) {
    return resource_exhausted("no free range of " + std::to_string(want) +
                              " bytes in the hand-off arena (" + std::to_string(leased_) +
                              " leased, " + std::to_string(fenced_) + " fenced, of " +
                              std::to_string(bytes_) + ")");
  }
  const uint64_t offset = it->first;
  const uint64_t left = it->second - want;
  free_.erase(it);
  if (left > 0) free_.emplace(offset + want, left);
  auto region = transport_.register_memory(base_ + offset, want);
  if (!region.is_ok()) {
    free_range(offset, want);
    return region.status();
  }
  leased_ += want;
  return Lease{offset, want, std::move(region).value()};
}

void HandoffArena::release(Lease lease) {
  DSERVE_CHECK_MSG(lease.region.valid() && lease.bytes <= leased_,
                   "release() of a lease this arena does not hold");
  lease.region = {};  // deregisters
  leased_ -= lease.bytes;
  // Written pages go back to the system; the next lease of the range starts from zero pages.
  madvise(base_ + lease.offset, lease.bytes, MADV_DONTNEED);
  free_range(lease.offset, lease.bytes);
}

void HandoffArena::abandon(Lease lease, Clock::time_point reuse_after) {
  DSERVE_CHECK_MSG(lease.region.valid() && lease.bytes <= leased_,
                   "abandon() of a lease this arena does not hold");
  lease.region = {};  // deregisters: on RDMA the remote key is void from here on
  leased_ -= lease.bytes;
  fenced_ += lease.bytes;
  fence_.push_back({reuse_after, lease.offset, lease.bytes});
}

uint64_t HandoffArena::reclaim(Clock::time_point now) {
  uint64_t freed = 0;
  std::erase_if(fence_, [&](const Fenced& f) {
    if (f.reuse_after > now) return false;
    madvise(base_ + f.offset, f.bytes, MADV_DONTNEED);
    free_range(f.offset, f.bytes);
    fenced_ -= f.bytes;
    freed += f.bytes;
    return true;
  });
  return freed;
}

void HandoffArena::free_range(uint64_t offset, uint64_t bytes) {
  auto [it, fresh] = free_.emplace(offset, bytes);
  DSERVE_CHECK_MSG(fresh, "range at " + std::to_string(offset) + " freed twice");
  if (auto next = std::next(it); next != free_.end() && it->first + it->second == next->first) {
    it->second += next->second;
    free_.erase(next);
  }
  if (it != free_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == it->first) {
      prev->second += it->second;
      free_.erase(it);
    }
  }
}

}  // namespace dserve::decode
