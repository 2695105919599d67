#pragma once
// The gateway's insides, shared by its files: gateway.cc (the pools and the public calls),
// gateway_workers.cc (watching the workers), gateway_request.cc (reserving, claiming and ending
// attempts), gateway_run.cc (one request's run, RequestRun) and gateway_metrics.cc.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <caf/actor.hpp>

#include "dserve/actors/gateway.h"
#include "dserve/actors/placement.h"
#include "dserve/ops/metrics.h"

namespace dserve::actors::detail {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int64_t unix_ms_now();
double ms_since(SteadyClock::time_point t);

inline constexpr const char* kRequestIdRule =
    "request_id must be at most 128 characters of [A-Za-z0-9._:-]";
bool is_valid_request_id(const std::string& id);
// A job's fields that no worker could run (kInvalidArgument naming each).
Status validate_job(const GenerateJob& job);

// What a request's run waits for. Every wait of a run is on its Channel: tokens, replies,
// failures, a cancel and room on the workers arrive as events and wake it.
struct Event {
  enum class Kind {
    kChunk,         // tokens from the decode worker (the sink actor routes them)
    kPrefillReply,  // the prefill call returned
    kWorkerDown,    // a worker of the attempt was lost or restarted
    kCancel,        // Gateway::cancel named the request
    kCapacity,      // room may have appeared on the workers (a request ended, a report)
  };
  Kind kind = Kind::kChunk;
  RequestId attempt = 0;  // 0 for kCancel and kCapacity: they concern the request
  TokenChunk chunk;       // kChunk
  std::optional<Result<PrefillReply>> prefill;  // kPrefillReply
  size_t worker = 0;                            // kWorkerDown
  Epoch epoch = 0;
  std::string why;
};

// One request's mailbox, filled by the sink actor, call callbacks, the worker watchers and
// Gateway::cancel.
class Channel {
 public:
  void push(Event e);
  // The next event, or nullopt once `until` passed with none.
  std::optional<Event> pop_until(SteadyClock::time_point until);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

// Where the current attempt of a request runs; guarded by the gateway's mutex (worker
// watchers read it to decide whom a failure concerns).
struct AttemptRoute {
  RequestId attempt = 0;
  std::shared_ptr<Channel> channel;
  std::optional<size_t> decode;
  Epoch decode_epoch = 0;
  std::optional<size_t> prefill;
  Epoch prefill_epoch = 0;
  uint64_t prefill_tokens = 0;  // counted in the prefill worker's queued tokens until done
  bool prefill_sent = false;
  bool prefill_done = false;
  bool waiting_for_room = false;   // told of kCapacity events
  bool room_event_queued = false;  // one kCapacity event at most waits in the channel
};

// A pool member as the gateway watches it (its load is in the Placement, same index).
struct Worker {
  Role role = Role::kPrefill;
  WorkerEndpoint endpoint;
  caf::actor handle;  // null while not connected
  caf::actor watcher;
  uint64_t generation = 0;  // bumped on every connect and every loss
  bool healthy = false;
  Epoch epoch = 0;
  uint64_t restarts = 0;
  int failures = 0;
  bool draining = false;  // being removed: nothing new is placed here
  bool removed = false;   // out of the pool: not probed, not shown, never placed on again
  HealthReport report;
  // It refused a reservation for lack of room since its last report: the next report is news
  // for the requests waiting for room (its room may have changed since it refused).
  bool refused_since_report = false;
  std::string last_error;
  // Attempts abandoned here while the worker was unreachable (missed probes, connection lost):
  // cancelled as soon as it is connected again, so that work nobody waits for stops at its
  // next step instead of running to its deadline. Bounded: the oldest are dropped.
  std::deque<std::pair<RequestId, std::string>> cancels_owed;
};

// Cancels owed to one worker at most (each is a few dozen bytes).
inline constexpr size_t kMaxCancelsOwed = 4096;

// The gateway's metrics in a registry (GatewayOptions::metrics).
struct GatewayMetrics {
  explicit GatewayMetrics(ops::MetricsRegistry& r);
  void record(const GenerateOutcome& out, double seconds);

  ops::Counter &completed, &failed, &cancelled, &refused, &replays, &transfer_bytes;
  ops::Histogram &ttft, &tpot, &duration, &queue, &transfer;
  ops::Gauge &running, &queued;
};

class RequestRun;

}  // namespace dserve::actors::detail

namespace dserve::actors {

class Gateway::Impl {
 public:
  Impl(ActorRuntime& runtime, GatewayOptions options);
  ~Impl();

  void start_threads();
  GatewayActor actor() const { return sink_; }
  Status wait_ready(std::chrono::milliseconds timeout);
  GenerateOutcome generate(const GenerateJob& job, const TokenCallback& on_tokens,
                           const CancelCheck& cancelled);
  GatewaySnapshot snapshot() const;
  Status cancel(const std::string& request_id, const std::string& client, bool admin);
  Status add_worker(Role role, const WorkerEndpoint& ep, std::chrono::milliseconds timeout);
  Result<uint32_t> remove_worker(const std::string& address, std::chrono::milliseconds timeout);
  void stop_accepting();
  bool wait_idle(std::chrono::milliseconds timeout);

  const GatewayOptions& options() const { return opt_; }

 private:
  friend class Gateway;
  friend class detail::RequestRun;
  using Worker = detail::Worker;
  using AttemptRoute = detail::AttemptRoute;

  // ---- the pools (gateway.cc) ----
  size_t append_worker_locked(Role role, const WorkerEndpoint& ep);
  std::optional<size_t> find_worker_locked(const std::string& address) const;
  void retire_locked(size_t i);
  void disconnect_locked(size_t i);
  // Tells the Placement whether worker i can take new requests now.
  void sync_available_locked(size_t i);
  // Wakes the requests waiting for room on the workers.
  void notify_capacity_locked();

  // ---- watching the workers (gateway_workers.cc) ----
  static GatewayActor::behavior_type sink_behavior(GatewayActor::pointer, Impl* impl);
  void route(TokenChunk chunk);
  void probe_loop(size_t i);
  Result<caf::actor> connect(const Worker& w);
  void connect_and_watch(size_t i);
  void probe_once(size_t i);
  void take_report_locked(size_t i, HealthReport report);
  void mark_down_locked(size_t i, const std::string& why);
  void notify_down_locked(size_t i, Epoch epoch, const std::string& why);

  // ---- placing and ending attempts (gateway_request.cc) ----
  struct Reserved {
    size_t decode = 0;
    ReserveReply reply;
  };
  struct Claimed {
    size_t index = 0;
    caf::actor handle;
  };
  Result<Reserved> reserve(const ReserveRequest& req);
  Result<Claimed> claim_prefill(RequestId attempt, std::span<const uint64_t> chain,
                                uint64_t tokens);
  void release_prefill_locked(AttemptRoute& p);
  void cancel_on(size_t worker, Epoch epoch, RequestId attempt, const std::string& reason);
  void send_cancel(Role role, const caf::actor& handle, RequestId attempt,
                   const std::string& reason);
  void end_attempt(RequestId attempt, bool completed, const std::string& reason);
  void update_gauges_locked();

  ActorRuntime& rt_;
  GatewayOptions opt_;
  GatewayActor sink_;

  mutable std::mutex mu_;
  std::condition_variable ready_cv_;
  std::condition_variable stop_cv_;
  std::condition_variable admit_cv_;    // a running slot freed, a queued request cancelled
  std::condition_variable drained_cv_;  // a draining worker lost a request, or a request ended
  bool stopping_ = false;
  bool accepting_ = true;
  std::deque<Worker> workers_;  // grows by add_worker; removed workers stay, marked
  Placement placement_;         // the workers' load, by the same index
  // The running and queued requests by id: how to cancel each, and whose it is.
  struct ActiveRequest {
    std::shared_ptr<std::atomic<bool>> cancel;
    std::shared_ptr<detail::Channel> channel;
    std::string client;
  };
  std::map<std::string, ActiveRequest> active_ids_;
  std::map<RequestId, AttemptRoute> routes_;  // by attempt id
  size_t running_ = 0;
  size_t queued_ = 0;
  GatewayCounters counters_;
  std::atomic<uint64_t> next_request_{1};
  std::atomic<uint64_t> next_request_id_{1};
  std::vector<std::thread> probers_;
  std::unique_ptr<detail::GatewayMetrics> metrics_;
};

}  // namespace dserve::actors
