#include "dserve/prefill/prefill_worker.h"

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/decode_interface.h"
#include "dserve/kvstore/handoff_keys.h"
#include "dserve/model/state_handoff.h"
#include "dserve/ops/log.h"
#include "dserve/ops/metrics.h"

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

double seconds_since(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// The worker's metrics in a registry (PrefillWorkerOptions::metrics); see prefill_worker.h.
struct PrefillMetrics {
  explicit PrefillMetrics(ops::MetricsRegistry& r)
      : step_seconds(r.histogram("dserve_prefill_step_duration_seconds",
                                 "Duration of one prefill scheduler step.",
                                 ops::latency_buckets_seconds())),
        step_tokens(r.histogram("dserve_prefill_step_tokens",
                                "Prompt tokens computed by one scheduler step (the batch).",
                                ops::exponential_buckets(16, 2, 10))),
        queued_requests(
            r.gauge("dserve_prefill_queued_requests", "Requests accepted and not yet prefilled.")),
        queued_tokens(r.gauge("dserve_prefill_queued_tokens",
                              "Prompt tokens of the requests accepted and not yet prefilled.")),
        done(r.counter("dserve_prefill_requests_total", "Prefill requests answered, by outcome.",
                       {{"outcome", "done"}})),
        failed(r.counter("dserve_prefill_requests_total", "Prefill requests answered, by outcome.",
                         {{"outcome", "failed"}})),
        transfer_bytes(r.counter("dserve_prefill_kv_transfer_bytes_total",
                                 "KV state and logit bytes written into decode workers' regions.")),
        transfer_seconds(r.histogram("dserve_prefill_kv_transfer_seconds",
                                     "Time to write one request's state into a decode worker.",
                                     ops::latency_buckets_seconds())),
        handoffs_rejected(r.counter("dserve_prefill_handoffs_rejected_total",
                                    "Hand-offs the decode worker refused.")),
        lookups(r.counter("dserve_kv_store_lookups_total", "Prefix store lookups.")),
        hits(r.counter("dserve_kv_store_hits_total", "Lookups that reused at least one block.")),
        lookup_tokens(r.counter("dserve_kv_store_lookup_tokens_total",
                                "Tokens (whole blocks) the lookups could have reused.")),
        hit_tokens(r.counter("dserve_kv_store_hit_tokens_total", "Tokens the lookups reused.")) {
    for (int t = 0; t < kvstore::kTierCount; ++t) {
      const ops::Labels tier{
          {"tier", std::string(kvstore::tier_name(static_cast<kvstore::Tier>(t)))}};
      tier_bytes[t] =
          &r.gauge("dserve_kv_store_tier_bytes", "Bytes the prefix store keeps, by tier.", tier);
      tier_blocks[t] = &r.gauge("dserve_kv_store_tier_blocks",
                                "Blocks with a payload in the prefix store, by tier.", tier);
      tier_hit_tokens[t] = &r.counter("dserve_kv_store_tier_hit_tokens_total",
                                      "Tokens reused from each tier.", tier);
      tier_hit_blocks[t] = &r.counter("dserve_kv_store_tier_hit_blocks_total",
                                      "Blocks reused from each tier.", tier);
      tier_evictions[t] = &r.counter("dserve_kv_store_tier_evictions_total",
                                     "Blocks moved down or dropped from each tier.", tier);
    }
  }

  // Brings the store's gauges to `m` and its counters forward by what `m` adds to the last
  // snapshot (the store's counts only grow).
  void refresh_store(const kvstore::PrefixStoreMetrics& m) {
    auto add = [](ops::Counter& c, uint64_t now, uint64_t before) {
      if (now > before) c.inc(static_cast<double>(now - before));
    };
    add(lookups, m.lookups, last.lookups);
    add(hits, m.hits, last.hits);
    add(lookup_tokens, m.lookup_tokens, last.lookup_tokens);
    add(hit_tokens, m.hit_tokens, last.hit_tokens);
    for (int t = 0; t < kvstore::kTierCount; ++t) {
      const kvstore::TierMetrics &now = m.tiers[t], &before = last.tiers[t];
      tier_bytes[t]->set(static_cast<double>(now.bytes));
      tier_blocks[t]->set(static_cast<double>(now.blocks));
      add(*tier_hit_tokens[t], now.hit_tokens, before.hit_tokens);
      add(*tier_hit_blocks[t], now.hit_blocks, before.hit_blocks);
      add(*tier_evictions[t], now.evictions, before.evictions);
    }
    last = m;
  }

  ops::Histogram &step_seconds, &step_tokens;
  ops::Gauge &queued_requests, &queued_tokens;
  ops::Counter &done, &failed, &transfer_bytes;
  ops::Histogram& transfer_seconds;
  ops::Counter &handoffs_rejected, &lookups, &hits, &lookup_tokens, &hit_tokens;
  std::array<ops::Gauge*, kvstore::kTierCount> tier_bytes{}, tier_blocks{};
  std::array<ops::Counter*, kvstore::kTierCount> tier_hit_tokens{}, tier_hit_blocks{},
      tier_evictions{};
  kvstore::PrefixStoreMetrics last;  // what the counters already count
};

struct WorkerState {
  model::PrefixCache* cache = nullptr;
  model::Engine* compute = nullptr;  // the cache's engine: the model on its device
  kvstore::Transport* transport = nullptr;
  Epoch epoch = 0;
  std::string node_name;
  PrefillWorkerOptions options;
  std::unique_ptr<PrefillScheduler> scheduler;
  uint64_t next_id = 1;
  std::map<uint64_t, Pending> pending;  // scheduler id -> request
  bool stepping = false;
  uint64_t handoffs_rejected = 0;  // HandoffAck with accepted = false
  uint64_t injected_faults = 0;    // hand-offs corrupted on purpose (inject_corrupt_handoffs)
  uint64_t queued_tokens = 0;      // prompt tokens of `pending` not yet prefilled
  std::unique_ptr<PrefillMetrics> metrics;

  void refresh_gauges() {
    if (!metrics) return;
    metrics->queued_requests.set(static_cast<double>(scheduler->queued()));
    metrics->queued_tokens.set(static_cast<double>(queued_tokens));
    metrics->refresh_store(cache->store().metrics());
  }
};

PrefillReply failed(RequestId id, std::string reason);

// Logs and counts a failed request; returns the reply that says so.
PrefillReply fail(WorkerState& st, const PrefillRequest& req, std::string reason) {
  if (st.metrics) st.metrics->failed.inc();
  if (st.options.log) {
    st.options.log->warn(
        "prefill_failed", req.trace_id,
        {{"attempt_id", req.request_id}, {"prompt_tokens", req.prompt.size()}, {"reason", reason}});
  }
  return failed(req.request_id, std::move(reason));
}

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

// Writes the state (its small part, then every page from where it lies: state_handoff.h) and
// the logits into the decode worker's region; returns the HandoffDone to send.
Result<HandoffDone> write_state(WorkerState& st, const PrefillRequest& req,
                                const model::PrefillResult& result) {
  auto keys = kvstore::decode_handoff_keys(req.target.transfer_keys);
  if (!keys.is_ok()) return keys.status();
  auto source = model::handoff_source(*st.compute, *result.request);
  if (!source.is_ok()) return source.status();
  const uint64_t logit_bytes = static_cast<uint64_t>(result.last_logits.numel()) * sizeof(float);
  if (source->bytes + logit_bytes > keys->region.bytes) {
    return invalid_argument("the decode region holds " + std::to_string(keys->region.bytes) +
                            " bytes, the state and logits need " +
                            std::to_string(source->bytes + logit_bytes));
  }
  auto peer = st.transport->connect(keys->peer);
  if (!peer.is_ok()) return peer.status();
  std::vector<kvstore::PutOp> ops = source->ops;
  ops.push_back({result.last_logits.data(), logit_bytes, source->bytes});
  auto digests = st.transport->put(*peer, keys->region, ops);
  if (!digests.is_ok()) return digests.status();
  if (st.injected_faults < st.options.inject_corrupt_handoffs) {
    // Fault injection (tests): the bytes that land are no longer those the digests vouch for:
    // a byte of the last page (the small part when the state has none yet).
    ++st.injected_faults;
    const kvstore::PutOp& victim = source->ops.back();
    const uint8_t flipped =
        static_cast<uint8_t>(*static_cast<const uint8_t*>(victim.local) ^ 0xffu);
    const kvstore::PutOp corrupt[1] = {{&flipped, 1, victim.remote_offset}};
    if (auto bad = st.transport->put(*peer, keys->region, corrupt); !bad.is_ok())
      return bad.status();
  }
  // One digest per run of pages (a bounded control message), then the logits'.
  auto runs = model::handoff_run_digests(st.compute->config(), result.request->position(),
                                         std::span(*digests).first(digests->size() - 1));
  if (!runs.is_ok()) return runs.status();
  runs->push_back(digests->back());
  const auto logits = result.last_logits.span();
  HandoffDone done;
  done.request_id = req.request_id;
  done.reservation_id = req.target.reservation_id;
  done.decode_epoch = req.target.epoch;
  done.kv_tokens = static_cast<uint32_t>(result.request->position());
  done.state_checksum = (*digests)[0].xxh3;
  // Informational (the greedy choice); the decode side samples from the logits itself.
  done.first_token =
      static_cast<TokenId>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  done.span_digests = kvstore::encode_digests(*runs);
  return done;
}

// Sends `done` to the decode actor at the target's address and answers the gateway with its ack:
// `reply` (counts and timings filled in) marked done, or a failure.
void send_handoff(PrefillWorkerActor::stateful_pointer<WorkerState> self, Pending p,
                  HandoffDone done, PrefillReply reply, Clock::time_point transfer_start) {
  const std::string where = p.request.target.host + ":" + std::to_string(p.request.target.port);
  auto shared = std::make_shared<Pending>(std::move(p));
  // The middleman's connect request instead of remote_actor(): the latter has no bound. Over
  // the control plane's TLS when the process runs with it (control_connector).
  self->request(actors::control_connector(self->system()), left_until(shared->deadline),
                caf::connect_atom::value, shared->request.target.host, shared->request.target.port)
      .then(
          [self, shared, where, done, reply, transfer_start](
              caf::node_id&, caf::strong_actor_ptr& ptr, std::set<std::string>&) mutable {
            const RequestId id = shared->request.request_id;
            if (!ptr) {
              shared->promise.deliver(
                  fail(self->state, shared->request, "no decode worker published at " + where));
              return;
            }
            auto decode = caf::actor_cast<DecodeActor>(ptr);
            self->request(decode, left_until(shared->deadline), std::move(done))
                .then(
                    [self, shared, id, where, reply, transfer_start](HandoffAck& ack) mutable {
                      auto& s = self->state;
                      if (!ack.accepted) {
                        ++s.handoffs_rejected;
                        if (s.metrics) s.metrics->handoffs_rejected.inc();
                        shared->promise.deliver(fail(
                            s, shared->request,
                            "decode worker " + where + " refused the hand-off: " + ack.reason));
                        return;
                      }
                      reply.outcome = actors::PrefillOutcome::kDone;
                      reply.handoff_us = elapsed_us(transfer_start);
                      if (s.metrics) s.metrics->done.inc();
                      if (s.options.log) {
                        s.options.log->info("prefill_done", shared->request.trace_id,
                                            {{"attempt_id", id},
                                             {"prompt_tokens", shared->request.prompt.size()},
                                             {"cached_tokens", reply.cached_prefix_tokens},
                                             {"computed_tokens", reply.computed_tokens},
                                             {"prefill_ms", reply.prefill_ms},
                                             {"transfer_bytes", reply.transfer_bytes},
                                             {"transfer_us", reply.transfer_us},
                                             {"handoff_us", reply.handoff_us},
                                             {"decode", where}});
                      }
                      shared->promise.deliver(std::move(reply));
                    },
                    [self, shared, where](caf::error& err) {
                      shared->promise.deliver(fail(self->state, shared->request,
                                                   "hand-off to decode worker " + where +
                                                       " failed: " + self->system().render(err)));
                    });
          },
          [self, shared, where](caf::error& err) {
            shared->promise.deliver(
                fail(self->state, shared->request,
                     "cannot reach decode worker " + where + ": " + self->system().render(err)));
          });
}

PrefillWorkerActor::behavior_type prefill_worker(
    PrefillWorkerActor::stateful_pointer<WorkerState> self, model::PrefixCache* cache,
    kvstore::Transport* transport, Epoch epoch, std::string node_name,
    PrefillWorkerOptions options) {
  auto& st = self->state;
  st.cache = cache;
  st.compute = &cache->engine();
  st.transport = transport;
  st.epoch = epoch;
  st.node_name = std::move(node_name);
  st.options = options;
  st.scheduler = std::make_unique<PrefillScheduler>(*cache, options.scheduler);
  if (options.metrics) st.metrics = std::make_unique<PrefillMetrics>(*options.metrics);
  st.refresh_gauges();
  auto kick = [self] {
    if (self->state.stepping || self->state.scheduler->empty()) return;
    self->state.stepping = true;
    self->send(self, step_atom::value);
  };
  return {
      [self, kick](PrefillRequest& req) -> caf::result<PrefillReply> {
        auto& s = self->state;
        if (Status v = validate(req); !v.is_ok()) {
          req.trace_id.resize(std::min(req.trace_id.size(), kMaxTraceIdBytes));
          return fail(s, req, v.to_string());
        }
        Clock::time_point deadline = Clock::now() + s.options.default_deadline;
        if (req.deadline_unix_ms > 0) {
          const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count();
          deadline = Clock::now() + std::chrono::milliseconds(req.deadline_unix_ms - now_ms);
          if (req.deadline_unix_ms <= now_ms)
            return fail(s, req, "deadline passed before prefill started");
        }
        const uint64_t id = s.next_id++;
        if (Status sub = s.scheduler->submit(id, req.prompt, deadline); !sub.is_ok())
          return fail(s, req, "prefill refused: " + sub.to_string());
        auto promise = self->make_response_promise<PrefillReply>();
        s.queued_tokens += req.prompt.size();
        s.pending.emplace(id, Pending{std::move(req), promise, deadline});
        s.refresh_gauges();
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
        const model::KvPagePools& pools = s.compute->page_pools();
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
        // Probed every few hundred ms: keeps the store's gauges fresh while the worker idles
        // (the disk tier writes in the background).
        s.refresh_gauges();
        return report;
      },
      [self, kick](step_atom) {
        auto& s = self->state;
        s.stepping = false;
        const auto step_start = Clock::now();
        std::vector<prefill::PrefillOutcome> outcomes = s.scheduler->step();
        if (s.metrics) {
          s.metrics->step_seconds.observe(seconds_since(step_start));
          s.metrics->step_tokens.observe(static_cast<double>(s.scheduler->last_step_tokens()));
        }
        for (prefill::PrefillOutcome& out : outcomes) {
          auto it = s.pending.find(out.id);
          if (it == s.pending.end()) continue;
          Pending p = std::move(it->second);
          s.pending.erase(it);
          s.queued_tokens -= std::min<uint64_t>(s.queued_tokens, p.request.prompt.size());
          const RequestId rid = p.request.request_id;
          if (!out.status.is_ok() || !out.result) {
            p.promise.deliver(fail(s, p.request, "prefill failed: " + out.status.to_string()));
            continue;
          }
          if (Clock::now() >= p.deadline) {
            p.promise.deliver(fail(s, p.request, "deadline passed during prefill"));
            continue;
          }
          PrefillReply reply;
          reply.request_id = rid;
          reply.cached_prefix_tokens = static_cast<uint32_t>(out.result->reused_tokens);
          reply.computed_tokens = static_cast<uint32_t>(out.result->computed_tokens);
          reply.prefill_ms = elapsed_us(p.accepted) / 1000;
          reply.transfer_bytes =
              model::handoff_bytes(s.compute->config(), out.result->request->position()) +
              static_cast<uint64_t>(out.result->last_logits.numel()) * sizeof(float);
          const auto transfer_start = Clock::now();
          auto done = write_state(s, p.request, *out.result);
          if (!done.is_ok()) {
            p.promise.deliver(
                fail(s, p.request,
                     "transfer to the decode worker failed: " + done.status().to_string()));
            continue;
          }
          reply.transfer_us = elapsed_us(transfer_start);
          if (s.metrics) {
            s.metrics->transfer_bytes.inc(static_cast<double>(reply.transfer_bytes));
            s.metrics->transfer_seconds.observe(reply.transfer_us / 1e6);
          }
          send_handoff(self, std::move(p), std::move(done).value(), std::move(reply),
                       transfer_start);
        }
        s.refresh_gauges();
        kick();
      },
  };
}

}  // namespace

PrefillActor spawn_prefill_worker(caf::actor_system& system, model::PrefixCache& cache,
                                  kvstore::Transport& transport, Epoch epoch, std::string node_name,
                                  PrefillWorkerOptions options) {
  auto worker =
      system.spawn(prefill_worker, &cache, &transport, epoch, std::move(node_name), options);
  return caf::actor_cast<PrefillActor>(worker);
}

}  // namespace dserve::prefill
