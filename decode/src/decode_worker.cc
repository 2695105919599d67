#include "dserve/decode/decode_worker.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <caf/all.hpp>

#include "dserve/decode/decode_batch.h"
#include "dserve/decode/handoff_arena.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/model/state_handoff.h"
#include "dserve/model/state_packing.h"
#include "dserve/ops/log.h"
#include "dserve/ops/metrics.h"

namespace dserve::decode {
namespace {

using namespace actors;  // NOLINT: the message vocabulary
using step_atom = caf::atom_constant<caf::atom("dec_step")>;
using expire_atom = caf::atom_constant<caf::atom("dec_expire")>;
using purge_atom = caf::atom_constant<caf::atom("dec_purge")>;

// The published interface plus the messages the worker sends itself.
using DecodeWorkerActor =
    DecodeActor::extend<caf::reacts_to<step_atom>, caf::reacts_to<expire_atom, ReservationId>,
                        caf::reacts_to<purge_atom>>;

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct Reservation {
  RequestId request_id = 0;
  std::string trace_id;
  uint32_t prompt_tokens = 0;
  uint32_t max_new_tokens = 0;
  int64_t deadline_unix_ms = 0;
  model::SamplingParams sampling;
  std::vector<int32_t> generated;  // before this placement, for the penalties
  TokenSinkActor sink;
  HandoffArena::Lease lease;  // where the prefill worker writes the state
  // When it expires without a HandoffDone: reservation_timeout after the grant or the last
  // RenewReservation, never past the deadline. On the actor's clock (WorkerState::now).
  caf::actor_clock::time_point expires;
};

// A reservation that expired or was cancelled before its hand-off, remembered while its range
// is fenced so that a HandoffDone arriving meanwhile is told which.
struct EndedReservation {
  RequestId request_id = 0;
  std::string why;  // "expired before its hand-off", "cancelled before its hand-off (...)"
  caf::actor_clock::time_point forget_after;
};

struct Decoding {
  RequestId request_id = 0;
  std::string trace_id;
  TokenSinkActor sink;
  uint32_t next_index = 0;
  uint64_t budget_bytes = 0;
};

// The worker's metrics in a registry (DecodeWorkerOptions::metrics); see decode_worker.h.
static_assert(SpeculationStats::kBuckets == actors::kSpeculationBuckets &&
                  SpeculationStats::kBuckets * (model::kMaxDraftTokens + 1) <=
                      actors::kMaxSpeculationFigures,
              "the health report's speculation figures do not match the batch's");

struct DecodeMetrics {
  explicit DecodeMetrics(ops::MetricsRegistry& r)
      : step_seconds(r.histogram("dserve_decode_step_duration_seconds",
                                 "Duration of one decode batch step.",
                                 ops::latency_buckets_seconds())),
        batch_size(r.histogram("dserve_decode_batch_size", "Requests in one decode batch step.",
                               ops::exponential_buckets(1, 2, 10))),
        active(r.gauge("dserve_decode_active_requests", "Requests decoding now.")),
        reserved(
            r.gauge("dserve_decode_reserved_requests", "Reservations waiting for their hand-off.")),
        budget_in_use(r.gauge("dserve_decode_kv_budget_in_use_bytes",
                              "KV byte budget held by reservations, quarantined regions and "
                              "decoding requests.")),
        budget_free(r.gauge("dserve_decode_kv_budget_free_bytes", "KV byte budget not held.")),
        granted(r.counter("dserve_decode_reservations_total", "Reservations asked, by outcome.",
                          {{"outcome", "granted"}})),
        refused(r.counter("dserve_decode_reservations_total", "Reservations asked, by outcome.",
                          {{"outcome", "refused"}})),
        accepted(r.counter("dserve_decode_handoffs_total", "Hand-offs received, by outcome.",
                           {{"outcome", "accepted"}})),
        rejected(r.counter("dserve_decode_handoffs_total", "Hand-offs received, by outcome.",
                           {{"outcome", "rejected"}})),
        corrupt(r.counter("dserve_decode_handoffs_corrupt_total",
                          "Rejected hand-offs whose landed bytes failed verification.")),
        tokens(r.counter("dserve_decode_tokens_total", "Tokens generated.")),
        drafted(r.counter("dserve_decode_draft_tokens_total",
                          "Draft tokens verified (speculative decoding).")),
        drafts_accepted(r.counter("dserve_decode_accepted_draft_tokens_total",
                                  "Draft tokens the target accepted.")),
        acceptance_length(r.gauge("dserve_decode_acceptance_length",
                                  "Mean tokens committed per request per step that verified "
                                  "drafts (1: none accepted).")),
        drafts_per_step(r.gauge("dserve_decode_draft_tokens_per_step",
                                "Draft tokens per request in the last step (the adaptive k).")) {}

  ops::Histogram &step_seconds, &batch_size;
  ops::Gauge &active, &reserved, &budget_in_use, &budget_free;
  ops::Counter &granted, &refused, &accepted, &rejected, &corrupt, &tokens;
  ops::Counter &drafted, &drafts_accepted;
  ops::Gauge &acceptance_length, &drafts_per_step;
};

struct WorkerState {
  // The actor system's clock, which its delayed messages follow: reservation expiry and the
  // region grace are measured on it, so that a test scheduler that advances it runs them.
  caf::actor_clock* clock = nullptr;
  model::Engine* compute = nullptr;  // the model, on its device
  kvstore::Transport* transport = nullptr;
  Epoch epoch = 0;
  std::string node_name;
  DecodeWorkerOptions options;
  std::unique_ptr<DecodeBatch> batch;
  ReservationId next_reservation = 1;
  // Every reservation's region is a lease of the arena; the ranges of reservations that expired
  // or were cancelled before their hand-off stay fenced (and counted in used_bytes) for the
  // region grace: see handoff_arena.h for why late puts can do no harm.
  std::shared_ptr<HandoffArena> arena;
  std::map<ReservationId, Reservation> reservations;  // each holds one lease
  std::map<ReservationId, Decoding> decoding;         // keyed like the batch
  // Expired or cancelled reservations, for the region grace (at most one per fenced range).
  std::map<ReservationId, EndedReservation> ended;
  uint64_t used_bytes = 0;
  uint64_t handoffs_rejected = 0;  // HandoffDone answered with accepted = false
  uint64_t handoffs_corrupt = 0;   // of those, landed bytes that failed verification
  bool stepping = false;
  std::unique_ptr<DecodeMetrics> metrics;

  caf::actor_clock::time_point now() const { return clock->now(); }

  // The gauges follow the state: called after every message that changes it.
  void refresh_gauges() {
    if (!metrics) return;
    metrics->active.set(static_cast<double>(decoding.size()));
    metrics->reserved.set(static_cast<double>(reservations.size()));
    metrics->budget_in_use.set(static_cast<double>(used_bytes));
    metrics->budget_free.set(static_cast<double>(options.kv_budget_bytes - used_bytes));
  }
  void log(ops::LogLevel level, std::string_view event, std::string_view trace_id,
           std::initializer_list<ops::LogField> fields) {
    if (options.log) options.log->log(level, event, trace_id, fields);
  }
};

uint64_t decoding_bytes(const model::ModelConfig& config, const Reservation& r) {
  return model::packed_state_bytes(config,
                                   static_cast<int64_t>(r.prompt_tokens) + r.max_new_tokens);
}

ReserveReply refuse(const ReserveRequest& req, Epoch epoch, std::string reason,
                    bool retryable = true) {
  ReserveReply reply;
  reply.retryable = retryable;
  reply.request_id = req.request_id;
  reply.decode_epoch = epoch;
  reply.outcome = ReserveOutcome::kRefused;
  reply.reason = std::move(reason);
  return reply;
}

// After a completed hand-off: the prefill's put has finished, the range is free at once.
void release_reservation(WorkerState& st, std::map<ReservationId, Reservation>::iterator it) {
  st.used_bytes -= it->second.lease.bytes;
  st.arena->release(std::move(it->second.lease));
  st.reservations.erase(it);
}

// Before a hand-off (expiry, cancel): a late put may still land, so the range is fenced.
void abandon_reservation(WorkerState& st, std::map<ReservationId, Reservation>::iterator it,
                         std::string why) {
  const auto reuse_after = st.now() + st.options.region_grace;
  st.arena->abandon(std::move(it->second.lease), reuse_after);
  st.ended[it->first] = EndedReservation{it->second.request_id, std::move(why), reuse_after};
  st.reservations.erase(it);
}

void purge_quarantine(WorkerState& st) {
  const auto now = st.now();
  st.used_bytes -= st.arena->reclaim(now);
  std::erase_if(st.ended, [now](const auto& entry) { return entry.second.forget_after <= now; });
}

// Checks the landed bytes and turns them into a batch entry.
Result<DecodeRequest> take_handoff(WorkerState& st, ReservationId id, const Reservation& r,
                                   const HandoffDone& done) {
  const model::ModelConfig& config = st.compute->config();
  auto digests = kvstore::decode_digests(done.span_digests);
  if (!digests.is_ok()) return digests.status();
  const uint64_t state_bytes = model::handoff_bytes(config, r.prompt_tokens);
  const uint64_t logit_bytes = static_cast<uint64_t>(config.vocab_size) * sizeof(float);
  // The logits follow the state; the state's spans are checked by receive_handoff.
  if (digests->empty() || digests->back().remote_offset != state_bytes ||
      digests->back().bytes != logit_bytes || state_bytes + logit_bytes > r.lease.region.bytes()) {
    return data_loss("hand-off digests do not end with the logits span of the region");
  }
  // Every span is copied out of the region first, then verified and read from the copy: bytes a
  // late put (of an earlier, abandoned lease of this range) writes after that cannot reach the
  // request.
  auto state = model::receive_handoff(*st.compute, {r.lease.region.data(), state_bytes},
                                      static_cast<int64_t>(r.prompt_tokens),
                                      std::span(*digests).first(digests->size() - 1));
  if (!state.is_ok()) {
    if (state.status().code() == StatusCode::kDataLoss) ++st.handoffs_corrupt;
    return state.status();
  }
  std::vector<float> logits(static_cast<size_t>(config.vocab_size));
  std::memcpy(logits.data(), r.lease.region.data() + state_bytes, logit_bytes);
  const kvstore::SpanDigest logit_digest{0, logit_bytes, digests->back().xxh3};
  if (Status landed =
          kvstore::verify_landed(std::as_bytes(std::span(logits)), std::span(&logit_digest, 1));
      !landed.is_ok()) {
    ++st.handoffs_corrupt;
    return landed;
  }
  DecodeRequest req;
  req.id = id;
  req.request = std::move(state).value();
  req.prompt_logits = Tensor({1, config.vocab_size});
  std::memcpy(req.prompt_logits.data(), logits.data(), logit_bytes);
  req.max_tokens = r.max_new_tokens;
  req.sampling = r.sampling;
  req.generated = r.generated;
  if (r.deadline_unix_ms > 0) {
    req.deadline = Clock::now() + std::chrono::milliseconds(
                                      std::max<int64_t>(0, r.deadline_unix_ms - unix_ms_now()));
  }
  return req;
}

TokenChunk chunk_for(const TokenEvent& ev, const Decoding& d, Epoch epoch) {
  TokenChunk c;
  c.request_id = d.request_id;
  c.decode_epoch = epoch;
  c.first_index = ev.token ? static_cast<uint32_t>(ev.index) : d.next_index;
  if (ev.token) c.tokens.push_back(*ev.token);
  c.finished = ev.finished != FinishReason::kNone;
  switch (ev.finished) {
    case FinishReason::kCancelled:
      c.error = "cancelled";
      break;
    case FinishReason::kDeadline:
      c.error = "deadline passed while decoding";
      break;
    case FinishReason::kError:
      c.error = "decode failed: " + ev.error.to_string();
      break;
    default:
      break;
  }
  return c;
}

// Takes a hand-off into the batch, or says why not (the reservation is released either way
// once it is found).
HandoffAck accept_handoff(WorkerState& s, const HandoffDone& done) {
  HandoffAck ack{done.request_id, false, ""};
  if (Status v = validate(done); !v.is_ok()) {
    ack.reason = v.to_string();
    return ack;
  }
  if (done.decode_epoch != s.epoch) {
    ack.reason = "stale epoch " + std::to_string(done.decode_epoch) +
                 ": the reservation was made by an earlier incarnation of " + s.node_name;
    return ack;
  }
  auto it = s.reservations.find(done.reservation_id);
  if (it == s.reservations.end() || it->second.request_id != done.request_id) {
    ack.reason = "no live reservation " + std::to_string(done.reservation_id) + " for request " +
                 std::to_string(done.request_id) + " (expired or cancelled)";
    if (auto ended = s.ended.find(done.reservation_id);
        ended != s.ended.end() && ended->second.request_id == done.request_id) {
      ack.reason += ": it " + ended->second.why;
    }
    return ack;
  }
  auto req = take_handoff(s, it->first, it->second, done);
  Decoding d{it->second.request_id, it->second.trace_id, it->second.sink, 0,
             decoding_bytes(s.compute->config(), it->second)};
  release_reservation(s, it);
  if (!req.is_ok()) {
    ack.reason = "hand-off refused: " + req.status().to_string();
    return ack;
  }
  const ReservationId id = req->id;
  if (Status added = s.batch->add(std::move(req).value()); !added.is_ok()) {
    ack.reason = "cannot join the batch: " + added.to_string();
    return ack;
  }
  s.used_bytes += d.budget_bytes;
  s.decoding.emplace(id, std::move(d));
  ack.accepted = true;
  return ack;
}

// How long a reservation is held from now: the reservation timeout, never past the deadline.
std::chrono::milliseconds lease_time(const DecodeWorkerOptions& options, int64_t deadline_unix_ms) {
  auto expiry = options.reservation_timeout;
  if (deadline_unix_ms > 0) {
    expiry = std::min(
        expiry, std::chrono::milliseconds(std::max<int64_t>(0, deadline_unix_ms - unix_ms_now())));
  }
  return expiry;
}

// Grants or refuses `req` (the ReserveRequest handler, before logging and counting).
ReserveReply reserve(DecodeWorkerActor::stateful_pointer<WorkerState> self, ReserveRequest& req) {
  auto& s = self->state;
  if (req.prompt_tokens == 0) return refuse(req, s.epoch, "empty prompt", false);
  if (req.logit_bias_ids.size() != req.logit_bias_values.size() ||
      req.generated.size() > req.max_new_tokens + req.prompt_tokens) {
    return refuse(req, s.epoch, "malformed sampling lists", false);
  }
  model::SamplingParams sampling{
      req.temperature,       req.top_k, req.top_p, req.seed, req.presence_penalty,
      req.frequency_penalty, {}};
  for (size_t i = 0; i < req.logit_bias_ids.size() && i <= model::kMaxLogitBiasEntries; ++i)
    sampling.logit_bias.emplace_back(req.logit_bias_ids[i], req.logit_bias_values[i]);
  if (Status ok = model::validate_sampling_params(sampling, s.compute->config().vocab_size);
      !ok.is_ok()) {
    return refuse(req, s.epoch, "bad sampling parameters: " + ok.message(), false);
  }
  const auto held = static_cast<int64_t>(s.reservations.size() + s.decoding.size());
  if (held >= s.options.max_batch) {
    return refuse(req, s.epoch,
                  "batch full: " + std::to_string(held) + " of " +
                      std::to_string(s.options.max_batch) + " slots held");
  }
  // What the region takes of the budget while reserved: whole pages of the arena.
  const uint64_t region_bytes =
      HandoffArena::lease_bytes(handoff_region_bytes(s.compute->config(), req.prompt_tokens));
  const uint64_t need = std::max<uint64_t>(
      region_bytes,
      model::packed_state_bytes(s.compute->config(),
                                static_cast<int64_t>(req.prompt_tokens) + req.max_new_tokens));
  if (need > s.options.kv_budget_bytes) {
    return refuse(req, s.epoch,
                  "the request needs " + std::to_string(need) +
                      " bytes of KV state, more than this worker's whole budget of " +
                      std::to_string(s.options.kv_budget_bytes),
                  false);
  }
  if (s.used_bytes + need > s.options.kv_budget_bytes) {
    return refuse(req, s.epoch,
                  "KV byte budget full: needs " + std::to_string(need) + " bytes, " +
                      std::to_string(s.options.kv_budget_bytes - s.used_bytes) + " free");
  }
  auto lease = s.arena->lease(region_bytes);
  if (!lease.is_ok())
    return refuse(req, s.epoch, "cannot lease a transfer region: " + lease.status().to_string());
  auto remote = s.transport->describe(lease->region);
  if (!remote.is_ok()) {
    s.arena->release(std::move(lease).value());
    return refuse(req, s.epoch,
                  "cannot describe the transfer region: " + remote.status().to_string());
  }
  ReserveReply reply;
  reply.request_id = req.request_id;
  reply.decode_epoch = s.epoch;
  reply.outcome = ReserveOutcome::kGranted;
  reply.reservation_id = s.next_reservation++;
  reply.transfer_keys =
      kvstore::encode_handoff_keys({s.transport->local_address(), std::move(remote).value()});
  s.used_bytes += lease->bytes;
  const auto expiry = lease_time(s.options, req.deadline_unix_ms);
  s.reservations.emplace(
      reply.reservation_id,
      Reservation{req.request_id, req.trace_id, req.prompt_tokens, req.max_new_tokens,
                  req.deadline_unix_ms, sampling, std::move(req.generated),
                  std::move(req.stream_to), std::move(lease).value(), s.now() + expiry});
  self->delayed_send(self, expiry, expire_atom::value, reply.reservation_id);
  return reply;
}

// Moves the expiry of the reservation `renew` names (RenewReservation).
RenewReply renew_reservation(WorkerState& s, const RenewReservation& renew) {
  auto it = s.reservations.find(renew.reservation_id);
  if (it == s.reservations.end() || it->second.request_id != renew.request_id) {
    return RenewReply{renew.request_id, false};
  }
  it->second.expires = s.now() + lease_time(s.options, it->second.deadline_unix_ms);
  return RenewReply{renew.request_id, true};
}

// Drops the reservation or ends the decoding request `cancel` names.
CancelReply cancel_request(DecodeWorkerActor::stateful_pointer<WorkerState> self,
                           const CancelRequest& cancel) {
  auto& s = self->state;
  CancelReply reply{cancel.request_id, false};
  for (auto it = s.reservations.begin(); it != s.reservations.end(); ++it) {
    if (it->second.request_id == cancel.request_id) {
      s.log(ops::LogLevel::kInfo, "reservation_cancelled", it->second.trace_id,
            {{"attempt_id", cancel.request_id},
             {"reservation_id", it->first},
             {"reason", cancel.reason}});
      // The gateway's reason, bounded: it is kept for the grace period and sent back.
      abandon_reservation(
          s, it, "was cancelled before its hand-off (" + cancel.reason.substr(0, 128) + ")");
      self->delayed_send(self, s.options.region_grace, purge_atom::value);
      reply.was_active = true;
      return reply;
    }
  }
  for (auto& [id, d] : s.decoding) {
    if (d.request_id == cancel.request_id) {
      s.batch->cancel(id);  // its finished chunk goes out at the next step
      reply.was_active = true;
      break;
    }
  }
  return reply;
}

DecodeWorkerActor::behavior_type decode_worker(
    DecodeWorkerActor::stateful_pointer<WorkerState> self, model::Engine* compute,
    kvstore::Transport* transport, std::shared_ptr<HandoffArena> arena, Epoch epoch,
    std::string node_name, DecodeWorkerOptions options) {
  auto& st = self->state;
  st.clock = &self->clock();
  st.compute = compute;
  st.transport = transport;
  st.arena = std::move(arena);
  st.epoch = epoch;
  st.node_name = std::move(node_name);
  st.options = options;
  st.batch = std::make_unique<DecodeBatch>(
      *compute, DecodeOptions{.max_batch = options.max_batch,
                              .sampleable_ids = options.sampleable_ids,
                              .speculative_tokens = options.speculative_tokens,
                              .adaptive_speculation = options.adaptive_speculation});
  if (options.metrics) st.metrics = std::make_unique<DecodeMetrics>(*options.metrics);
  st.refresh_gauges();
  auto kick = [self] {
    if (self->state.stepping || self->state.batch->empty()) return;
    self->state.stepping = true;
    self->send(self, step_atom::value);
  };
  return {
      [self](ReserveRequest& req) -> ReserveReply {
        auto& s = self->state;
        if (req.trace_id.size() > kMaxTraceIdBytes) {
          const Status v = validate(req);
          req.trace_id.resize(kMaxTraceIdBytes);  // what the log can carry
          ReserveReply reply = refuse(req, s.epoch, v.message(), false);
          s.log(ops::LogLevel::kWarn, "reservation_refused", req.trace_id,
                {{"attempt_id", req.request_id}, {"reason", reply.reason}});
          if (s.metrics) s.metrics->refused.inc();
          return reply;
        }
        const std::string trace_id = req.trace_id;
        const RequestId attempt_id = req.request_id;
        ReserveReply reply = reserve(self, req);
        if (reply.outcome == ReserveOutcome::kGranted) {
          if (s.metrics) s.metrics->granted.inc();
          s.log(ops::LogLevel::kInfo, "reservation_granted", trace_id,
                {{"attempt_id", attempt_id},
                 {"reservation_id", reply.reservation_id},
                 {"prompt_tokens", req.prompt_tokens},
                 {"max_new_tokens", req.max_new_tokens}});
        } else {
          if (s.metrics) s.metrics->refused.inc();
          s.log(ops::LogLevel::kWarn, "reservation_refused", trace_id,
                {{"attempt_id", attempt_id},
                 {"retryable", reply.retryable},
                 {"reason", reply.reason}});
        }
        s.refresh_gauges();
        return reply;
      },
      [self, kick](HandoffDone& done) {
        auto& s = self->state;
        auto found = s.reservations.find(done.reservation_id);
        const std::string trace_id =
            found != s.reservations.end() && found->second.request_id == done.request_id
                ? found->second.trace_id
                : std::string();
        const uint64_t corrupt_before = s.handoffs_corrupt;
        HandoffAck ack = accept_handoff(s, done);
        if (!ack.accepted) {
          ++s.handoffs_rejected;
          if (s.metrics) {
            s.metrics->rejected.inc();
            if (s.handoffs_corrupt > corrupt_before) s.metrics->corrupt.inc();
          }
          s.log(ops::LogLevel::kWarn, "handoff_refused", trace_id,
                {{"attempt_id", done.request_id},
                 {"reservation_id", done.reservation_id},
                 {"reason", ack.reason}});
          s.refresh_gauges();
          return ack;
        }
        if (s.metrics) s.metrics->accepted.inc();
        s.log(ops::LogLevel::kInfo, "handoff_accepted", trace_id,
              {{"attempt_id", done.request_id},
               {"reservation_id", done.reservation_id},
               {"kv_tokens", done.kv_tokens}});
        s.refresh_gauges();
        kick();
        return ack;
      },
      [self](RenewReservation& renew) { return renew_reservation(self->state, renew); },
      [self](CancelRequest& cancel) {
        auto& s = self->state;
        CancelReply reply = cancel_request(self, cancel);
        s.refresh_gauges();
        return reply;
      },
      [self](HealthProbe&) {
        auto& s = self->state;
        HealthReport report;
        report.role = Role::kDecode;
        report.epoch = s.epoch;
        report.node_name = s.node_name;
        report.active_requests = static_cast<uint32_t>(s.decoding.size());
        // Reservations waiting for their hand-off; each holds exactly one transfer region.
        report.queued_requests = static_cast<uint32_t>(s.reservations.size());
        report.free_kv_bytes = s.options.kv_budget_bytes - s.used_bytes;
        report.kv_budget_bytes_in_use = s.used_bytes;
        const model::KvPagePools& pools = s.compute->page_pools();
        for (const auto* group : {&pools.compressed, &pools.index_keys}) {
          for (const auto& pool : *group) {
            if (!pool) continue;  // a sliding-window layer has no pool
            report.kv_pages_in_use += static_cast<uint64_t>(pool->pages_in_use());
            report.kv_page_bytes_in_use += pool->bytes_in_use();
          }
        }
        report.handoff_regions =
            static_cast<uint32_t>(s.reservations.size() + s.arena->fenced_ranges());
        report.quarantined_regions = static_cast<uint32_t>(s.arena->fenced_ranges());
        report.handoffs_rejected = s.handoffs_rejected;
        report.handoffs_corrupt = s.handoffs_corrupt;
        const SpeculationStats& spec = s.batch->speculation();
        report.drafted_tokens = static_cast<uint64_t>(spec.drafted);
        report.accepted_draft_tokens = static_cast<uint64_t>(spec.accepted);
        report.verify_request_steps = static_cast<uint64_t>(spec.request_steps);
        report.verify_committed_tokens = static_cast<uint64_t>(spec.tokens);
        if (s.options.speculative_tokens > 0) {
          for (const auto& bucket : spec.tokens_per_second) {
            report.speculation_tokens_per_second.insert(
                report.speculation_tokens_per_second.end(), bucket.begin(),
                bucket.begin() + s.options.speculative_tokens + 1);
          }
        }
        return report;
      },
      [self, kick](step_atom) {
        auto& s = self->state;
        s.stepping = false;
        const size_t batch = s.batch->size();
        const auto step_start = Clock::now();
        const int64_t drafted_before = s.batch->speculation().drafted;
        const int64_t accepted_before = s.batch->speculation().accepted;
        std::vector<TokenEvent> events = s.batch->step();
        if (s.metrics) {
          s.metrics->step_seconds.observe(
              std::chrono::duration<double>(Clock::now() - step_start).count());
          s.metrics->batch_size.observe(static_cast<double>(batch));
          const SpeculationStats& after = s.batch->speculation();
          s.metrics->drafted.inc(static_cast<double>(after.drafted - drafted_before));
          s.metrics->drafts_accepted.inc(static_cast<double>(after.accepted - accepted_before));
          s.metrics->acceptance_length.set(after.acceptance_length());
          s.metrics->drafts_per_step.set(static_cast<double>(s.batch->last_draft_tokens()));
        }
        for (const TokenEvent& ev : events) {
          auto it = s.decoding.find(ev.request_id);
          if (it == s.decoding.end()) continue;
          TokenChunk chunk = chunk_for(ev, it->second, s.epoch);
          if (s.metrics) s.metrics->tokens.inc(static_cast<double>(chunk.tokens.size()));
          it->second.next_index = chunk.first_index + static_cast<uint32_t>(chunk.tokens.size());
          if (ev.finished != FinishReason::kNone) {
            const bool cancelled = ev.finished == FinishReason::kCancelled;
            s.log(cancelled || ev.finished == FinishReason::kEndOfSequence ||
                          ev.finished == FinishReason::kMaxTokens
                      ? ops::LogLevel::kInfo
                      : ops::LogLevel::kWarn,
                  cancelled ? "decode_cancelled" : "decode_finished", it->second.trace_id,
                  {{"attempt_id", it->second.request_id},
                   {"reason", finish_reason_name(ev.finished)},
                   {"tokens", it->second.next_index},
                   {"error", chunk.error}});
          }
          if (it->second.sink) self->send(it->second.sink, std::move(chunk));
          if (ev.finished != FinishReason::kNone) {
            s.used_bytes -= it->second.budget_bytes;
            s.decoding.erase(it);
          }
        }
        s.refresh_gauges();
        // A message, not a loop: reserves, hand-offs and cancels get in between steps.
        kick();
      },
      [self](expire_atom, ReservationId id) {
        auto it = self->state.reservations.find(id);
        if (it == self->state.reservations.end()) return;
        const auto now = self->state.now();
        if (it->second.expires > now) {  // renewed meanwhile: look again when the lease ends
          self->delayed_send(self,
                             std::chrono::ceil<std::chrono::milliseconds>(it->second.expires - now),
                             expire_atom::value, id);
          return;
        }
        self->state.log(ops::LogLevel::kWarn, "reservation_expired", it->second.trace_id,
                        {{"attempt_id", it->second.request_id}, {"reservation_id", id}});
        abandon_reservation(self->state, it, "expired before its hand-off");
        self->delayed_send(self, self->state.options.region_grace, purge_atom::value);
        self->state.refresh_gauges();
      },
      [self](purge_atom) {
        purge_quarantine(self->state);
        self->state.refresh_gauges();
      },
  };
}

}  // namespace

uint64_t handoff_region_bytes(const model::ModelConfig& config, int64_t prompt_tokens) {
  return model::handoff_bytes(config, prompt_tokens) +
         static_cast<uint64_t>(config.vocab_size) * sizeof(float);
}

Result<DecodeActor> spawn_decode_worker(caf::actor_system& system, model::Engine& compute,
                                        kvstore::Transport& transport, Epoch epoch,
                                        std::string node_name, DecodeWorkerOptions options) {
  auto arena = HandoffArena::create(transport, options.kv_budget_bytes);
  if (!arena.is_ok()) return arena.status();
  auto worker = system.spawn(decode_worker, &compute, &transport,
                             std::shared_ptr<HandoffArena>(std::move(arena).value()), epoch,
                             std::move(node_name), options);
  return caf::actor_cast<DecodeActor>(worker);
}

}  // namespace dserve::decode
