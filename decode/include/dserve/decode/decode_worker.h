#pragma once
// DecodeWorker: the decode role as an actor implementing actors::DecodeActor.
//
// The hand-off, as this worker runs it:
//   ReserveRequest -> refused with a reason when the batch (reservations + decoding requests)
//     or the KV byte budget is full; else a transfer region of hand-off size is leased from the
//     worker's HandoffArena (registered with the transport) and its keys (transport address +
//     region, encoded with kvstore/handoff_keys.h) go back in ReserveReply::transfer_keys.
//   HandoffDone -> the region is copied, the copy checked against the span digests
//     (verify_landed), the state unpacked from it (unpack_state) and the request joins the
//     DecodeBatch; the lease is released.
//   A self-sent step message drives DecodeBatch::step() while the batch is not empty; every
//     step's tokens go to the request's sink as TokenChunk messages, the last one finished.
//   CancelRequest -> drops a reservation or ends a decoding request.
//   RenewReservation -> the reservation's expiry moves to reservation_timeout from now (the
//     gateway renews while the prefill runs).
//   A reservation that gets no HandoffDone within min(reservation_timeout since its grant or
//   last renewal, its deadline) expires.
//   Either way a dropped reservation's range stays fenced for region_grace (handoff_arena.h);
//   a HandoffDone for it meanwhile is refused saying whether it expired or was cancelled.
//   Expiry and the grace are measured on the actor system's clock (caf::actor_clock), the one
//   its delayed messages follow: under CAF's test coordinator the test moves it
//   (tests/decode/decode_protocol_test.cc).
//
// Region layout (what prefill writes): [packed state of prompt_tokens tokens, exactly
// model::packed_state_bytes bytes][logits of the prompt's last token, vocab floats]. The logits
// travel so that the decode side samples the first token itself, with the request's sampler,
// exactly as `dserve generate` does (see decode/README.md).
//
// Logs (DecodeWorkerOptions::log), with the request's trace id: reservation_granted /
// reservation_refused (reason), reservation_expired / reservation_cancelled, handoff_accepted /
// handoff_refused (reason), decode_finished (reason, tokens) / decode_cancelled (tokens).

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <caf/actor_system.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/engine.h"

namespace dserve::ops {
class Logger;
class MetricsRegistry;
}  // namespace dserve::ops

namespace dserve::decode {

struct DecodeWorkerOptions {
  int64_t max_batch = 64;                 // reservations + decoding requests at once
  int64_t sampleable_ids = 0;             // DecodeOptions::sampleable_ids (the tokenizer's size)
  uint64_t kv_budget_bytes = 1ull << 30;  // hand-off regions + states of decoding requests
  std::chrono::milliseconds reservation_timeout{30000};  // reserved, no HandoffDone yet
  // How long the range of an expired or cancelled reservation stays fenced (and counted) before
  // another reservation may use it: longer than a prefill worker's transfer timeout, so that a
  // put still in flight lands where no other hand-off reads. A later put is harmless too (the
  // arena stays mapped, and a hand-off reads only bytes it verified): see handoff_arena.h.
  std::chrono::milliseconds region_grace{30000};
  // Speculative decoding (DecodeOptions): draft tokens per request per step at most (0: off;
  // the engine must be made with EngineOptions::draft), and whether k adapts per step.
  int64_t speculative_tokens = 0;
  bool adaptive_speculation = true;
  // Where each request's life is logged; must outlive the worker. Null: no logging.
  ops::Logger* log = nullptr;
  // Where the worker's metrics go; must outlive the worker. Null: none. Registered:
  // dserve_decode_step_duration_seconds, _batch_size (histograms), _active_requests,
  // _reserved_requests, _kv_budget_in_use_bytes, _kv_budget_free_bytes (gauges),
  // _reservations_total{outcome}, _handoffs_total{outcome}, _handoffs_corrupt_total,
  // _tokens_total, _draft_tokens_total, _accepted_draft_tokens_total (counters),
  // _acceptance_length, _draft_tokens_per_step (gauges).
  ops::MetricsRegistry* metrics = nullptr;
};

// Bytes of the hand-off region for a prompt of `prompt_tokens` tokens (state + logits).
uint64_t handoff_region_bytes(const model::ModelConfig& config, int64_t prompt_tokens);

// Spawns the worker with a hand-off arena of kv_budget_bytes (handoff_arena.h). `compute` (the
// model on its device) and `transport` must outlive the actor (the process owns them); `epoch` is
// the process's (ActorRuntime::epoch()), checked on every HandoffDone. Fails when the arena cannot
// be mapped.
Result<actors::DecodeActor> spawn_decode_worker(caf::actor_system& system, model::Engine& compute,
                                                kvstore::Transport& transport, actors::Epoch epoch,
                                                std::string node_name, DecodeWorkerOptions options);

}  // namespace dserve::decode
