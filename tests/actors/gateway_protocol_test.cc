// The gateway's side of the reserve / hand-off / cancel protocol, against scripted prefill and
// decode workers in their own actor systems over loopback CAF connections (one process). Each
// case waits with bounds far beyond what its event needs and asserts what must hold: if the
// event that should wake the request were lost, the request would end by its deadline instead
// and the case fails.

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <caf/all.hpp>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/decode_interface.h"
#include "dserve/actors/gateway.h"
#include "dserve/actors/prefill_interface.h"
#include "test_runtime.h"

namespace dserve::actors {
namespace {

using namespace std::chrono_literals;

// What a scripted worker saw, and the switches a test flips; shared with the actor.
struct Script {
  std::mutex mu;
  std::condition_variable cv;
  bool full = false;           // decode: refuse reservations (retryable), report no free KV
  bool hold_reserves = false;  // decode: never answer a ReserveRequest
  bool hold_prefills = false;  // prefill: answer a PrefillRequest only when it is cancelled
  std::vector<RequestId> reserves, handoffs, cancels, prefills;
  std::map<uint16_t, DecodeActor> decodes;  // prefill: the decode workers by control port

  void note(std::vector<RequestId> Script::*list, RequestId id) {
    {
      std::lock_guard<std::mutex> lock(mu);
      (this->*list).push_back(id);
    }
    cv.notify_all();
  }
  bool wait_until_seen(std::vector<RequestId> Script::*list, size_t n,
                       std::chrono::milliseconds bound) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, bound, [&] { return (this->*list).size() >= n; });
  }
  size_t count(std::vector<RequestId> Script::*list) {
    std::lock_guard<std::mutex> lock(mu);
    return (this->*list).size();
  }
  template <class F>
  auto with(F f) {
    std::lock_guard<std::mutex> lock(mu);
    return f(*this);
  }
};

struct DecodeState {
  Epoch epoch = 0;
  std::shared_ptr<Script> script;
  ReservationId next = 1;
  std::map<ReservationId, std::pair<RequestId, TokenSinkActor>> reservations;
  std::vector<caf::typed_response_promise<ReserveReply>> held;
};

DecodeActor::behavior_type scripted_decode(DecodeActor::stateful_pointer<DecodeState> self,
                                           Epoch epoch, std::shared_ptr<Script> script) {
  self->state.epoch = epoch;
  self->state.script = std::move(script);
  return {
      [self](ReserveRequest& req) -> caf::result<ReserveReply> {
        auto& s = self->state;
        // The answer is decided before the call is counted: a test that sees the call counted
        // and then changes the script changes only the calls after it.
        const auto [hold, full] =
            s.script->with([](Script& sc) { return std::pair(sc.hold_reserves, sc.full); });
        s.script->note(&Script::reserves, req.request_id);
        if (hold) {
          s.held.push_back(self->make_response_promise<ReserveReply>());
          return caf::delegated<ReserveReply>{};
        }
        ReserveReply reply;
        reply.request_id = req.request_id;
        reply.decode_epoch = s.epoch;
        if (full) {
          reply.outcome = ReserveOutcome::kRefused;
          reply.retryable = true;
          reply.reason = "batch full: 1 of 1 slots held";
          return reply;
        }
        reply.outcome = ReserveOutcome::kGranted;
        reply.reservation_id = s.next++;
        reply.transfer_keys = std::vector<uint8_t>(16, 7);
        s.reservations[reply.reservation_id] = {req.request_id, req.stream_to};
        return reply;
      },
      [self](HandoffDone& done) {
        auto& s = self->state;
        s.script->note(&Script::handoffs, done.request_id);
        HandoffAck ack;
        ack.request_id = done.request_id;
        auto it = s.reservations.find(done.reservation_id);
        if (it == s.reservations.end() || it->second.first != done.request_id) {
          ack.reason = "no such reservation";
          return ack;
        }
        ack.accepted = true;
        TokenSinkActor sink = it->second.second;
        s.reservations.erase(it);
        self->send(sink, TokenChunk{done.request_id, s.epoch, 0, {done.first_token}, false, ""});
        self->send(sink, TokenChunk{done.request_id,
                                    s.epoch,
                                    1,
                                    {done.first_token + 1, done.first_token + 2},
                                    true,
                                    ""});
        return ack;
      },
      [self](RenewReservation& renew) {
        return RenewReply{renew.request_id, true};
      },
      [self](CancelRequest& cancel) {
        auto& s = self->state;
        s.script->note(&Script::cancels, cancel.request_id);
        CancelReply reply{cancel.request_id, false};
        for (auto it = s.reservations.begin(); it != s.reservations.end(); ++it) {
          if (it->second.first == cancel.request_id) {
            s.reservations.erase(it);
            reply.was_active = true;
            break;
          }
        }
        return reply;
      },
      [self](HealthProbe&) {
        auto& s = self->state;
        HealthReport report;
        report.role = Role::kDecode;
        report.epoch = s.epoch;
        report.node_name = "scripted-decode";
        report.queued_requests = static_cast<uint32_t>(s.reservations.size());
        const bool full = s.script->with([](Script& sc) { return sc.full; });
        report.free_kv_bytes = full ? 0 : uint64_t{1} << 30;
        return report;
      },
  };
}

struct PrefillState {
  Epoch epoch = 0;
  std::shared_ptr<Script> script;
  std::map<RequestId, caf::typed_response_promise<PrefillReply>> held;
};

PrefillActor::behavior_type scripted_prefill(PrefillActor::stateful_pointer<PrefillState> self,
                                             Epoch epoch, std::shared_ptr<Script> script) {
  self->state.epoch = epoch;
  self->state.script = std::move(script);
  return {
      [self](PrefillRequest& req) -> caf::result<PrefillReply> {
        auto& s = self->state;
        auto [hold, decode] = s.script->with([&](Script& sc) {
          auto it = sc.decodes.find(req.target.port);
          return std::pair(sc.hold_prefills, it == sc.decodes.end() ? DecodeActor{} : it->second);
        });
        s.script->note(&Script::prefills, req.request_id);
        auto promise = self->make_response_promise<PrefillReply>();
        if (hold) {
          s.held.emplace(req.request_id, promise);
          return caf::delegated<PrefillReply>{};
        }
        // The prompt's "state" is written; the decode worker takes the first token from here.
        HandoffDone done;
        done.request_id = req.request_id;
        done.decode_epoch = req.target.epoch;
        done.reservation_id = req.target.reservation_id;
        done.kv_tokens = static_cast<uint32_t>(req.prompt.size());
        done.first_token = req.prompt.back() + 1;
        const RequestId id = req.request_id;
        self->request(decode, 5s, std::move(done))
            .then(
                [promise, id](const HandoffAck& ack) mutable {
                  PrefillReply reply;
                  reply.request_id = id;
                  reply.outcome = ack.accepted ? PrefillOutcome::kDone : PrefillOutcome::kFailed;
                  reply.reason = ack.reason;
                  promise.deliver(reply);
                },
                [promise, id](caf::error&) mutable {
                  PrefillReply reply;
                  reply.request_id = id;
                  reply.outcome = PrefillOutcome::kFailed;
                  reply.reason = "hand-off call failed";
                  promise.deliver(reply);
                });
        return caf::delegated<PrefillReply>{};
      },
      [self](CancelRequest& cancel) {
        auto& s = self->state;
        s.script->note(&Script::cancels, cancel.request_id);
        auto it = s.held.find(cancel.request_id);
        if (it == s.held.end()) return CancelReply{cancel.request_id, false};
        PrefillReply reply;
        reply.request_id = cancel.request_id;
        reply.outcome = PrefillOutcome::kFailed;
        reply.reason = "cancelled";
        it->second.deliver(reply);
        s.held.erase(it);
        return CancelReply{cancel.request_id, true};
      },
      [self](HealthProbe&) {
        HealthReport report;
        report.role = Role::kPrefill;
        report.epoch = self->state.epoch;
        report.node_name = "scripted-prefill";
        return report;
      },
  };
}

using testing::start_runtime;

// A gateway, one scripted prefill worker and `decodes` scripted decode workers, each in its
// own actor system.
class GatewayProtocol : public ::testing::Test {
 protected:
  void start(size_t decodes, GatewayOptions options) {
    prefill_rt_ = start_runtime(Role::kPrefill);
    auto pre = prefill_rt_->publish(
        prefill_rt_->system().spawn(scripted_prefill, prefill_rt_->epoch(), prefill_script_));
    ASSERT_TRUE(pre.is_ok()) << pre.status().to_string();
    options.prefill_workers.push_back({"127.0.0.1", *pre});
    for (size_t i = 0; i < decodes; ++i) {
      decode_scripts_.push_back(std::make_shared<Script>());
      decode_rts_.push_back(start_runtime(Role::kDecode));
      ActorRuntime& rt = *decode_rts_.back();
      const DecodeActor actor = rt.system().spawn(scripted_decode, rt.epoch(), decode_scripts_[i]);
      auto port = rt.publish(actor);
      ASSERT_TRUE(port.is_ok()) << port.status().to_string();
      // The prefill worker reaches the decode worker through its own connection, as in a cluster.
      auto remote = prefill_rt_->connect<DecodeActor>("127.0.0.1", *port, 2000ms);
      ASSERT_TRUE(remote.is_ok()) << remote.status().to_string();
      prefill_script_->with([&](Script& s) { return s.decodes[*port] = *remote; });
      options.decode_workers.push_back({"127.0.0.1", *port});
    }
    options.probe_interval = 50ms;
    gateway_rt_ = start_runtime(Role::kGateway);
    auto gw = Gateway::start(*gateway_rt_, std::move(options));
    ASSERT_TRUE(gw.is_ok()) << gw.status().to_string();
    gateway_ = std::move(gw).value();
    ASSERT_TRUE(gateway_->wait_ready(10s).is_ok());
    // wait_ready needs one worker of each pool; the cases need all of them.
    const auto until = std::chrono::steady_clock::now() + 10s;
    for (;;) {
      const GatewaySnapshot snap = gateway_->snapshot();
      const bool all = std::all_of(snap.workers.begin(), snap.workers.end(),
                                   [](const WorkerView& w) { return w.healthy; });
      if (all) break;
      ASSERT_LT(std::chrono::steady_clock::now(), until) << "not every worker became healthy";
      std::this_thread::sleep_for(10ms);
    }
  }

  void TearDown() override {
    gateway_.reset();
    gateway_rt_.reset();
    decode_rts_.clear();
    prefill_rt_.reset();
  }

  // Runs one request on its own thread; its outcome once it ends.
  struct Running {
    std::thread thread;
    GenerateOutcome outcome;
    std::vector<TokenId> tokens;
    ~Running() {
      if (thread.joinable()) thread.join();  // a failed assertion left before joining
    }
  };
  std::unique_ptr<Running> submit(const std::string& id, int64_t deadline_ms_from_now) {
    auto r = std::make_unique<Running>();
    GenerateJob job;
    job.prompt = {11, 12, 13};
    job.max_new_tokens = 3;
    job.request_id = id;
    job.client = "tester";
    job.deadline_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count() +
                           deadline_ms_from_now;
    Running* raw = r.get();
    r->thread = std::thread([this, raw, job] {
      raw->outcome = gateway_->generate(
          job,
          [raw](std::span<const TokenId> t, uint32_t) {
            raw->tokens.insert(raw->tokens.end(), t.begin(), t.end());
          },
          nullptr);
    });
    return r;
  }

  std::shared_ptr<Script> prefill_script_ = std::make_shared<Script>();
  std::vector<std::shared_ptr<Script>> decode_scripts_;
  std::unique_ptr<ActorRuntime> prefill_rt_;
  std::vector<std::unique_ptr<ActorRuntime>> decode_rts_;
  std::unique_ptr<ActorRuntime> gateway_rt_;
  std::unique_ptr<Gateway> gateway_;
};

const std::vector<TokenId> kExpected = {14, 15, 16};

// Every decode worker refuses for lack of room; the request waits, holding nothing, and is
// granted once the worker reports room. capacity_retry is far beyond the deadline, so only the
// report's event can wake it in time.
TEST_F(GatewayProtocol, ReserveRefusedThenGrantedWhenTheWorkerReportsRoom) {
  GatewayOptions options;
  options.capacity_retry = 60s;
  start(1, options);
  Script& decode = *decode_scripts_[0];
  decode.with([](Script& s) { return s.full = true; });
  auto run = submit("refused-then-granted", 20000);
  ASSERT_TRUE(decode.wait_until_seen(&Script::reserves, 1, 10s));
  EXPECT_EQ(prefill_script_->count(&Script::prefills), 0u) << "no prefill before a reservation";
  decode.with([](Script& s) { return s.full = false; });
  run->thread.join();
  ASSERT_TRUE(run->outcome.status.is_ok()) << run->outcome.status.to_string();
  EXPECT_EQ(run->tokens, kExpected);
  EXPECT_EQ(run->outcome.attempts, 1u) << "waiting for room is not a replay";
  EXPECT_GE(decode.count(&Script::reserves), 2u);
  EXPECT_EQ(decode.count(&Script::cancels), 0u);
}

// The decode worker asked first dies while it holds the reservation call; the request goes on
// to the other one in the same attempt and nothing is owed to the dead one.
TEST_F(GatewayProtocol, DecodeWorkerLostDuringReserveMovesOnToTheNext) {
  GatewayOptions options;
  options.reserve_timeout = 60s;
  options.capacity_retry = 60s;  // no waiting for room either: the next worker is asked at once
  start(2, options);
  // Both are empty and report the same room: the first listed is asked first.
  decode_scripts_[0]->with([](Script& s) { return s.hold_reserves = true; });
  auto run = submit("lost-during-reserve", 20000);
  ASSERT_TRUE(decode_scripts_[0]->wait_until_seen(&Script::reserves, 1, 10s));
  decode_rts_[0].reset();  // the process is gone: its connection drops
  run->thread.join();
  ASSERT_TRUE(run->outcome.status.is_ok()) << run->outcome.status.to_string();
  EXPECT_EQ(run->tokens, kExpected);
  EXPECT_EQ(decode_scripts_[1]->count(&Script::reserves), 1u);
  EXPECT_EQ(decode_scripts_[1]->count(&Script::handoffs), 1u);
  const GatewaySnapshot snap = gateway_->snapshot();
  size_t healthy_decodes = 0;
  for (const WorkerView& w : snap.workers)
    healthy_decodes += w.role == Role::kDecode && w.healthy;
  EXPECT_EQ(healthy_decodes, 1u);
}

// Cancelled while its prefill runs (the hand-off not yet done): the request ends at once as
// CANCELLED and both workers are told to drop it. Nothing else would wake the request before
// its deadline: no CancelCheck, and renewals far apart.
TEST_F(GatewayProtocol, CancelDuringTheHandoffReleasesBothWorkers) {
  GatewayOptions options;
  options.reservation_renewal = 60s;
  start(1, options);
  prefill_script_->with([](Script& s) { return s.hold_prefills = true; });
  auto run = submit("cancelled-in-handoff", 60000);
  ASSERT_TRUE(prefill_script_->wait_until_seen(&Script::prefills, 1, 10s));
  const auto cancelled_at = std::chrono::steady_clock::now();
  ASSERT_TRUE(gateway_->cancel("cancelled-in-handoff", "tester", false).is_ok());
  run->thread.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - cancelled_at).count();
  EXPECT_EQ(run->outcome.status.code(), StatusCode::kCancelled) << run->outcome.status.to_string();
  EXPECT_TRUE(run->tokens.empty());
  EXPECT_TRUE(decode_scripts_[0]->wait_until_seen(&Script::cancels, 1, 10s));
  EXPECT_TRUE(prefill_script_->wait_until_seen(&Script::cancels, 1, 10s));
  EXPECT_EQ(decode_scripts_[0]->count(&Script::handoffs), 0u);
  // Woken by the cancel, not found by the next timer: the renewal is a minute away and the
  // deadline too, so ending within half of it holds on any load (and the time is reported).
  std::printf("cancel to the request's end: %.3f s\n", seconds);
  EXPECT_LT(seconds, 30.0);
  const GatewaySnapshot snap = gateway_->snapshot();
  EXPECT_EQ(snap.running, 0u);
  EXPECT_EQ(snap.counters.cancelled, 1u);
  for (const WorkerView& w : snap.workers)
    EXPECT_EQ(w.placed, 0u) << w.address;
}

}  // namespace
}  // namespace dserve::actors
