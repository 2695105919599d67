#pragma once
// PrefillWorker: the prefill role as an actor implementing actors::PrefillActor.
//
// On PrefillRequest the prompt joins a PrefillScheduler (chunked, FCFS within a token budget,
// through the PrefixCache); a self-sent step message runs one scheduler step at a time while
// work is queued. A request whose prefill is done is handed off:
//   pack_state -> the decode worker's region (kvstore/handoff_keys.h from the target's
//   transfer keys) gets [packed state][prompt logits] by Transport::put -> HandoffDone
//   with the span digests to the decode actor at the target's control address -> its
//   HandoffAck decides the PrefillReply.
// Every step is bounded by the request's deadline (30 s when it has none): a failure of any
// step (deadline, bad keys, transfer, decode unreachable or refusing) is a kFailed reply with
// the reason, never a hang.
// HealthReport: pages in use in the model's pools and the cache's snapshot pool, the bytes the
// prefix cache keeps (cached_kv_bytes), hand-offs the decode side refused, injected faults.
// Logs (PrefillWorkerOptions::log), with the request's trace id: prefill_done (prompt, cached
// and computed tokens, ms, transfer bytes and µs) or prefill_failed (reason).

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <caf/actor_system.hpp>

#include "dserve/actors/prefill_interface.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/prefix_cache.h"
#include "dserve/prefill/prefill_scheduler.h"

namespace dserve::ops {
class Logger;
class MetricsRegistry;
}  // namespace dserve::ops

namespace dserve::prefill {

struct PrefillWorkerOptions {
  PrefillOptions scheduler;
  // Bound on each step of a request that carries no deadline.
  std::chrono::milliseconds default_deadline{30000};
  // FAULT INJECTION, for tests only (`dserve serve --inject-corrupt-handoffs N`): the first N
  // hand-offs of this worker flip the first byte of the state in the decode worker's region
  // with a second 1-byte put after the digested put, as if it were corrupted in flight. The
  // HandoffDone still carries the digests of the correct bytes, so the decode worker must
  // refuse it and the gateway replay the request. 0 (the default): never.
  uint64_t inject_corrupt_handoffs = 0;
  // Where each request's end is logged; must outlive the worker. Null: no logging.
  ops::Logger* log = nullptr;
  // Where the worker's metrics go; must outlive the worker. Null: none. Registered:
  // dserve_prefill_step_duration_seconds, _step_tokens (histograms), _queued_requests,
  // _queued_tokens (gauges), _requests_total{outcome}, _kv_transfer_bytes_total,
  // _kv_transfer_seconds, _handoffs_rejected_total; and from the prefix store
  // dserve_kv_store_tier_bytes{tier}, _tier_blocks{tier} (gauges), _lookups_total, _hits_total,
  // _lookup_tokens_total, _hit_tokens_total, _tier_hit_tokens_total{tier},
  // _tier_hit_blocks_total{tier}, _tier_evictions_total{tier} (refreshed after every step and
  // health probe).
  ops::MetricsRegistry* metrics = nullptr;
};

// Spawns the worker. `cache` (and its compute engine) and `transport` must outlive the actor (the
// process owns them); `epoch` is the process's (ActorRuntime::epoch()).
actors::PrefillActor spawn_prefill_worker(caf::actor_system& system, model::PrefixCache& cache,
                                          kvstore::Transport& transport, actors::Epoch epoch,
                                          std::string node_name, PrefillWorkerOptions options);

}  // namespace dserve::prefill
