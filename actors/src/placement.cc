#include "dserve/actors/placement.h"

#include <algorithm>
#include <numeric>
#include <optional>
#include <string>

#include "dserve/core/check.h"

namespace dserve::actors {

Placement::Placement(PlacementOptions options) : options_(options) {}

Placement::Entry& Placement::entry(size_t worker) {
  DSERVE_CHECK_MSG(worker < workers_.size(), "placement: no worker " + std::to_string(worker));
  return workers_[worker];
}

const Placement::Entry& Placement::entry(size_t worker) const {
  DSERVE_CHECK_MSG(worker < workers_.size(), "placement: no worker " + std::to_string(worker));
  return workers_[worker];
}

size_t Placement::add_worker(Role role) {
  DSERVE_CHECK_MSG(role == Role::kPrefill || role == Role::kDecode,
                   "placement: only prefill and decode workers are placed on");
  Entry e;
  e.load.role = role;
  if (role == Role::kPrefill)
    e.affinity = std::make_unique<PrefixAffinity>(options_.affinity_blocks);
  workers_.push_back(std::move(e));
  return workers_.size() - 1;
}

const WorkerLoad& Placement::load(size_t worker) const {
  return entry(worker).load;
}

void Placement::set_available(size_t worker, bool available) {
  entry(worker).load.available = available;
}

void Placement::set_free_kv_bytes(size_t worker, uint64_t bytes) {
  entry(worker).load.free_kv_bytes = bytes;
}

void Placement::forget_prefixes(size_t worker) {
  if (auto& affinity = entry(worker).affinity) affinity->clear();
}

Result<size_t> Placement::claim_prefill(std::span<const uint64_t> chain, uint64_t tokens) {
  std::optional<size_t> best;
  size_t best_match = 0;
  bool any_available = false;
  for (size_t i = 0; i < workers_.size(); ++i) {
    const WorkerLoad& w = workers_[i].load;
    if (w.role != Role::kPrefill || !w.available) continue;
    any_available = true;
    if (w.queued_tokens > 0 && w.queued_tokens + tokens > options_.max_prefill_queue_tokens) {
      continue;
    }
    const size_t match = workers_[i].affinity->matched_blocks(chain);
    if (!best || match > best_match ||
        (match == best_match && w.queued_tokens < workers_[*best].load.queued_tokens)) {
      best = i;
      best_match = match;
    }
  }
  if (!any_available) return unavailable("no healthy prefill worker");
  if (!best) {
    return resource_exhausted("every prefill worker's queue is full (" +
                              std::to_string(options_.max_prefill_queue_tokens) + " tokens)");
  }
  WorkerLoad& w = workers_[*best].load;
  ++w.placed;
  ++w.placed_total;
  w.queued_tokens += tokens;
  return *best;
}

void Placement::end_prefill(size_t worker, uint64_t tokens) {
  WorkerLoad& w = entry(worker).load;
  DSERVE_CHECK_MSG(
      w.role == Role::kPrefill && w.placed > 0,
      "placement: a prefill ended on worker " + std::to_string(worker) + " that had none placed");
  --w.placed;
  w.queued_tokens -= std::min(w.queued_tokens, tokens);
}

void Placement::record_prefix(size_t worker, std::span<const uint64_t> chain) {
  if (auto& affinity = entry(worker).affinity) affinity->insert(chain);
}

size_t Placement::matched_blocks(size_t worker, std::span<const uint64_t> chain) const {
  const auto& affinity = entry(worker).affinity;
  return affinity ? affinity->matched_blocks(chain) : 0;
}

std::vector<size_t> Placement::decode_order() const {
  std::vector<size_t> order;
  for (size_t i = 0; i < workers_.size(); ++i) {
    const WorkerLoad& w = workers_[i].load;
    if (w.role == Role::kDecode && w.available) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const WorkerLoad& wa = workers_[a].load;
    const WorkerLoad& wb = workers_[b].load;
    if (wa.placed != wb.placed) return wa.placed < wb.placed;
    return wa.free_kv_bytes > wb.free_kv_bytes;
  });
  return order;
}

void Placement::start_decode(size_t worker) {
  WorkerLoad& w = entry(worker).load;
  DSERVE_CHECK_MSG(w.role == Role::kDecode, "placement: a decode started on a prefill worker");
  ++w.placed;
  ++w.placed_total;
}

void Placement::end_decode(size_t worker) {
  WorkerLoad& w = entry(worker).load;
  DSERVE_CHECK_MSG(
      w.role == Role::kDecode && w.placed > 0,
      "placement: a decode ended on worker " + std::to_string(worker) + " that had none placed");
  --w.placed;
}

}  // namespace dserve::actors
