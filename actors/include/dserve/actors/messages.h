#pragma once
// The control-message vocabulary between dserve roles (gateway, prefill worker, decode worker).
//
// Every type here travels as a CAF 0.17 message, remote across nodes through the middleman, so
// each has an inspect() overload (the wire format) and is registered at run time by
// register_message_types() under a stable "dserve.<Name>" name; both ends of a connection must
// register the same set (ActorRuntime does it for every process). An unregistered type is not
// a compile error in CAF 0.17: it fails at run time as an unexpected message.
//
// KV bytes never travel in these messages: only ids, token ids and small opaque blobs (the
// transfer keys a decode worker hands out, at most kMaxTransferKeysBytes). The KV state itself
// moves over UCX (kvstore/).
//
// Times that cross processes are absolute wall-clock instants in milliseconds since the Unix
// epoch (steady clocks are not comparable between processes or hosts).

#include <cstdint>
#include <string>
#include <vector>

#include <caf/meta/type_name.hpp>
#include <caf/typed_actor.hpp>

#include "dserve/core/status.h"

namespace caf {
class actor_system_config;
}  // namespace caf

namespace dserve::actors {

using RequestId = uint64_t;      // assigned by the gateway, unique per gateway incarnation
using ReservationId = uint64_t;  // assigned by a decode worker, unique per its epoch
using Epoch = uint64_t;          // random, non-zero; a new value every time a process starts
using TokenId = int32_t;         // same id space as the tokenizer's

// Upper bound for the opaque transfer-key blob a decode worker returns (UCX worker address plus
// rkeys of the reserved pages are a few KiB). Anything larger is a bug, not KV data.
inline constexpr size_t kMaxTransferKeysBytes = size_t{64} * 1024;

// Upper bound for a trace id (the client's request id, carried for logs only).
inline constexpr size_t kMaxTraceIdBytes = 128;

enum class Role : uint8_t { kGateway = 0, kPrefill = 1, kDecode = 2, kNodeAgent = 3 };
const char* role_name(Role role);

// ---- decode -> gateway: the token stream -------------------------------------------------

// Sent by a decode worker to the gateway's stream sink (ReserveRequest::stream_to), one-way,
// as tokens are made. Chunks of one request arrive in order; `first_index` is the position of
// tokens[0] in the request's output so the gateway can drop duplicates and detect gaps after a
// replay elsewhere. The last chunk has `finished` set; a non-empty `error` means the request
// failed on this worker (then `finished` is set too and `tokens` may be empty).
struct TokenChunk {
  RequestId request_id = 0;
  Epoch decode_epoch = 0;  // the sender's epoch: chunks from an older incarnation are stale
  uint32_t first_index = 0;
  std::vector<TokenId> tokens;
  bool finished = false;
  std::string error;
};

// The receiving end of token streams (the gateway, or anything that collects tokens).
using TokenSinkActor = caf::typed_actor<caf::reacts_to<TokenChunk>>;

// ---- gateway -> decode: reserve capacity first --------------------------------------------

// Sent by the gateway to a decode worker before any prefill starts: "hold KV pages for request
// R with `prompt_tokens` prompt tokens and up to `max_new_tokens` outputs, and stream its
// tokens to `stream_to`". Answered with ReserveReply. A granted reservation is released by
// CancelRequest, by its lease (the decode worker's reservation timeout, moved on by each
// RenewReservation, never past the deadline) running out without a HandoffDone, or when the
// request finishes.
struct ReserveRequest {
  RequestId request_id = 0;
  uint32_t prompt_tokens = 0;
  uint32_t max_new_tokens = 0;
  int64_t deadline_unix_ms = 0;
  TokenSinkActor stream_to;
  // How the decode worker samples this request (model::SamplingParams): temperature 0 is
  // greedy; top_k 0 and top_p 1 keep every token; the seed makes a sampled stream repeatable.
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  // Penalties and logit bias (model::SamplingParams), the bias as two parallel lists; and the
  // tokens generated before this placement, which the penalties count (empty without one).
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<int32_t> logit_bias_ids{};
  std::vector<float> logit_bias_values{};
  std::vector<int32_t> generated{};
  // The client's request id (GenerateJob::request_id), the same on every attempt, for the
  // worker's logs only: nothing is keyed by it. At most kMaxTraceIdBytes; may be empty.
  std::string trace_id{};
};

enum class ReserveOutcome : uint8_t { kGranted = 0, kRefused = 1 };

// Decode worker -> gateway, the answer to ReserveRequest. Granted: `reservation_id` and the
// opaque `transfer_keys` the prefill worker needs to write the KV state into the reserved pages
// (valid only for `decode_epoch`). Refused: `reason` says why (no free pages, draining, prompt
// too long), nothing is held.
struct ReserveReply {
  RequestId request_id = 0;
  ReserveOutcome outcome = ReserveOutcome::kRefused;
  ReservationId reservation_id = 0;
  Epoch decode_epoch = 0;
  std::vector<uint8_t> transfer_keys;
  std::string reason;
  // Refused only: true when asking again later may succeed (batch or KV budget full now,
  // draining); false when this request can never be granted here (bad parameters, larger
  // than the worker's whole KV budget).
  bool retryable = true;
};

// ---- gateway -> prefill: compute the prompt, hand it to decode ----------------------------

// Where the prefill worker sends the request's state: the decode worker's control address
// (where it published its actor), the epoch and reservation the gateway got from it, and the
// transfer keys from ReserveReply, passed through untouched.
struct DecodeTarget {
  std::string host;
  uint16_t port = 0;
  Epoch epoch = 0;
  ReservationId reservation_id = 0;
  std::vector<uint8_t> transfer_keys;
};

// Sent by the gateway to a prefill worker: "prefill request R (these prompt tokens) before
// the deadline and hand the state to `target`". Answered with PrefillReply once the hand-off
// is acknowledged by the decode worker, or failed.
struct PrefillRequest {
  RequestId request_id = 0;
  std::vector<TokenId> prompt;
  int64_t deadline_unix_ms = 0;
  DecodeTarget target;
  // As ReserveRequest::trace_id: the client's request id, for logs only.
  std::string trace_id{};
};

enum class PrefillOutcome : uint8_t { kDone = 0, kFailed = 1 };

// Prefill worker -> gateway, the answer to PrefillRequest. Done: the decode worker accepted the
// state; `cached_prefix_tokens` came from the prefix cache, `computed_tokens` were computed.
// Failed: `reason` says which step failed (deadline, transfer, decode refused the hand-off).
struct PrefillReply {
  RequestId request_id = 0;
  PrefillOutcome outcome = PrefillOutcome::kFailed;
  uint32_t cached_prefix_tokens = 0;
  uint32_t computed_tokens = 0;
  std::string reason;
  // Done only, per request: ms from acceptance to the state being ready (queue + compute), the
  // bytes written into the decode worker's region, the µs that write took (pack, connect, puts,
  // flush), and the µs from the write's start to the decode worker's acknowledgement
  // (write + control round trip + its verification and unpacking).
  uint32_t prefill_ms = 0;
  uint64_t transfer_bytes = 0;
  uint32_t transfer_us = 0;
  uint32_t handoff_us = 0;
};

// ---- prefill -> decode: the state is in your pages ----------------------------------------

// Sent by a prefill worker to the decode worker named in DecodeTarget after the KV state was
// written into the reserved pages (over UCX): "reservation X of your epoch E now holds
// `kv_tokens` tokens of state with this checksum; the first generated token is
// `first_token`". Answered with HandoffAck. A decode worker whose epoch differs rejects it:
// its pages (and keys) belong to an earlier incarnation. `span_digests` are the transfer
// engine's per-span digests of what the puts wrote (kvstore::encode_digests), which the decode
// worker verifies before reading a byte; at most kMaxTransferKeysBytes.
struct HandoffDone {
  RequestId request_id = 0;
  ReservationId reservation_id = 0;
  Epoch decode_epoch = 0;
  uint32_t kv_tokens = 0;
  uint64_t state_checksum = 0;
  TokenId first_token = 0;
  std::vector<uint8_t> span_digests;
};

struct HandoffAck {
  RequestId request_id = 0;
  bool accepted = false;
  std::string reason;  // why not accepted
};

// ---- gateway -> decode: a reservation's lease ----------------------------------------------

// Sent by the gateway every few seconds while the prefill of the attempt holding reservation
// `reservation_id` runs: the reservation's expiry moves to the decode worker's reservation
// timeout from now (never past the request's deadline). A long prefill (a 100k-token prompt
// takes minutes on a CPU) keeps its reservation; a gateway that died stops renewing and the
// reservation expires. Answered with RenewReply; renewed = false for an unknown reservation.
struct RenewReservation {
  RequestId request_id = 0;
  ReservationId reservation_id = 0;
};

struct RenewReply {
  RequestId request_id = 0;
  bool renewed = false;
};

// ---- gateway -> prefill / decode: cancellation --------------------------------------------

// Sent by the gateway when a client goes away or a deadline passes: drop request R and release
// everything it holds (reservation, pages, batch slot). Idempotent; answered with CancelReply.
struct CancelRequest {
  RequestId request_id = 0;
  std::string reason;
};

struct CancelReply {
  RequestId request_id = 0;
  bool was_active = false;  // false: the worker did not know the request (already finished)
};

// ---- any -> any: health -------------------------------------------------------------------

// Sent periodically by whoever watches a process (the gateway, the node agent). Answered with
// HealthReport. A report whose `epoch` differs from the last one seen from the same address
// means the process restarted: everything it held (reservations, transfer keys) is gone.
struct HealthProbe {
  Role sender_role = Role::kGateway;
  Epoch sender_epoch = 0;
  int64_t sent_unix_ms = 0;
};

// Fields a role does not track are 0. The page and region counts make leaks visible from
// outside the process: with no request in flight, a decode worker holds no pages, no regions
// and no budget, and a prefill worker's pages are exactly those its prefix cache keeps.
struct HealthReport {
  Role role = Role::kGateway;
  Epoch epoch = 0;
  std::string node_name;
  uint64_t uptime_ms = 0;
  // decode: requests decoding; prefill: requests accepted and not yet answered.
  uint32_t active_requests = 0;
  // decode: reservations waiting for their hand-off; prefill: requests not yet prefilled.
  uint32_t queued_requests = 0;
  // decode: KV byte budget not held by reservations, quarantined regions or decoding states.
  uint64_t free_kv_bytes = 0;
  // decode: the budget bytes those hold (free_kv_bytes + this = the whole budget).
  uint64_t kv_budget_bytes_in_use = 0;
  // Pages allocated from the process's KV page pools (every pool of the model, and on a
  // prefill worker the prefix cache's snapshot pool), and their bytes.
  uint64_t kv_pages_in_use = 0;
  uint64_t kv_page_bytes_in_use = 0;
  // prefill: bytes of the pages the prefix cache keeps on its device tier (shared with the
  // requests that read them). Pages held by requests alone: kv_page_bytes_in_use - this.
  uint64_t cached_kv_bytes = 0;
  // decode: transfer regions mapped for hand-offs: live reservations plus quarantined regions
  // (expired or cancelled, waiting out --region-grace-ms), and the quarantined ones alone.
  uint32_t handoff_regions = 0;
  uint32_t quarantined_regions = 0;
  // decode: HandoffDone messages refused (stale epoch, no live reservation, bad digests or
  // state); prefill: hand-offs whose HandoffAck was a refusal.
  uint64_t handoffs_rejected = 0;
  // decode: of those, the ones whose landed bytes failed verification (corrupted in flight).
  uint64_t handoffs_corrupt = 0;
  // prefill, tests only: hand-offs corrupted on purpose (--inject-corrupt-handoffs).
  uint64_t injected_faults = 0;
  // decode, speculative decoding: draft tokens verified and of them accepted; the requests'
  // steps that verified drafts and the tokens those committed (their ratio: the acceptance
  // length).
  uint64_t drafted_tokens = 0;
  uint64_t accepted_draft_tokens = 0;
  uint64_t verify_request_steps = 0;
  uint64_t verify_committed_tokens = 0;
  // decode: committed tokens per second measured per batch-size bucket b (batches of 2^b to
  // 2^(b+1) - 1 requests) and draft count k = 0 .. speculative_tokens, at
  // [b * (speculative_tokens + 1) + k]; 0 where not measured. Empty without speculation.
  std::vector<double> speculation_tokens_per_second;
};
// speculation_tokens_per_second's batch-size buckets (the last: 2^7 requests and more), and the
// most figures it may hold (k = 0 .. 8 in each).
inline constexpr size_t kSpeculationBuckets = 8;
inline constexpr size_t kMaxSpeculationFigures = kSpeculationBuckets * 9;

// ---- validation ----------------------------------------------------------------------------

// Checks what the type system cannot: the consistency a receiver relies on before acting on a
// message from another process. Each returns kInvalidArgument naming the request and the field.
//   ReserveReply: granted => non-zero reservation id and epoch, keys within
//     kMaxTransferKeysBytes; refused => a reason and no keys.
//   ReserveRequest: a trace id within kMaxTraceIdBytes.
//   PrefillRequest: a non-empty prompt, a target with host, port, epoch, reservation and keys
//     within kMaxTransferKeysBytes, a trace id within kMaxTraceIdBytes.
//   TokenChunk: an error implies finished; an unfinished chunk carries tokens.
//   HandoffDone: non-zero reservation and epoch, at least one kv token, span digests within
//     kMaxTransferKeysBytes.
Status validate(const ReserveRequest& request);
Status validate(const ReserveReply& reply);
Status validate(const HandoffDone& done);
Status validate(const PrefillRequest& request);
Status validate(const TokenChunk& chunk);

// ---- wire format --------------------------------------------------------------------------

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, TokenChunk& x) {
  return f(caf::meta::type_name("dserve.TokenChunk"), x.request_id, x.decode_epoch, x.first_index,
           x.tokens, x.finished, x.error);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ReserveRequest& x) {
  return f(caf::meta::type_name("dserve.ReserveRequest"), x.request_id, x.prompt_tokens,
           x.max_new_tokens, x.deadline_unix_ms, x.stream_to, x.temperature, x.top_k, x.top_p,
           x.seed, x.presence_penalty, x.frequency_penalty, x.logit_bias_ids, x.logit_bias_values,
           x.generated, x.trace_id);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ReserveReply& x) {
  return f(caf::meta::type_name("dserve.ReserveReply"), x.request_id, x.outcome, x.reservation_id,
           x.decode_epoch, x.transfer_keys, x.reason, x.retryable);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, DecodeTarget& x) {
  return f(caf::meta::type_name("dserve.DecodeTarget"), x.host, x.port, x.epoch, x.reservation_id,
           x.transfer_keys);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PrefillRequest& x) {
  return f(caf::meta::type_name("dserve.PrefillRequest"), x.request_id, x.prompt,
           x.deadline_unix_ms, x.target, x.trace_id);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PrefillReply& x) {
  return f(caf::meta::type_name("dserve.PrefillReply"), x.request_id, x.outcome,
           x.cached_prefix_tokens, x.computed_tokens, x.reason, x.prefill_ms, x.transfer_bytes,
           x.transfer_us, x.handoff_us);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, HandoffDone& x) {
  return f(caf::meta::type_name("dserve.HandoffDone"), x.request_id, x.reservation_id,
           x.decode_epoch, x.kv_tokens, x.state_checksum, x.first_token, x.span_digests);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, HandoffAck& x) {
  return f(caf::meta::type_name("dserve.HandoffAck"), x.request_id, x.accepted, x.reason);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RenewReservation& x) {
  return f(caf::meta::type_name("dserve.RenewReservation"), x.request_id, x.reservation_id);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RenewReply& x) {
  return f(caf::meta::type_name("dserve.RenewReply"), x.request_id, x.renewed);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, CancelRequest& x) {
  return f(caf::meta::type_name("dserve.CancelRequest"), x.request_id, x.reason);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, CancelReply& x) {
  return f(caf::meta::type_name("dserve.CancelReply"), x.request_id, x.was_active);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, HealthProbe& x) {
  return f(caf::meta::type_name("dserve.HealthProbe"), x.sender_role, x.sender_epoch,
           x.sent_unix_ms);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, HealthReport& x) {
  return f(caf::meta::type_name("dserve.HealthReport"), x.role, x.epoch, x.node_name, x.uptime_ms,
           x.active_requests, x.queued_requests, x.free_kv_bytes, x.kv_budget_bytes_in_use,
           x.kv_pages_in_use, x.kv_page_bytes_in_use, x.cached_kv_bytes, x.handoff_regions,
           x.quarantined_regions, x.handoffs_rejected, x.handoffs_corrupt, x.injected_faults,
           x.drafted_tokens, x.accepted_draft_tokens, x.verify_request_steps,
           x.verify_committed_tokens, x.speculation_tokens_per_second);
}

// Registers every message type above with `cfg`, under the names used on the wire. ActorRuntime
// calls it; call it yourself only for an actor_system you build without ActorRuntime (e.g. CAF's
// test coordinator).
void register_message_types(caf::actor_system_config& cfg);

}  // namespace dserve::actors
