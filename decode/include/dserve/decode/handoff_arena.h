#pragma once
// HandoffArena: the memory a decode worker lends to prefill workers' puts.
//
// A put is one-sided: once a prefill worker holds a region's keys, nothing on the decode side
// can stop its bytes from arriving, however late (a prefill worker stopped for a minute resumes
// and puts). Over UCX's TCP and shared-memory transports the receiving worker copies them to the
// address the sender names, without asking whether that memory is still registered; memory
// freed in between is a crash (SIGSEGV in the put handler) or, once reused, a corruption. So:
//
// - The arena is one mapping of the worker's whole hand-off budget, made at start and unmapped
//   only when the worker goes: a late put always lands in mapped memory. Pages are faulted on
//   first write and given back (MADV_DONTNEED) when a lease ends, so resident memory follows the
//   live leases as it did with a mapping per region.
// - Each lease registers its own range with the transport and deregisters it when it
//   ends. On RDMA that revokes the remote key: the NIC refuses a late put. On TCP and shared
//   memory nothing can refuse it, so:
// - A lease abandoned before its hand-off (expired, cancelled) keeps its range out of use until
//   `reuse_after` (the region grace, longer than any put's transfer timeout); only then can the
//   range go to another lease. A put later still than that lands in a range that is free or
//   belongs to another hand-off; the reader never uses bytes it has not verified in its own
//   copy (decode_worker.cc: take_handoff copies, then verifies), so late bytes can only make a
//   hand-off fail its digests and be replayed, never change a live request.
//
// Not thread-safe: the decode worker's actor owns it. Leases must end (release, abandon, or
// their destruction, which deregisters them) before the arena is destroyed.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/transfer.h"

namespace dserve::decode {

class HandoffArena {
 public:
  using Clock = std::chrono::steady_clock;

  // A range of the arena registered for remote writes; ended by release() or abandon().
  struct Lease {
    uint64_t offset = 0;
    uint64_t bytes = 0;  // rounded up to whole pages
    kvstore::MemoryRegion region;
  };

  // Maps `bytes` (rounded up to whole pages) of address space. kResourceExhausted when the
  // mapping fails.
  static Result<std::unique_ptr<HandoffArena>> create(kvstore::Transport& transport,
                                                      uint64_t bytes);
  ~HandoffArena();
  HandoffArena(const HandoffArena&) = delete;
  HandoffArena& operator=(const HandoffArena&) = delete;

  // What a lease of `bytes` takes of the arena: `bytes` rounded up to whole pages.
  static uint64_t lease_bytes(uint64_t bytes);
  // The lowest free range of at least `bytes` (first fit), registered. kResourceExhausted when
  // no free range is large enough (the arena's free bytes may still add up to more: fragments);
  // kUnavailable when registration fails.
  Result<Lease> lease(uint64_t bytes);
  // The put into the lease is known finished (its hand-off arrived): the range is free now.
  void release(Lease lease);
  // The lease ends before its hand-off: deregistered now, its range unused until `reuse_after`.
  void abandon(Lease lease, Clock::time_point reuse_after);
  // Frees the abandoned ranges whose time has come; returns their bytes.
  uint64_t reclaim(Clock::time_point now);

  uint64_t capacity() const { return bytes_; }
  uint64_t leased_bytes() const { return leased_; }
  uint64_t fenced_bytes() const { return fenced_; }  // abandoned, not yet reclaimed
  size_t fenced_ranges() const { return fence_.size(); }
  // Where the arena's memory lies in this process (tests check late puts land inside it).
  const std::byte* base() const { return base_; }

 private:
  HandoffArena(kvstore::Transport& transport, std::byte* base, uint64_t bytes);
  void free_range(uint64_t offset, uint64_t bytes);

  kvstore::Transport& transport_;
  std::byte* base_ = nullptr;
  uint64_t bytes_ = 0;
  uint64_t leased_ = 0;
  uint64_t fenced_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> bytes, coalesced
  struct Fenced {
    Clock::time_point reuse_after;
    uint64_t offset;
    uint64_t bytes;
  };
  std::vector<Fenced> fence_;
};

}  // namespace dserve::decode
