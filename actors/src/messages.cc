#include "dserve/actors/messages.h"

#include <string>

#include <caf/actor_system_config.hpp>

namespace dserve::actors {

const char* role_name(Role role) {
  switch (role) {
    case Role::kGateway:
      return "gateway";
    case Role::kPrefill:
      return "prefill";
    case Role::kDecode:
      return "decode";
    case Role::kNodeAgent:
      return "node-agent";
  }
  return "unknown-role";
}

namespace {

Status bad(RequestId id, const std::string& what) {
  return invalid_argument("request " + std::to_string(id) + ": " + what);
}

Status check_keys(RequestId id, const std::vector<uint8_t>& keys) {
  if (keys.size() > kMaxTransferKeysBytes) {
    return bad(id, "transfer keys of " + std::to_string(keys.size()) + " bytes exceed the " +
                       std::to_string(kMaxTransferKeysBytes) +
                       "-byte bound (KV bytes do not travel in control messages)");
  }
  return Status::ok();
}

Status check_trace_id(RequestId id, const std::string& trace_id) {
  if (trace_id.size() > kMaxTraceIdBytes) {
    return bad(id, "trace id of " + std::to_string(trace_id.size()) + " bytes exceeds the " +
                       std::to_string(kMaxTraceIdBytes) + "-byte bound");
  }
  return Status::ok();
}

}  // namespace

Status validate(const ReserveRequest& request) {
  return check_trace_id(request.request_id, request.trace_id);
}

Status validate(const ReserveReply& reply) {
  if (reply.outcome == ReserveOutcome::kRefused) {
    if (reply.reason.empty()) return bad(reply.request_id, "refused reservation without a reason");
    if (!reply.transfer_keys.empty())
      return bad(reply.request_id, "refused reservation carries transfer keys");
    return Status::ok();
  }
  if (reply.outcome != ReserveOutcome::kGranted)
    return bad(reply.request_id, "unknown reservation outcome");
  if (reply.reservation_id == 0) return bad(reply.request_id, "granted reservation has id 0");
  if (reply.decode_epoch == 0) return bad(reply.request_id, "granted reservation has epoch 0");
  return check_keys(reply.request_id, reply.transfer_keys);
}

Status validate(const PrefillRequest& request) {
  if (request.prompt.empty()) return bad(request.request_id, "empty prompt");
  const DecodeTarget& t = request.target;
  if (t.host.empty() || t.port == 0)
    return bad(request.request_id, "decode target has no control address");
  if (t.epoch == 0 || t.reservation_id == 0)
    return bad(request.request_id, "decode target has no epoch or reservation");
  if (Status s = check_trace_id(request.request_id, request.trace_id); !s.is_ok()) return s;
  return check_keys(request.request_id, t.transfer_keys);
}

Status validate(const TokenChunk& chunk) {
  if (!chunk.error.empty() && !chunk.finished)
    return bad(chunk.request_id, "a failed chunk must also be the last one");
  if (!chunk.finished && chunk.tokens.empty())
    return bad(chunk.request_id, "an unfinished chunk without tokens");
  return Status::ok();
}

Status validate(const HandoffDone& done) {
  if (done.reservation_id == 0 || done.decode_epoch == 0)
    return bad(done.request_id, "hand-off without a reservation or epoch");
  if (done.kv_tokens == 0) return bad(done.request_id, "hand-off of an empty state");
  if (done.span_digests.empty()) return bad(done.request_id, "hand-off without span digests");
  return check_keys(done.request_id, done.span_digests);
}

void register_message_types(caf::actor_system_config& cfg) {
  // The names are the wire identity of each type: both ends must use the same ones, and
  // renaming one breaks compatibility between builds.
  cfg.add_message_type<TokenChunk>("dserve.TokenChunk");
  cfg.add_message_type<ReserveRequest>("dserve.ReserveRequest");
  cfg.add_message_type<ReserveReply>("dserve.ReserveReply");
  cfg.add_message_type<DecodeTarget>("dserve.DecodeTarget");
  cfg.add_message_type<PrefillRequest>("dserve.PrefillRequest");
  cfg.add_message_type<PrefillReply>("dserve.PrefillReply");
  cfg.add_message_type<HandoffDone>("dserve.HandoffDone");
  cfg.add_message_type<HandoffAck>("dserve.HandoffAck");
  cfg.add_message_type<RenewReservation>("dserve.RenewReservation");
  cfg.add_message_type<RenewReply>("dserve.RenewReply");
  cfg.add_message_type<CancelRequest>("dserve.CancelRequest");
  cfg.add_message_type<CancelReply>("dserve.CancelReply");
  cfg.add_message_type<HealthProbe>("dserve.HealthProbe");
  cfg.add_message_type<HealthReport>("dserve.HealthReport");
  // Actor handles travel inside messages (ReserveRequest::stream_to).
  cfg.add_message_type<TokenSinkActor>("dserve.TokenSinkActor");
}

}  // namespace dserve::actors
