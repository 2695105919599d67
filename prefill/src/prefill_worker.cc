#include "dserve/prefill/prefill_worker.h"

#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/model/state_packing.h"

namespace dserve::prefill {
namespace {

using namespace actors;  // NOLINT: the message vocabulary
using step_atom = caf::atom_constant<caf::atom("pre_step")>;

using PrefillWorkerActor = PrefillActor::extend<caf::reacts_to<step_atom>>;

struct Pending {
  PrefillRequest request;
  caf::typed_response_promise<PrefillReply> promise;
  Clock::time_point deadline;
  Clock::time_point accepted = Clock::now();
};

uint32_t elapsed_us(Clock::time_point since) {
  return static_cast<uint32_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - since).count());
}

struct WorkerState {
  model::PrefixCache* cache = nullptr;
  const model::Model* model = nullptr;
  kvstore::TransferEngine* engine = nullptr;
  Epoch epoch = 0;
  std::string node_name;
  PrefillWorkerOptions options;
  std::unique_ptr<PrefillScheduler> scheduler;
  uint64_t next_id = 1;
  std::map<uint64_t, Pending> pending;  // scheduler id -> request
  bool stepping = false;
  uint64_t handoffs_rejected = 0;  // HandoffAck with accepted = false
  uint64_t injected_faults = 0;    // hand-offs corrupted on purpose (inject_corrupt_handoffs)
};

PrefillReply failed(RequestId id, std::string reason) {
  PrefillReply r;
  r.request_id = id;
  r.outcome = actors::PrefillOutcome::kFailed;
  r.reason = std::move(reason);
  return r;
}

std::chrono::milliseconds left_until(Clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(1),
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
}

// Writes the state and logits into the decode worker's region; returns the HandoffDone to send.
Result<HandoffDone> write_state(WorkerState& st, const PrefillRequest& req,
                                const model::PrefillResult& result) {
  auto keys = kvstore::decode_handoff_keys(req.target.transfer_keys);
  if (!keys.is_ok()) return keys.status();
  const std::vector<uint8_t> packed = model::pack_state(st.model->config(), result.state);
  const uint64_t logit_bytes = static_cast<uint64_t>(result.last_logits.numel()) * sizeof(float);
  if (packed.size() + logit_bytes > keys->region.bytes) {
    return invalid_argument("the decode region holds " + std::to_string(keys->region.bytes) +
                            " bytes, the state and logits need " +
                            std::to_string(packed.size() + logit_bytes));
  }
  auto peer = st.engine->connect(keys->peer);
  if (!peer.is_ok()) return peer.status();
  const kvstore::PutOp ops[2] = {{packed.data(), packed.size(), 0},
                                 {result.last_logits.data(), logit_bytes, packed.size()}};
  auto digests = st.engine->put(*peer, keys->region, ops);
  if (!digests.is_ok()) return digests.status();
  if (st.injected_faults < st.options.inject_corrupt_handoffs) {
    // Fault injection (tests): the bytes that land are no longer those the digests vouch for.
    ++st.injected_faults;
    const uint8_t flipped = static_cast<uint8_t>(packed[0] ^ 0xffu);
    const kvstore::PutOp corrupt[1] = {{&flipped, 1, 0}};
    if (auto bad = st.engine->put(*peer, keys->region, corrupt); !bad.is_ok()) return bad.status();
  }
  const auto logits = result.last_logits.span();
  HandoffDone done;
  done.request_id = req.request_id;
  done.reservation_id = req.target.reservation_id;
  done.decode_epoch = req.target.epoch;
  done.kv_tokens = static_cast<uint32_t>(result.state.position());
  done.state_checksum = (*digests)[0].xxh3;
  // Informational (the greedy choice); the decode side samples from the logits itself.
  done.first_token =
      static_cast<TokenId>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  done.span_digests = kvstore::encode_digests(*digests);
  return done;
}

// Sends `done` to the decode actor at the target's address and answers the gateway with its ack:
// `reply` (counts and timings filled in) marked done, or a failure.
void send_handoff(PrefillWorkerActor::stateful_pointer<WorkerState> self, Pending p,
                  HandoffDone done, PrefillReply reply, Clock::time_point transfer_start) {
  const std::string where = p.request.target.host + ":" + std::to_string(p.request.target.port);
  auto shared = std::make_shared<Pending>(std::move(p));
  // The middleman's connect request instead of remote_actor(): the latter has no bound.
  self->request(self->system().middleman().actor_handle(), left_until(shared->deadline),
                caf::connect_atom::value, shared->request.target.host, shared->request.target.port)
      .then(
          [self, shared, where, done, reply, transfer_start](
              caf::node_id&, caf::strong_actor_ptr& ptr, std::set<std::string>&) mutable {
            const RequestId id = shared->request.request_id;
            if (!ptr) {
              shared->promise.deliver(failed(id, "no decode worker published at " + where));
              return;
            }
            auto decode = caf::actor_cast<DecodeActor>(ptr);
            self->request(decode, left_until(shared->deadline), std::move(done))
                .then(
                    [self, shared, id, where, reply, transfer_start](HandoffAck& ack) mutable {
                      if (!ack.accepted) {
                        ++self->state.handoffs_rejected;
                        shared->promise.deliver(failed(
                            id, "decode worker " + where + " refused the hand-off: " + ack.reason));
                        return;
                      }
                      reply.outcome = actors::PrefillOutcome::kDone;
                      reply.handoff_us = elapsed_us(transfer_start);
                      shared->promise.deliver(std::move(reply));
                    },
                    [self, shared, id, where](caf::error& err) {
                      shared->promise.deliver(
                          failed(id, "hand-off to decode worker " + where +
                                         " failed: " + self->system().render(err)));
                    });
          },
          [self, shared, where](caf::error& err) {
            shared->promise.deliver(
                failed(shared->request.request_id,
                       "cannot reach decode worker " + where + ": " + self->system().render(err)));
          });
}

PrefillWorkerActor::behavior_type prefill_worker(
    PrefillWorkerActor::stateful_pointer<WorkerState> self, model::PrefixCache* cache,
    const model::Model* model, kvstore::TransferEngine* engine, Epoch epoch, std::string node_name,
    PrefillWorkerOptions options) {
  auto& st = self->state;
  st.cache = cache;
  st.model = model;
  st.engine = engine;
  st.epoch = epoch;
  st.node_name = std::move(node_name);
  st.options = options;
  st.scheduler = std::make_unique<PrefillScheduler>(*cache, options.scheduler);
  auto kick = [self] {
    if (self->state.stepping || self->state.scheduler->empty()) return;
    self->state.stepping = true;
    self->send(self, step_atom::value);
  };
  return {
      [self, kick](PrefillRequest& req) -> caf::result<PrefillReply> {
        auto& s = self->state;
        if (Status v = validate(req); !v.is_ok()) return failed(req.request_id, v.to_string());
        Clock::time_point deadline = Clock::now() + s.options.default_deadline;
        if (req.deadline_unix_ms > 0) {
          const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count();
          deadline = Clock::now() + std::chrono::milliseconds(req.deadline_unix_ms - now_ms);
          if (req.deadline_unix_ms <= now_ms)
            return failed(req.request_id, "deadline passed before prefill started");
        }
        const uint64_t id = s.next_id++;
        if (Status sub = s.scheduler->submit(id, req.prompt, deadline); !sub.is_ok())
          return failed(req.request_id, "prefill refused: " + sub.to_string());
        auto promise = self->make_response_promise<PrefillReply>();
        s.pending.emplace(id, Pending{std::move(req), promise, deadline});
        kick();
        return promise;
      },
      [self](CancelRequest& cancel) {
        CancelReply reply{cancel.request_id, false};
        for (auto& [id, p] : self->state.pending) {
          if (p.request.request_id == cancel.request_id) {
            self->state.scheduler->cancel(id);
            reply.was_active = true;
          }
        }
        return reply;
      },
      [self](HealthProbe&) {
        auto& s = self->state;
        HealthReport report;
        report.role = Role::kPrefill;
        report.epoch = s.epoch;
        report.node_name = s.node_name;
        report.active_requests = static_cast<uint32_t>(s.pending.size());
        report.queued_requests = static_cast<uint32_t>(s.scheduler->queued());
        const model::KvPagePools& pools = s.model->page_pools();
        auto count = [&report](const kvstore::PagePool& pool) {
          report.kv_pages_in_use += static_cast<uint64_t>(pool.pages_in_use());
          report.kv_page_bytes_in_use += pool.bytes_in_use();
        };
        for (const auto* group : {&pools.compressed, &pools.index_keys}) {
          for (const auto& pool : *group) {
            if (pool) count(*pool);  // a sliding-window layer has no pool
          }
        }
        count(*s.cache->layout().snapshot_pool);
        report.cached_kv_bytes =
            s.cache->store().metrics().tiers[static_cast<size_t>(kvstore::Tier::kDevice)].bytes;
        report.handoffs_rejected = s.handoffs_rejected;
        report.injected_faults = s.injected_faults;
        return report;
      },
      [self, kick](step_atom) {
        auto& s = self->state;
        s.stepping = false;
        std::vector<prefill::PrefillOutcome> outcomes;
        {
          std::unique_lock<std::mutex> device;
          if (s.options.compute_lock) device = std::unique_lock(*s.options.compute_lock);
          outcomes = s.scheduler->step();
        }
        for (prefill::PrefillOutcome& out : outcomes) {
          auto it = s.pending.find(out.id);
          if (it == s.pending.end()) continue;
          Pending p = std::move(it->second);
          s.pending.erase(it);
          const RequestId rid = p.request.request_id;
          if (!out.status.is_ok() || !out.result) {
            p.promise.deliver(failed(rid, "prefill failed: " + out.status.to_string()));
            continue;
          }
          if (Clock::now() >= p.deadline) {
            p.promise.deliver(failed(rid, "deadline passed during prefill"));
            continue;
          }
          PrefillReply reply;
          reply.request_id = rid;
          reply.cached_prefix_tokens = static_cast<uint32_t>(out.result->reused_tokens);
          reply.computed_tokens = static_cast<uint32_t>(out.result->computed_tokens);
          reply.prefill_ms = elapsed_us(p.accepted) / 1000;
          reply.transfer_bytes =
              model::packed_state_bytes(s.model->config(), out.result->state.position()) +
              static_cast<uint64_t>(out.result->last_logits.numel()) * sizeof(float);
          const auto transfer_start = Clock::now();
          auto done = write_state(s, p.request, *out.result);
          if (!done.is_ok()) {
            p.promise.deliver(
                failed(rid, "transfer to the decode worker failed: " + done.status().to_string()));
            continue;
          }
          reply.transfer_us = elapsed_us(transfer_start);
          send_handoff(self, std::move(p), std::move(done).value(), std::move(reply),
                       transfer_start);
        }
        kick();
      },
  };
}

}  // namespace

PrefillActor spawn_prefill_worker(caf::actor_system& system, model::PrefixCache& cache,
                                  const model::Model& model, kvstore::TransferEngine& engine,
                                  Epoch epoch, std::string node_name,
                                  PrefillWorkerOptions options) {
  auto worker =
      system.spawn(prefill_worker, &cache, &model, &engine, epoch, std::move(node_name), options);
  return caf::actor_cast<PrefillActor>(worker);
}

}  // namespace dserve::prefill
