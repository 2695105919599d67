#include "fake_roles.h"

#include <chrono>
#include <map>
#include <string>
#include <utility>

#include <caf/all.hpp>

namespace dserve::actors::testing {
namespace {

struct Reservation {
  RequestId request_id = 0;
  TokenSinkActor sink;
};

struct FakeDecodeState {
  Epoch epoch = 0;
  uint32_t capacity_tokens = 0;
  ReservationId next_id = 1;
  std::map<ReservationId, Reservation> reservations;
  std::vector<caf::typed_response_promise<ReserveReply>> held;  // never answered
};

std::vector<uint8_t> keys_for(ReservationId id) {
  std::vector<uint8_t> keys(16);
  for (size_t i = 0; i < keys.size(); ++i)
    keys[i] = static_cast<uint8_t>((id * 31 + i) & 0xff);
  return keys;
}

DecodeActor::behavior_type fake_decode(DecodeActor::stateful_pointer<FakeDecodeState> self,
                                       Epoch epoch, uint32_t capacity_tokens) {
  self->state.epoch = epoch;
  self->state.capacity_tokens = capacity_tokens;
  return {
      [self](ReserveRequest& req) -> caf::result<ReserveReply> {
        if (req.max_new_tokens == kHoldForever) {
          self->state.held.push_back(self->make_response_promise<ReserveReply>());
          return caf::delegated<ReserveReply>{};
        }
        ReserveReply reply;
        reply.request_id = req.request_id;
        reply.decode_epoch = self->state.epoch;
        if (req.prompt_tokens + req.max_new_tokens > self->state.capacity_tokens) {
          reply.outcome = ReserveOutcome::kRefused;
          reply.reason = "needs " + std::to_string(req.prompt_tokens + req.max_new_tokens) +
                         " tokens of KV, " + std::to_string(self->state.capacity_tokens) + " free";
          return reply;
        }
        reply.outcome = ReserveOutcome::kGranted;
        reply.reservation_id = self->state.next_id++;
        reply.transfer_keys = keys_for(reply.reservation_id);
        self->state.reservations[reply.reservation_id] = {req.request_id, std::move(req.stream_to)};
        return reply;
      },
      [self](HandoffDone& done) {
        HandoffAck ack;
        ack.request_id = done.request_id;
        if (done.decode_epoch != self->state.epoch) {
          ack.reason = "stale epoch: keys were issued by another incarnation";
          return ack;
        }
        auto it = self->state.reservations.find(done.reservation_id);
        if (it == self->state.reservations.end() || it->second.request_id != done.request_id) {
          ack.reason = "unknown reservation " + std::to_string(done.reservation_id);
          return ack;
        }
        ack.accepted = true;
        TokenSinkActor sink = it->second.sink;
        self->state.reservations.erase(it);
        if (sink) {
          self->send(
              sink,
              TokenChunk{done.request_id, self->state.epoch, 0, {done.first_token}, false, ""});
          self->send(sink, TokenChunk{done.request_id,
                                      self->state.epoch,
                                      1,
                                      {done.first_token + 1, done.first_token + 2},
                                      true,
                                      ""});
        }
        return ack;
      },
      [self](RenewReservation& renew) {
        auto it = self->state.reservations.find(renew.reservation_id);
        return RenewReply{renew.request_id, it != self->state.reservations.end() &&
                                                it->second.request_id == renew.request_id};
      },
      [self](CancelRequest& cancel) {
        CancelReply reply{cancel.request_id, false};
        for (auto it = self->state.reservations.begin(); it != self->state.reservations.end();
             ++it) {
          if (it->second.request_id == cancel.request_id) {
            self->state.reservations.erase(it);
            reply.was_active = true;
            break;
          }
        }
        return reply;
      },
      [self](HealthProbe&) {
        HealthReport report;
        report.role = Role::kDecode;
        report.epoch = self->state.epoch;
        report.node_name = "fake-decode";
        report.active_requests = static_cast<uint32_t>(self->state.reservations.size());
        return report;
      },
  };
}

struct FakePrefillState {
  Epoch epoch = 0;
};

PrefillActor::behavior_type fake_prefill(PrefillActor::stateful_pointer<FakePrefillState> self,
                                         Epoch epoch) {
  self->state.epoch = epoch;
  return {
      [](PrefillRequest& req) {
        PrefillReply reply;
        reply.request_id = req.request_id;
        if (req.prompt.empty()) {
          reply.outcome = PrefillOutcome::kFailed;
          reply.reason = "empty prompt";
          return reply;
        }
        reply.outcome = PrefillOutcome::kDone;
        reply.computed_tokens = static_cast<uint32_t>(req.prompt.size());
        // Echo what the decode target looked like, so the test sees it crossed intact.
        reply.reason = req.target.host + ":" + std::to_string(req.target.port) + "/" +
                       std::to_string(req.target.reservation_id) + "/" +
                       std::to_string(req.target.transfer_keys.size());
        return reply;
      },
      [](CancelRequest& cancel) {
        return CancelReply{cancel.request_id, false};
      },
      [self](HealthProbe&) {
        HealthReport report;
        report.role = Role::kPrefill;
        report.epoch = self->state.epoch;
        report.node_name = "fake-prefill";
        return report;
      },
  };
}

struct FakeGatewayState {
  Epoch epoch = 0;
  std::shared_ptr<TokenCollector> collector;
};

GatewayActor::behavior_type fake_gateway(GatewayActor::stateful_pointer<FakeGatewayState> self,
                                         Epoch epoch, std::shared_ptr<TokenCollector> collector) {
  self->state.epoch = epoch;
  self->state.collector = std::move(collector);
  return {
      [self](TokenChunk& chunk) { self->state.collector->add(std::move(chunk)); },
      [self](HealthProbe&) {
        HealthReport report;
        report.role = Role::kGateway;
        report.epoch = self->state.epoch;
        report.node_name = "fake-gateway";
        return report;
      },
  };
}

}  // namespace

void TokenCollector::add(TokenChunk chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    chunks_.push_back(std::move(chunk));
  }
  cv_.notify_all();
}

std::vector<TokenChunk> TokenCollector::wait_finished(RequestId request_id, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  auto finished = [&] {
    for (const auto& c : chunks_)
      if (c.request_id == request_id && c.finished) return true;
    return false;
  };
  cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), finished);
  std::vector<TokenChunk> out;
  for (const auto& c : chunks_)
    if (c.request_id == request_id) out.push_back(c);
  return out;
}

DecodeActor spawn_fake_decode(caf::actor_system& sys, Epoch epoch, uint32_t capacity_tokens) {
  return sys.spawn(fake_decode, epoch, capacity_tokens);
}

PrefillActor spawn_fake_prefill(caf::actor_system& sys, Epoch epoch) {
  return sys.spawn(fake_prefill, epoch);
}

GatewayActor spawn_fake_gateway(caf::actor_system& sys, Epoch epoch,
                                std::shared_ptr<TokenCollector> collector) {
  return sys.spawn(fake_gateway, epoch, std::move(collector));
}

}  // namespace dserve::actors::testing
