#include "dserve/actors/gateway.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include <caf/all.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/actors/prefill_interface.h"
#include "dserve/actors/prefix_affinity.h"
#include "dserve/core/random.h"
#include "dserve/ops/log.h"
#include "dserve/ops/metrics.h"

namespace dserve::actors {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int64_t unix_ms_now() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double ms_since(SteadyClock::time_point t) {
  return std::chrono::duration<double, std::milli>(SteadyClock::now() - t).count();
}

// What a request's thread waits for.
struct Event {
  enum class Kind { kChunk, kPrefillReply, kWorkerDown };
  Kind kind = Kind::kChunk;
  RequestId attempt = 0;
  TokenChunk chunk;                             // kChunk
  std::optional<Result<PrefillReply>> prefill;  // kPrefillReply
  size_t worker = 0;                            // kWorkerDown
  Epoch epoch = 0;
  std::string why;
};

// One request's mailbox, filled by the sink actor, prefill callbacks and worker watchers.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;

  void push(Event e) {
    {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(std::move(e));
    }
    cv.notify_one();
  }
  std::optional<Event> pop(milliseconds wait) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, wait, [&] { return !events.empty(); })) return std::nullopt;
    Event e = std::move(events.front());
    events.pop_front();
    return e;
  }
};

// Where the current attempt of a request runs; guarded by the gateway's mutex (worker
// watchers read it to decide whom a failure concerns).
struct Placement {
  RequestId attempt = 0;
  std::shared_ptr<Channel> channel;
  std::optional<size_t> decode;
  Epoch decode_epoch = 0;
  std::optional<size_t> prefill;
  Epoch prefill_epoch = 0;
  uint64_t prefill_tokens = 0;  // counted in the prefill worker's queued tokens until done
  bool prefill_sent = false;
  bool prefill_done = false;
};

struct Worker {
  Role role = Role::kPrefill;
  WorkerEndpoint endpoint;
  caf::actor handle;  // null while not connected
  caf::actor watcher;
  uint64_t generation = 0;  // bumped on every connect and every loss
  bool healthy = false;
  Epoch epoch = 0;
  uint64_t restarts = 0;
  uint32_t placed = 0;
  uint64_t queued_tokens = 0;  // prefill: prompt tokens placed there and not yet done
  int failures = 0;
  uint64_t placed_total = 0;  // requests ever placed here by this gateway
  bool draining = false;      // being removed: nothing new is placed here
  bool removed = false;       // out of the pool: not probed, not shown, never placed on again
  HealthReport report;
  std::string last_error;
  std::unique_ptr<PrefixAffinity> affinity;  // prefill workers only
  // Attempts abandoned here while the worker was unreachable (missed probes, connection lost):
  // cancelled as soon as it is connected again, so that work nobody waits for stops at its
  // next step instead of running to its deadline. Bounded: the oldest are dropped.
  std::deque<std::pair<RequestId, std::string>> cancels_owed;
};

// Cancels owed to one worker at most (each is a few dozen bytes).
constexpr size_t kMaxCancelsOwed = 4096;

}  // namespace

Result<WorkerEndpoint> parse_endpoint(std::string_view text) {
  const auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0) {
    return invalid_argument("'" + std::string(text) + "' is not HOST:PORT");
  }
  WorkerEndpoint ep;
  ep.host = std::string(text.substr(0, colon));
  const std::string port(text.substr(colon + 1));
  int value = -1;
  try {
    size_t used = 0;
    value = std::stoi(port, &used);
    if (used != port.size()) value = -1;
  } catch (const std::exception&) {
  }
  if (value < 1 || value > 65535) {
    return invalid_argument("'" + std::string(text) + "': the port must be a number in 1..65535");
  }
  ep.port = static_cast<uint16_t>(value);
  return ep;
}

Result<std::vector<WorkerEndpoint>> parse_endpoints(std::string_view text) {
  std::vector<WorkerEndpoint> out;
  size_t start = 0;
  while (start <= text.size() && !text.empty()) {
    const size_t comma = text.find(',', start);
    const std::string_view item = text.substr(
        start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    auto ep = parse_endpoint(item);
    if (!ep.is_ok()) return ep.status();
    out.push_back(std::move(ep).value());
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

// The gateway's metrics in a registry (GatewayOptions::metrics).
struct GatewayMetrics {
  explicit GatewayMetrics(ops::MetricsRegistry& r)
      : completed(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                            {{"outcome", "completed"}})),
        failed(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                         {{"outcome", "failed"}})),
        cancelled(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                            {{"outcome", "cancelled"}})),
        refused(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                          {{"outcome", "refused"}})),
        replays(r.counter("dserve_gateway_replays_total",
                          "Placements after a request's first (a worker failed).")),
        transfer_bytes(r.counter("dserve_gateway_kv_transfer_bytes_total",
                                 "KV state bytes written into decode workers' regions.")),
        ttft(r.histogram("dserve_gateway_time_to_first_token_seconds",
                         "Admission to the first token.", ops::latency_buckets_seconds())),
        tpot(r.histogram("dserve_gateway_time_per_output_token_seconds",
                         "(request duration - time to first token) / (tokens - 1).",
                         ops::latency_buckets_seconds())),
        duration(r.histogram("dserve_gateway_request_duration_seconds",
                             "Admission to the end of a completed request.",
                             ops::latency_buckets_seconds())),
        queue(r.histogram("dserve_gateway_queue_seconds",
                          "Time waiting for admission and for worker room.",
                          ops::latency_buckets_seconds())),
        transfer(r.histogram("dserve_gateway_kv_transfer_seconds",
                             "Time to write one request's KV state into a decode worker.",
                             ops::latency_buckets_seconds())),
        running(r.gauge("dserve_gateway_running_requests", "Requests placed now.")),
        queued(r.gauge("dserve_gateway_queued_requests", "Requests waiting for admission.")) {}

  void record(const GenerateOutcome& out, double seconds) {
    switch (out.status.code()) {
      case StatusCode::kOk:
        completed.inc();
        break;
      case StatusCode::kCancelled:
        cancelled.inc();
        break;
      case StatusCode::kResourceExhausted:
        refused.inc();
        break;
      default:
        failed.inc();
        break;
    }
    if (out.attempts > 1) replays.inc(out.attempts - 1);
    if (out.transfer_bytes > 0) {
      transfer_bytes.inc(static_cast<double>(out.transfer_bytes));
      transfer.observe(out.transfer_ms / 1000.0);
    }
    if (!out.status.is_ok()) return;
    queue.observe(out.queue_ms / 1000.0);
    duration.observe(seconds);
    if (out.tokens == 0) return;
    ttft.observe(out.ttft_ms / 1000.0);
    if (out.tokens > 1) tpot.observe((seconds - out.ttft_ms / 1000.0) / (out.tokens - 1));
  }

  ops::Counter &completed, &failed, &cancelled, &refused, &replays, &transfer_bytes;
  ops::Histogram &ttft, &tpot, &duration, &queue, &transfer;
  ops::Gauge &running, &queued;
};

class Gateway::Impl {
 public:
  Impl(ActorRuntime& runtime, GatewayOptions options) : rt_(runtime), opt_(std::move(options)) {
    if (opt_.metrics) metrics_ = std::make_unique<GatewayMetrics>(*opt_.metrics);
    for (const auto& ep : opt_.prefill_workers)
      append_worker_locked(Role::kPrefill, ep);
    for (const auto& ep : opt_.decode_workers)
      append_worker_locked(Role::kDecode, ep);
  }

  // A new pool member at the end of workers_ (indices never change: placements refer to them).
  size_t append_worker_locked(Role role, const WorkerEndpoint& ep) {
    Worker w;
    w.role = role;
    w.endpoint = ep;
    if (role == Role::kPrefill) w.affinity = std::make_unique<PrefixAffinity>(opt_.affinity_blocks);
    workers_.push_back(std::move(w));
    return workers_.size() - 1;
  }

  // The pool member (not removed) at `address`, if any.
  std::optional<size_t> find_worker_locked(const std::string& address) const {
    for (size_t i = 0; i < workers_.size(); ++i) {
      if (!workers_[i].removed && workers_[i].endpoint.to_string() == address) return i;
    }
    return std::nullopt;
  }

  Status add_worker(Role role, const WorkerEndpoint& ep, milliseconds timeout) {
    if (role != Role::kPrefill && role != Role::kDecode) {
      return invalid_argument("a worker's role must be prefill or decode");
    }
    size_t i = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return unavailable("the gateway is stopping");
      if (auto existing = find_worker_locked(ep.to_string())) {
        return invalid_argument(std::string(role_name(workers_[*existing].role)) + " worker " +
                                ep.to_string() + " is already in the pool" +
                                (workers_[*existing].draining ? " (draining)" : ""));
      }
      i = append_worker_locked(role, ep);
      probers_.emplace_back([this, i] { probe_loop(i); });
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (ready_cv_.wait_for(lock, timeout, [&] { return workers_[i].healthy || stopping_; }) &&
        workers_[i].healthy) {
      return Status::ok();
    }
    // Not healthy in time: it stays out of the pool rather than half in it.
    retire_locked(i);
    return unavailable(std::string(role_name(role)) + " worker " + ep.to_string() +
                       " was not healthy after " + std::to_string(timeout.count()) + " ms" +
                       (workers_[i].last_error.empty() ? "" : ": " + workers_[i].last_error));
  }

  Result<uint32_t> remove_worker(const std::string& address, milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    auto found = find_worker_locked(address);
    if (!found) return not_found("no worker " + address + " in the gateway's pools");
    const size_t i = *found;
    Worker& w = workers_[i];
    size_t same_role = 0;
    for (const Worker& o : workers_) {
      if (!o.removed && !o.draining && o.role == w.role) ++same_role;
    }
    if (!w.draining && same_role <= 1) {
      return invalid_argument(std::string("cannot remove ") + role_name(w.role) + " worker " +
                              address + ": it is the last one of its pool");
    }
    w.draining = true;
    const uint32_t had = w.placed;
    if (!drained_cv_.wait_for(lock, timeout, [&] { return workers_[i].placed == 0; })) {
      return deadline_exceeded(std::string(role_name(workers_[i].role)) + " worker " + address +
                               " still has " + std::to_string(workers_[i].placed) +
                               " requests after " + std::to_string(timeout.count()) +
                               " ms; it stays draining");
    }
    retire_locked(i);
    return had;
  }

  // Takes worker i out of the pool: no more probes, its connection dropped.
  void retire_locked(size_t i) {
    workers_[i].removed = true;
    disconnect_locked(i);
    stop_cv_.notify_all();
  }

  // Drops worker i's connection: not healthy, its watcher stopped, and whatever the old
  // connection's watcher or prober still reports ignored (a new generation).
  void disconnect_locked(size_t i) {
    Worker& w = workers_[i];
    w.healthy = false;
    if (w.watcher) caf::anon_send_exit(w.watcher, caf::exit_reason::user_shutdown);
    w.watcher = nullptr;
    w.handle = nullptr;
    ++w.generation;
  }

  // Requests placed from now on are refused; the ones running go on.
  void stop_accepting() {
    std::lock_guard<std::mutex> lock(mu_);
    accepting_ = false;
  }

  bool wait_idle(milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return drained_cv_.wait_for(lock, timeout, [&] { return running_ + queued_ == 0; });
  }

  Status cancel(const std::string& request_id, const std::string& client, bool admin) {
    std::optional<std::string> owner;  // set when a request has this id
    bool allowed = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = active_ids_.find(request_id);
      if (it != active_ids_.end()) {
        owner = it->second.client;
        allowed = admin || *owner == client;
        if (allowed) it->second.cancel->store(true);
      }
    }
    if (owner && opt_.log) {
      opt_.log->log(allowed ? ops::LogLevel::kInfo : ops::LogLevel::kWarn,
                    allowed ? "cancel" : "cancel_refused", request_id,
                    {{"client", client}, {"owner", *owner}});
    }
    if (allowed) return Status::ok();
    return not_found("no running request with id '" + request_id + "'");
  }

  void start_threads() {
    sink_ = rt_.system().spawn(sink_behavior, this);
    rt_.own(sink_);
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < workers_.size(); ++i)
      probers_.emplace_back([this, i] { probe_loop(i); });
  }

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    stop_cv_.notify_all();
    ready_cv_.notify_all();
    // No prober is added once stopping_ is set (add_worker checks it under the lock).
    for (auto& t : probers_)
      t.join();
    caf::anon_send_exit(sink_, caf::exit_reason::user_shutdown);
  }

  GatewayActor actor() const { return sink_; }

  Status wait_ready(milliseconds timeout) {
    const auto until = SteadyClock::now() + timeout;
    std::unique_lock<std::mutex> lock(mu_);
    auto ready = [&] {
      bool prefill = false, decode = false;
      for (const auto& w : workers_) {
        if (!w.healthy || w.draining || w.removed) continue;
        (w.role == Role::kPrefill ? prefill : decode) = true;
      }
      return prefill && decode;
    };
    if (ready_cv_.wait_until(lock, until, ready)) return Status::ok();
    std::string down;
    for (const auto& w : workers_) {
      if (w.healthy || w.removed) continue;
      down += std::string(down.empty() ? "" : "; ") + role_name(w.role) + " " +
              w.endpoint.to_string() + (w.last_error.empty() ? "" : " (" + w.last_error + ")");
    }
    return unavailable("no healthy prefill and decode worker after " +
                       std::to_string(timeout.count()) + " ms; not healthy: " + down);
  }

  GenerateOutcome generate(const GenerateJob& job, const TokenCallback& on_tokens,
                           const CancelCheck& cancelled);

  GatewaySnapshot snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    GatewaySnapshot s;
    for (const auto& w : workers_) {
      if (w.removed) continue;
      WorkerView v;
      v.role = w.role;
      v.address = w.endpoint.to_string();
      v.healthy = w.healthy;
      v.draining = w.draining;
      v.placed_total = w.placed_total;
      v.queued_tokens = w.queued_tokens;
      v.epoch = w.epoch;
      v.restarts = w.restarts;
      v.placed = w.placed;
      v.last_report = w.report;
      v.last_error = w.last_error;
      s.workers.push_back(std::move(v));
    }
    s.running = running_;
    s.queued = queued_;
    s.counters = counters_;
    s.accepting = accepting_ && !stopping_;
    return s;
  }

 private:
  static GatewayActor::behavior_type sink_behavior(GatewayActor::pointer, Impl* impl) {
    return {
        [impl](TokenChunk& chunk) { impl->route(std::move(chunk)); },
        [impl](HealthProbe&) {
          HealthReport r;
          r.role = Role::kGateway;
          r.epoch = impl->rt_.epoch();
          r.node_name = impl->rt_.config().node_name;
          r.uptime_ms = impl->rt_.uptime_ms();
          std::lock_guard<std::mutex> lock(impl->mu_);
          r.active_requests = static_cast<uint32_t>(impl->running_);
          r.queued_requests = static_cast<uint32_t>(impl->queued_);
          return r;
        },
    };
  }

  void route(TokenChunk chunk) {
    std::shared_ptr<Channel> ch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = placements_.find(chunk.request_id);
      if (it == placements_.end()) return;  // an attempt that ended: stale
      ch = it->second.channel;
    }
    Event e;
    e.kind = Event::Kind::kChunk;
    e.attempt = chunk.request_id;
    e.chunk = std::move(chunk);
    ch->push(std::move(e));
  }

  // ---- worker watching ----------------------------------------------------------------

  void probe_loop(size_t i) {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_ && !workers_[i].removed) {
      lock.unlock();
      probe_once(i);
      lock.lock();
      stop_cv_.wait_for(lock, opt_.probe_interval, [&] { return stopping_; });
    }
  }

  Result<caf::actor> connect(const Worker& w) {
    if (w.role == Role::kPrefill) {
      auto h = rt_.connect<PrefillActor>(w.endpoint.host, w.endpoint.port, opt_.probe_timeout);
      if (!h.is_ok()) return h.status();
      return caf::actor_cast<caf::actor>(*h);
    }
    auto h = rt_.connect<DecodeActor>(w.endpoint.host, w.endpoint.port, opt_.probe_timeout);
    if (!h.is_ok()) return h.status();
    return caf::actor_cast<caf::actor>(*h);
  }

  void probe_once(size_t i) {
    caf::actor handle;
    Role role;
    {
      std::lock_guard<std::mutex> lock(mu_);
      handle = workers_[i].handle;
      role = workers_[i].role;
    }
    if (!handle) {
      std::deque<std::pair<RequestId, std::string>> owed;
      Worker copy_for_connect;
      {
        std::lock_guard<std::mutex> lock(mu_);
        copy_for_connect.role = workers_[i].role;
        copy_for_connect.endpoint = workers_[i].endpoint;
      }
      auto connected = connect(copy_for_connect);
      uint64_t gen = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_ || workers_[i].removed) return;
        if (!connected.is_ok()) {
          workers_[i].last_error = connected.status().message();
          return;
        }
        handle = *connected;
        workers_[i].handle = handle;
        gen = ++workers_[i].generation;
        owed.swap(workers_[i].cancels_owed);
      }
      for (const auto& [attempt, reason] : owed)
        send_cancel(role, handle, attempt, reason);
      // Outside the lock: the watcher's callback takes it.
      caf::actor watcher = rt_.watch(handle, [this, i, gen](const std::string& why) {
        std::lock_guard<std::mutex> l(mu_);
        if (workers_[i].generation != gen) return;
        mark_down_locked(i, "connection lost: " + why);
      });
      std::lock_guard<std::mutex> lock(mu_);
      if (workers_[i].generation == gen) {
        workers_[i].watcher = watcher;
      } else {
        caf::anon_send_exit(watcher, caf::exit_reason::user_shutdown);
      }
    }
    Result<HealthReport> report = internal_error("unset");
    if (role == Role::kPrefill) {
      report = rt_.call<HealthReport>(caf::actor_cast<PrefillActor>(handle),
                                      HealthProbe{Role::kGateway, rt_.epoch(), unix_ms_now()},
                                      opt_.probe_timeout);
    } else {
      report = rt_.call<HealthReport>(caf::actor_cast<DecodeActor>(handle),
                                      HealthProbe{Role::kGateway, rt_.epoch(), unix_ms_now()},
                                      opt_.probe_timeout);
    }
    std::lock_guard<std::mutex> lock(mu_);
    Worker& w = workers_[i];
    if (w.handle != handle) return;  // lost and replaced meanwhile
    if (!report.is_ok()) {
      w.last_error = report.status().message();
      if (++w.failures >= opt_.probe_failures_before_down) {
        mark_down_locked(
            i, "no health report in " + std::to_string(w.failures) + " probes: " + w.last_error);
      }
      return;
    }
    w.failures = 0;
    if (w.epoch != 0 && report->epoch != w.epoch) {
      // A new incarnation: whatever the old one held (reservations, keys, cache) is gone.
      notify_down_locked(i, w.epoch, "restarted (new epoch)");
      ++w.restarts;
      if (w.affinity) w.affinity->clear();
    }
    w.epoch = report->epoch;
    w.report = std::move(report).value();
    w.last_error.clear();
    if (!w.healthy) {
      w.healthy = true;
      ready_cv_.notify_all();
    }
  }

  void mark_down_locked(size_t i, const std::string& why) {
    Worker& w = workers_[i];
    w.last_error = why;
    w.failures = 0;
    disconnect_locked(i);
    notify_down_locked(i, w.epoch, why);
  }

  void notify_down_locked(size_t i, Epoch epoch, const std::string& why) {
    const std::string who = std::string(role_name(workers_[i].role)) + " worker " +
                            workers_[i].endpoint.to_string() + " " + why;
    for (auto& [attempt, p] : placements_) {
      const bool on_decode = p.decode == i && p.decode_epoch == epoch;
      const bool on_prefill = p.prefill == i && p.prefill_epoch == epoch && !p.prefill_done;
      if (!on_decode && !on_prefill) continue;
      Event e;
      e.kind = Event::Kind::kWorkerDown;
      e.attempt = attempt;
      e.worker = i;
      e.epoch = epoch;
      e.why = who;
      p.channel->push(std::move(e));
    }
  }

  // ---- placing --------------------------------------------------------------------------

  struct Reserved {
    size_t decode = 0;
    ReserveReply reply;
  };

  // Reserves room on a decode worker: kResourceExhausted when every healthy worker refused
  // for lack of room now (try again later), kInvalidArgument when none can ever take it,
  // kUnavailable when none is healthy.
  Result<Reserved> reserve(const ReserveRequest& req) {
    std::vector<std::pair<size_t, caf::actor>> order;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<size_t> idx;
      for (size_t i = 0; i < workers_.size(); ++i) {
        const Worker& w = workers_[i];
        if (w.role == Role::kDecode && w.healthy && w.handle && !w.draining && !w.removed)
          idx.push_back(i);
      }
      std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
        const Worker& wa = workers_[a];
        const Worker& wb = workers_[b];
        if (wa.placed != wb.placed) return wa.placed < wb.placed;
        return wa.report.free_kv_bytes > wb.report.free_kv_bytes;
      });
      for (size_t i : idx)
        order.emplace_back(i, workers_[i].handle);
    }
    if (order.empty()) return unavailable("no healthy decode worker");
    std::string reasons;
    bool any_retryable = false;
    for (auto& [i, handle] : order) {
      // Bounded by the request's deadline as well: a slow worker must not hold the request
      // past it (a grant that comes too late expires on the worker by the same deadline).
      const auto bound = std::clamp(milliseconds(req.deadline_unix_ms - unix_ms_now()),
                                    milliseconds(1), opt_.reserve_timeout);
      auto reply = rt_.call<ReserveReply>(caf::actor_cast<DecodeActor>(handle), req, bound);
      const std::string where = workers_[i].endpoint.to_string();
      if (!reply.is_ok()) {
        any_retryable = true;
        reasons += "; " + where + ": " + reply.status().message();
        continue;
      }
      if (Status v = validate(*reply); !v.is_ok()) {
        any_retryable = true;
        reasons += "; " + where + ": malformed reply: " + v.message();
        continue;
      }
      if (reply->outcome == ReserveOutcome::kGranted) {
        std::lock_guard<std::mutex> lock(mu_);
        ++workers_[i].placed;
        ++workers_[i].placed_total;
        return Reserved{i, std::move(reply).value()};
      }
      any_retryable = any_retryable || reply->retryable;
      reasons += "; " + where + ": " + reply->reason;
    }
    reasons.erase(0, 2);
    if (any_retryable) return resource_exhausted("no decode worker has room now: " + reasons);
    return invalid_argument("no decode worker can take this request: " + reasons);
  }

  struct Claimed {
    size_t index = 0;
    caf::actor handle;
  };

  // Claims room for `tokens` prompt tokens on a prefill worker for `attempt`: among healthy
  // workers whose queue has room (at most max_prefill_queue_tokens placed and not yet done; an
  // idle worker takes any prompt), the one most likely to hold the longest prefix, then the
  // one with the fewest queued tokens. kResourceExhausted when all are full, kUnavailable when
  // none is healthy.
  Result<Claimed> claim_prefill(RequestId attempt, std::span<const uint64_t> chain,
                                uint64_t tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    std::optional<size_t> best;
    size_t best_match = 0;
    bool any_healthy = false;
    for (size_t i = 0; i < workers_.size(); ++i) {
      const Worker& w = workers_[i];
      if (w.role != Role::kPrefill || !w.healthy || !w.handle || w.draining || w.removed) continue;
      any_healthy = true;
      if (w.queued_tokens > 0 && w.queued_tokens + tokens > opt_.max_prefill_queue_tokens) continue;
      const size_t match = w.affinity->matched_blocks(chain);
      if (!best || match > best_match ||
          (match == best_match && w.queued_tokens < workers_[*best].queued_tokens)) {
        best = i;
        best_match = match;
      }
    }
    if (!any_healthy) return unavailable("no healthy prefill worker");
    if (!best) {
      return resource_exhausted("every prefill worker's queue is full (" +
                                std::to_string(opt_.max_prefill_queue_tokens) + " tokens)");
    }
    Worker& w = workers_[*best];
    Placement& p = placements_.at(attempt);
    p.prefill = *best;
    p.prefill_epoch = w.epoch;
    p.prefill_tokens = tokens;
    ++w.placed;
    ++w.placed_total;
    w.queued_tokens += tokens;
    return Claimed{*best, w.handle};
  }

  // The prefill of `p` is over (done, failed or abandoned): its tokens leave the queue count.
  void release_prefill_locked(Placement& p) {
    if (!p.prefill || p.prefill_done) return;
    Worker& w = workers_[*p.prefill];
    --w.placed;
    w.queued_tokens -= std::min(w.queued_tokens, p.prefill_tokens);
    p.prefill_done = true;
    if (w.draining) drained_cv_.notify_all();
  }

  void cancel_on(size_t worker, Epoch epoch, RequestId attempt, const std::string& reason) {
    caf::actor handle;
    Role role;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Worker& w = workers_[worker];
      if (w.epoch != epoch) return;  // restarted: nothing of ours is left there
      role = w.role;
      if (!w.handle) {
        // Unreachable now (a hung or busy process keeps computing): owed until it is back.
        if (w.cancels_owed.size() >= kMaxCancelsOwed) w.cancels_owed.pop_front();
        w.cancels_owed.emplace_back(attempt, reason);
        return;
      }
      handle = w.handle;
    }
    send_cancel(role, handle, attempt, reason);
  }

  void send_cancel(Role role, const caf::actor& handle, RequestId attempt,
                   const std::string& reason) {
    auto ignore = [](const Result<CancelReply>&) {};
    if (role == Role::kPrefill) {
      rt_.call_async<CancelReply>(caf::actor_cast<PrefillActor>(handle),
                                  CancelRequest{attempt, reason}, opt_.reserve_timeout, ignore);
    } else {
      rt_.call_async<CancelReply>(caf::actor_cast<DecodeActor>(handle),
                                  CancelRequest{attempt, reason}, opt_.reserve_timeout, ignore);
    }
  }

  // Ends an attempt: forgets its route, releases its placement counts and, unless it
  // completed, cancels what it still holds on its workers.
  void end_attempt(RequestId attempt, bool completed, const std::string& reason) {
    // What to cancel, as (worker, epoch); plain values, not the placement's optionals.
    size_t decode = 0, prefill = 0;
    Epoch decode_epoch = 0, prefill_epoch = 0;
    bool cancel_decode = false, cancel_prefill = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = placements_.find(attempt);
      if (it == placements_.end()) return;
      Placement& p = it->second;
      if (p.decode) {
        --workers_[*p.decode].placed;
        if (workers_[*p.decode].draining) drained_cv_.notify_all();
        cancel_decode = true;
        decode = *p.decode;
        decode_epoch = p.decode_epoch;
      }
      if (p.prefill && !p.prefill_done && p.prefill_sent) {
        cancel_prefill = true;
        prefill = *p.prefill;
        prefill_epoch = p.prefill_epoch;
      }
      release_prefill_locked(p);
      placements_.erase(it);
    }
    if (completed) return;
    if (cancel_decode) cancel_on(decode, decode_epoch, attempt, reason);
    if (cancel_prefill) cancel_on(prefill, prefill_epoch, attempt, reason);
  }

  ActorRuntime& rt_;
  GatewayOptions opt_;
  GatewayActor sink_;

  mutable std::mutex mu_;
  std::condition_variable ready_cv_;
  std::condition_variable stop_cv_;
  std::condition_variable admit_cv_;
  std::condition_variable drained_cv_;  // a draining worker lost a request, or a request ended
  bool stopping_ = false;
  bool accepting_ = true;
  std::deque<Worker> workers_;  // grows by add_worker; removed workers stay, marked
  // The running and queued requests by id, with the flag cancel() sets.
  // The running requests by id: how to cancel each, and whose it is.
  struct ActiveRequest {
    std::shared_ptr<std::atomic<bool>> cancel;
    std::string client;
  };
  std::map<std::string, ActiveRequest> active_ids_;
  std::map<RequestId, Placement> placements_;  // by attempt id
  size_t running_ = 0;
  size_t queued_ = 0;
  GatewayCounters counters_;
  std::atomic<uint64_t> next_request_{1};
  std::atomic<uint64_t> next_request_id_{1};
  std::vector<std::thread> probers_;
  std::unique_ptr<GatewayMetrics> metrics_;

  void update_gauges_locked() {
    if (!metrics_) return;
    metrics_->running.set(static_cast<double>(running_));
    metrics_->queued.set(static_cast<double>(queued_));
  }

  friend class Gateway;
};

namespace {

constexpr const char* kRequestIdRule =
    "request_id must be at most 128 characters of [A-Za-z0-9._:-]";

bool is_request_id_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
         c == '-';
}

bool is_valid_request_id(const std::string& id) {
  return id.size() <= 128 && std::all_of(id.begin(), id.end(), is_request_id_char);
}

Status validate_job(const GenerateJob& job) {
  std::string problems;
  if (!is_valid_request_id(job.request_id)) problems += std::string(kRequestIdRule) + "; ";
  if (job.prompt.empty()) problems += "the prompt is empty; ";
  if (!std::isfinite(job.temperature) || job.temperature < 0.0f) {
    problems +=
        "temperature must be a finite number >= 0 (got " + std::to_string(job.temperature) + "); ";
  }
  if (job.top_k < 0) problems += "top_k must be >= 0 (got " + std::to_string(job.top_k) + "); ";
  if (!(job.top_p > 0.0f && job.top_p <= 1.0f))
    problems += "top_p must be in (0, 1] (got " + std::to_string(job.top_p) + "); ";
  if (problems.empty()) return Status::ok();
  problems.resize(problems.size() - 2);
  return invalid_argument(problems);
}

}  // namespace

GenerateOutcome Gateway::Impl::generate(const GenerateJob& job, const TokenCallback& on_tokens,
                                        const CancelCheck& cancelled) {
  GenerateOutcome out;
  if (Status v = validate_job(job); !v.is_ok()) {
    out.status = v;
    return out;
  }
  // The request's id: the caller's, or one unique to this gateway incarnation.
  out.request_id = job.request_id.empty() ? "gw-" + std::to_string(rt_.epoch() % 1000000) + "-" +
                                                std::to_string(next_request_id_.fetch_add(1))
                                          : job.request_id;
  auto cancel_flag = std::make_shared<std::atomic<bool>>(false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_ || stopping_) {
      ++counters_.refused;
      out.status = unavailable("the gateway is shutting down and admits no new request");
      return out;
    }
    if (!active_ids_.emplace(out.request_id, ActiveRequest{cancel_flag, job.client}).second) {
      out.status = invalid_argument("request_id '" + out.request_id +
                                    "' is already in use by a running request");
      return out;
    }
  }
  struct ActiveId {
    Impl* impl;
    std::string id;  // a copy: `out` may be moved from when this runs
    ~ActiveId() {
      std::lock_guard<std::mutex> lock(impl->mu_);
      impl->active_ids_.erase(id);
    }
  } active_id{this, out.request_id};
  const auto admitted_at = SteadyClock::now();
  const int64_t deadline_ms = job.deadline_unix_ms > 0
                                  ? job.deadline_unix_ms
                                  : unix_ms_now() + opt_.default_deadline.count();
  const auto deadline = SteadyClock::now() + milliseconds(deadline_ms - unix_ms_now());
  const auto poll = milliseconds(20);
  auto is_cancelled = [&] { return cancel_flag->load() || (cancelled && cancelled()); };

  // ---- admission ----
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (running_ >= opt_.max_running) {
      if (queued_ >= opt_.max_queued) {
        ++counters_.refused;
        out.status = resource_exhausted("the gateway is full: " + std::to_string(running_) +
                                        " requests running and " + std::to_string(queued_) +
                                        " queued (limits " + std::to_string(opt_.max_running) +
                                        " and " + std::to_string(opt_.max_queued) + ")");
        return out;
      }
      ++queued_;
      update_gauges_locked();
      while (running_ >= opt_.max_running) {
        if (SteadyClock::now() >= deadline || is_cancelled() || stopping_) break;
        admit_cv_.wait_for(lock, poll);
      }
      --queued_;
      update_gauges_locked();
      drained_cv_.notify_all();
      if (running_ >= opt_.max_running) {
        ++counters_.failed;
        out.status = is_cancelled() ? cancelled_error("cancelled while queued")
                                    : deadline_exceeded("the deadline passed while queued (" +
                                                        std::to_string(queued_) + " queued)");
        return out;
      }
    }
    ++running_;
    update_gauges_locked();
    ++counters_.admitted;
  }
  struct RunningSlot {
    Impl* impl;
    ~RunningSlot() {
      {
        std::lock_guard<std::mutex> lock(impl->mu_);
        --impl->running_;
        impl->update_gauges_locked();
      }
      impl->admit_cv_.notify_one();
      impl->drained_cv_.notify_all();
    }
  } slot{this};
  out.queue_ms = ms_since(admitted_at);
  if (opt_.log) {
    opt_.log->info("admitted", out.request_id,
                   {{"client", job.client},
                    {"prompt_tokens", job.prompt.size()},
                    {"max_new_tokens", job.max_new_tokens},
                    {"queue_ms", out.queue_ms}});
  }

  // Ends the request with `status`, counted as completed, cancelled or failed by its code.
  auto finish = [&](Status status) {
    out.status = std::move(status);
    std::lock_guard<std::mutex> lock(mu_);
    if (out.status.is_ok()) {
      ++counters_.completed;
    } else if (out.status.code() == StatusCode::kCancelled) {
      ++counters_.cancelled;
    } else {
      ++counters_.failed;
    }
    return out;
  };

  const uint64_t base = next_request_.fetch_add(1);
  std::vector<TokenId> produced;
  produced.reserve(job.max_new_tokens);
  std::string last_error;
  // Prefill workers (by endpoint) lost (hung past their probes, crashed, restarted) while they
  // computed this request's prompt: a prompt that takes down every worker it is given is not
  // replayed on and on. One loss is often seen twice (the call fails, the connection drops) and
  // may be seen again by the next attempt if it was placed there before the loss was known.
  std::set<size_t> prefill_lost;
  auto channel = std::make_shared<Channel>();

  for (uint32_t attempt_no = 0;; ++attempt_no) {
    if (produced.size() >= job.max_new_tokens) {
      out.finish_reason = "length";
      out.tokens = static_cast<uint32_t>(produced.size());
      return finish(Status::ok());
    }
    // A failure at or after the deadline (often caused by it: the prefill call is bounded by
    // the deadline) is no reason to place the request again: it ends as DEADLINE_EXCEEDED.
    if (attempt_no > 0 && SteadyClock::now() >= deadline) {
      out.tokens = static_cast<uint32_t>(produced.size());
      return finish(deadline_exceeded("the deadline passed after " +
                                      std::to_string(produced.size()) +
                                      " tokens; the last failure: " + last_error));
    }
    if (attempt_no >= static_cast<uint32_t>(opt_.max_attempts)) {
      out.tokens = static_cast<uint32_t>(produced.size());
      return finish(unavailable("gave up after " + std::to_string(attempt_no) +
                                " placements; the last failure: " + last_error));
    }
    if (attempt_no > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      ++counters_.replays;
    }
    out.attempts = attempt_no + 1;
    const RequestId attempt = (base << 8) | attempt_no;
    const uint32_t offset = static_cast<uint32_t>(produced.size());

    // The prompt this placement prefills: the request's prompt plus what was delivered.
    std::vector<TokenId> prompt = job.prompt;
    prompt.insert(prompt.end(), produced.begin(), produced.end());
    // Counts a prefill worker lost while it computed this attempt's prompt; past the bound,
    // the request's end (a prompt that stops every worker it is given is not replayed).
    auto count_prefill_loss = [&](size_t worker) -> std::optional<GenerateOutcome> {
      prefill_lost.insert(worker);
      if (prefill_lost.size() < static_cast<size_t>(opt_.max_prefill_losses)) return std::nullopt;
      out.tokens = static_cast<uint32_t>(produced.size());
      return finish(resource_exhausted(
          "not placed again: " + std::to_string(prefill_lost.size()) +
          " prefill workers were lost while they computed this prompt (" +
          std::to_string(prompt.size()) +
          " tokens), so the prompt itself may be what stops them; the last: " + last_error));
    };

    // Register the route first: a token may arrive before reserve() returns to us.
    {
      std::lock_guard<std::mutex> lock(mu_);
      Placement p;
      p.attempt = attempt;
      p.channel = channel;
      placements_.emplace(attempt, std::move(p));
    }

    // ---- a prefill worker with room in its queue (waits while all are full) ----
    // Claimed before the decode reservation, so that reservations are not held (and do not
    // expire) while prompts wait in a prefill queue.
    const std::vector<uint64_t> chain = prompt_block_chain(prompt);
    const auto wait_started = SteadyClock::now();
    std::optional<Claimed> prefill;
    auto stop_waiting = [&](const std::string& what) -> std::optional<Status> {
      if (is_cancelled()) return cancelled_error("cancelled while waiting for " + what);
      if (SteadyClock::now() + opt_.capacity_retry >= deadline) {
        return deadline_exceeded("the deadline passed while waiting for " + what + ": " +
                                 last_error);
      }
      return std::nullopt;
    };
    for (;;) {
      auto c = claim_prefill(attempt, chain, prompt.size());
      if (c.is_ok()) {
        prefill = std::move(c).value();
        break;
      }
      last_error = c.status().message();
      if (auto stop = stop_waiting("a prefill worker")) {
        end_attempt(attempt, true, "");
        out.tokens = offset;
        return finish(*stop);
      }
      std::this_thread::sleep_for(opt_.capacity_retry);
    }

    // ---- decode reservation (waits while every decode worker is full) ----
    ReserveRequest rreq;
    rreq.request_id = attempt;
    rreq.prompt_tokens = static_cast<uint32_t>(prompt.size());
    rreq.max_new_tokens = job.max_new_tokens - offset;
    rreq.deadline_unix_ms = deadline_ms;
    rreq.stream_to = caf::actor_cast<TokenSinkActor>(sink_);
    rreq.temperature = job.temperature;
    rreq.top_k = job.top_k;
    rreq.top_p = job.top_p;
    // One draw per sampled token: skipping the draws of the delivered tokens continues the
    // same random stream.
    rreq.seed = job.seed + static_cast<uint64_t>(offset) * kSplitMix64Gamma;
    rreq.presence_penalty = job.presence_penalty;
    rreq.frequency_penalty = job.frequency_penalty;
    for (const auto& [id, bias] : job.logit_bias) {
      rreq.logit_bias_ids.push_back(id);
      rreq.logit_bias_values.push_back(bias);
    }
    // The penalties count what was generated before this placement too.
    if (job.presence_penalty != 0.0f || job.frequency_penalty != 0.0f)
      rreq.generated.assign(produced.begin(), produced.end());
    rreq.trace_id = out.request_id;
    std::optional<Reserved> reserved;
    for (;;) {
      auto r = reserve(rreq);
      if (r.is_ok()) {
        reserved = std::move(r).value();
        break;
      }
      last_error = r.status().message();
      const bool can_wait = r.status().code() == StatusCode::kResourceExhausted ||
                            r.status().code() == StatusCode::kUnavailable;
      if (!can_wait) {
        end_attempt(attempt, true, "");
        out.tokens = offset;
        return finish(r.status());
      }
      if (auto stop = stop_waiting("a decode worker")) {
        end_attempt(attempt, true, "");
        out.tokens = offset;
        return finish(*stop);
      }
      std::this_thread::sleep_for(opt_.capacity_retry);
    }
    out.queue_ms += ms_since(wait_started);
    const ReserveReply& grant = reserved->reply;

    // ---- prefill ----
    PrefillRequest preq;
    preq.request_id = attempt;
    preq.prompt = prompt;
    preq.deadline_unix_ms = deadline_ms;
    preq.trace_id = out.request_id;
    std::string prefill_at, decode_at;  // for the log
    {
      std::lock_guard<std::mutex> lock(mu_);
      Placement& p = placements_.at(attempt);
      p.decode = reserved->decode;
      p.decode_epoch = grant.decode_epoch;
      p.prefill_sent = true;
      const Worker& d = workers_[reserved->decode];
      preq.target = DecodeTarget{d.endpoint.host, d.endpoint.port, grant.decode_epoch,
                                 grant.reservation_id, grant.transfer_keys};
      prefill_at = workers_[prefill->index].endpoint.to_string();
      decode_at = d.endpoint.to_string();
    }
    if (opt_.log) {
      opt_.log->info("placed", out.request_id,
                     {{"prefill", prefill_at},
                      {"decode", decode_at},
                      {"attempt", attempt_no + 1},
                      {"prompt_tokens", prompt.size()}});
    }
    const caf::actor prefill_handle = prefill->handle;
    const auto left = std::max(
        milliseconds(1), std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now()));
    rt_.call_async<PrefillReply>(caf::actor_cast<PrefillActor>(prefill_handle), std::move(preq),
                                 left, [channel, attempt](Result<PrefillReply> r) {
                                   Event e;
                                   e.kind = Event::Kind::kPrefillReply;
                                   e.attempt = attempt;
                                   e.prefill.emplace(std::move(r));
                                   channel->push(std::move(e));
                                 });

    // ---- the stream ----
    // While the prefill runs, the decode reservation's lease is renewed (a long prompt takes
    // longer than the decode worker's reservation timeout).
    caf::actor decode_handle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      decode_handle = workers_[reserved->decode].handle;
    }
    auto next_renewal = SteadyClock::now() + opt_.reservation_renewal;
    bool prefill_replied = false;
    bool replay = false;
    while (!replay) {
      std::optional<Event> ev = channel->pop(poll);
      if (!prefill_replied && decode_handle && SteadyClock::now() >= next_renewal) {
        next_renewal = SteadyClock::now() + opt_.reservation_renewal;
        rt_.call_async<RenewReply>(caf::actor_cast<DecodeActor>(decode_handle),
                                   RenewReservation{attempt, grant.reservation_id},
                                   opt_.reserve_timeout, [](const Result<RenewReply>&) {});
      }
      // Checked on every event too: a stream that never pauses must still stop when asked.
      if (is_cancelled()) {
        end_attempt(attempt, false, "cancelled by the client");
        out.tokens = static_cast<uint32_t>(produced.size());
        return finish(cancelled_error("cancelled by the client"));
      }
      if (SteadyClock::now() >= deadline) {
        end_attempt(attempt, false, "deadline passed");
        out.tokens = static_cast<uint32_t>(produced.size());
        return finish(deadline_exceeded("the deadline passed after " +
                                        std::to_string(produced.size()) + " tokens"));
      }
      if (!ev) continue;
      if (ev->attempt != attempt) continue;  // left over from an earlier attempt
      switch (ev->kind) {
        case Event::Kind::kChunk: {
          const TokenChunk& c = ev->chunk;
          if (c.decode_epoch != grant.decode_epoch) break;
          if (Status v = validate(c); !v.is_ok()) {
            last_error = "malformed token chunk: " + v.message();
            replay = true;
            break;
          }
          const uint64_t first = static_cast<uint64_t>(offset) + c.first_index;
          if (first > produced.size()) {
            last_error = "tokens " + std::to_string(produced.size()) + ".." +
                         std::to_string(first) + " never arrived";
            replay = true;
            break;
          }
          const size_t skip = produced.size() - static_cast<size_t>(first);
          if (skip < c.tokens.size()) {
            const auto fresh = std::span(c.tokens).subspan(skip);
            const auto at = static_cast<uint32_t>(produced.size());
            produced.insert(produced.end(), fresh.begin(), fresh.end());
            if (out.ttft_ms == 0) out.ttft_ms = ms_since(admitted_at);
            if (on_tokens) on_tokens(fresh, at);
          }
          if (!c.finished) break;
          if (c.error.empty()) {
            end_attempt(attempt, true, "");
            out.tokens = static_cast<uint32_t>(produced.size());
            out.finish_reason = produced.size() >= job.max_new_tokens ? "length" : "stop";
            return finish(Status::ok());
          }
          if (c.error.rfind("deadline", 0) == 0) {
            end_attempt(attempt, true, "");
            out.tokens = static_cast<uint32_t>(produced.size());
            return finish(deadline_exceeded(c.error));
          }
          last_error = "decode worker failed the request: " + c.error;
          end_attempt(attempt, true, "");  // the worker already dropped it
          replay = true;
          break;
        }
        case Event::Kind::kPrefillReply: {
          prefill_replied = true;
          const Result<PrefillReply>& r = *ev->prefill;
          if (r.is_ok() && r->outcome == PrefillOutcome::kDone) {
            std::lock_guard<std::mutex> lock(mu_);
            auto it = placements_.find(attempt);
            if (it != placements_.end() && !it->second.prefill_done) {
              release_prefill_locked(it->second);
              Worker& w = workers_[prefill->index];
              if (w.epoch == it->second.prefill_epoch) w.affinity->insert(chain);
            }
            out.cached_prefix_tokens = r->cached_prefix_tokens;
            out.prefill_ms = r->prefill_ms;
            out.transfer_bytes = r->transfer_bytes;
            out.transfer_ms = r->transfer_us / 1000.0;
            out.handoff_ms = r->handoff_us / 1000.0;
            break;
          }
          last_error = "prefill on " + workers_[prefill->index].endpoint.to_string() +
                       " failed: " + (r.is_ok() ? r->reason : r.status().message());
          end_attempt(attempt, false, "prefill failed");
          // No reply at all (the worker died or hung past the call's bound), as opposed to a
          // worker's own refusal: the worker was lost while computing this prompt.
          if (!r.is_ok()) {
            if (auto lost = count_prefill_loss(prefill->index)) return *lost;
          }
          replay = true;
          break;
        }
        case Event::Kind::kWorkerDown: {
          last_error = ev->why;
          end_attempt(attempt, false, "a worker of this request failed");
          if (ev->worker == prefill->index) {
            if (auto lost = count_prefill_loss(prefill->index)) return *lost;
          }
          replay = true;
          break;
        }
      }
      if (replay) {
        end_attempt(attempt, false, "replayed");
        if (opt_.log) {
          opt_.log->warn(
              "replayed", out.request_id,
              {{"attempt", attempt_no + 1}, {"tokens", produced.size()}, {"why", last_error}});
        }
      }
    }
  }
}

Result<std::unique_ptr<Gateway>> Gateway::start(ActorRuntime& runtime, GatewayOptions options) {
  std::string problems;
  if (options.prefill_workers.empty()) problems += "no prefill workers; ";
  if (options.decode_workers.empty()) problems += "no decode workers; ";
  if (options.max_running == 0) problems += "max_running must be at least 1; ";
  if (options.max_attempts < 1) problems += "max_attempts must be at least 1; ";
  if (options.max_prefill_losses < 1) problems += "max_prefill_losses must be at least 1; ";
  if (options.reservation_renewal.count() <= 0)
    problems += "reservation_renewal must be positive; ";
  if (options.probe_interval.count() <= 0 || options.probe_timeout.count() <= 0)
    problems += "probe_interval and probe_timeout must be positive; ";
  if (options.probe_failures_before_down < 1)
    problems += "probe_failures_before_down must be at least 1; ";
  if (options.affinity_blocks == 0) problems += "affinity_blocks must be at least 1; ";
  if (!problems.empty()) {
    problems.resize(problems.size() - 2);
    return invalid_argument("gateway options: " + problems);
  }
  auto impl = std::make_unique<Impl>(runtime, std::move(options));
  impl->start_threads();
  return std::unique_ptr<Gateway>(new Gateway(std::move(impl)));
}

Gateway::Gateway(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Gateway::~Gateway() = default;

GatewayActor Gateway::actor() const {
  return impl_->actor();
}

Status Gateway::wait_ready(milliseconds timeout) {
  return impl_->wait_ready(timeout);
}

GenerateOutcome Gateway::generate(const GenerateJob& job, const TokenCallback& on_tokens,
                                  const CancelCheck& cancelled) {
  const auto started = SteadyClock::now();
  GenerateOutcome out = impl_->generate(job, on_tokens, cancelled);
  const double seconds = std::chrono::duration<double>(SteadyClock::now() - started).count();
  if (impl_->metrics_) impl_->metrics_->record(out, seconds);
  if (ops::Logger* log = impl_->opt_.log) {
    // The outcome labels of dserve_gateway_requests_total, and the status code.
    const StatusCode code = out.status.code();
    const char* outcome = code == StatusCode::kOk                  ? "completed"
                          : code == StatusCode::kCancelled         ? "cancelled"
                          : code == StatusCode::kResourceExhausted ? "refused"
                                                                   : "failed";
    log->log(out.status.is_ok() ? ops::LogLevel::kInfo : ops::LogLevel::kWarn, "finished",
             out.request_id.empty() ? job.request_id : out.request_id,
             {{"outcome", outcome},
              {"code", status_code_name(code)},
              {"finish_reason", out.finish_reason},
              {"tokens", out.tokens},
              {"attempts", out.attempts},
              {"ttft_ms", out.ttft_ms},
              {"cached_prefix_tokens", out.cached_prefix_tokens},
              {"duration_ms", seconds * 1000.0},
              {"error", out.status.is_ok() ? std::string() : out.status.message()}});
  }
  return out;
}

GatewaySnapshot Gateway::snapshot() const {
  return impl_->snapshot();
}

Status Gateway::cancel(const std::string& request_id, const std::string& client, bool admin) {
  // Checked before it is looked up or echoed: no running request can have another id.
  if (request_id.empty() || !is_valid_request_id(request_id)) {
    return invalid_argument(kRequestIdRule);
  }
  return impl_->cancel(request_id, client, admin);
}

Status Gateway::add_worker(Role role, const WorkerEndpoint& endpoint, milliseconds timeout) {
  return impl_->add_worker(role, endpoint, timeout);
}

Result<uint32_t> Gateway::remove_worker(const std::string& address, milliseconds timeout) {
  return impl_->remove_worker(address, timeout);
}

void Gateway::stop_accepting() {
  impl_->stop_accepting();
}

bool Gateway::wait_idle(milliseconds timeout) {
  return impl_->wait_idle(timeout);
}

}  // namespace dserve::actors
