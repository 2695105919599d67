#pragma once
// Placement: the gateway's policy for where a request runs, and its count of what each worker
// holds. A plain class (no threads, no actors, no clock): the gateway calls it under its own
// lock and tells it what it learns (a worker became reachable, drains, reported free KV bytes,
// restarted); tests drive it directly.
//
// The choices:
// - prefill: among available prefill workers whose queue has room (at most
//   max_prefill_queue_tokens placed there and not yet prefilled; an idle worker takes a prompt
//   of any length), the one most likely to hold the longest prefix of the prompt (its
//   PrefixAffinity), then the one with the fewest queued tokens, then the lowest index;
// - decode: every available decode worker, fewest requests placed first, then most free KV
//   bytes (the last health report), then the lowest index; the gateway asks them in that order
//   for a reservation and takes the first grant.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <vector>

#include "dserve/actors/messages.h"
#include "dserve/actors/prefix_affinity.h"
#include "dserve/core/status.h"

namespace dserve::actors {

struct PlacementOptions {
  // Prompt tokens placed on one prefill worker and not yet prefilled.
  uint64_t max_prefill_queue_tokens = 8192;
  // Blocks remembered per prefill worker by its PrefixAffinity.
  size_t affinity_blocks = 1 << 20;
};

// What Placement counts for one worker.
struct WorkerLoad {
  Role role = Role::kPrefill;
  bool available = false;      // reachable and healthy, not draining, not removed
  uint32_t placed = 0;         // requests placed there and not yet ended (prefill: not done)
  uint64_t placed_total = 0;   // requests ever placed there
  uint64_t queued_tokens = 0;  // prefill: prompt tokens placed there and not yet prefilled
  uint64_t free_kv_bytes = 0;  // decode: from its last health report
};

class Placement {
 public:
  explicit Placement(PlacementOptions options);

  // A new worker, not available until set_available; returns its index (indices never change).
  size_t add_worker(Role role);
  const WorkerLoad& load(size_t worker) const;

  void set_available(size_t worker, bool available);
  void set_free_kv_bytes(size_t worker, uint64_t bytes);
  // The worker restarted: whatever it cached is gone.
  void forget_prefixes(size_t worker);

  // Chooses a prefill worker for a prompt of `tokens` tokens whose block chain is `chain` and
  // counts it there (placed, queued tokens). kUnavailable when no prefill worker is available,
  // kResourceExhausted when every available one's queue is full.
  Result<size_t> claim_prefill(std::span<const uint64_t> chain, uint64_t tokens);
  // The prefill placed by claim_prefill with `tokens` tokens ended (done, failed, abandoned).
  void end_prefill(size_t worker, uint64_t tokens);
  // The worker prefilled `chain`: it probably holds those blocks now.
  void record_prefix(size_t worker, std::span<const uint64_t> chain);
  // Blocks of `chain` the worker probably holds (leading blocks).
  size_t matched_blocks(size_t worker, std::span<const uint64_t> chain) const;

  // The available decode workers in the order to ask them for a reservation.
  std::vector<size_t> decode_order() const;
  // A decode worker granted a reservation; its request ended.
  void start_decode(size_t worker);
  void end_decode(size_t worker);

 private:
  struct Entry {
    WorkerLoad load;
    std::unique_ptr<PrefixAffinity> affinity;  // prefill workers only
  };
  Entry& entry(size_t worker);
  const Entry& entry(size_t worker) const;

  PlacementOptions options_;
  std::deque<Entry> workers_;
};

}  // namespace dserve::actors
