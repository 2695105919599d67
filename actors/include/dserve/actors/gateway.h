#pragma once
// Gateway: admits requests, places each on a decode worker (reservation first) and a prefill
// worker, streams its tokens back in order, and replays it elsewhere when a worker fails.
//
// How one request runs (generate()):
//   1. Admission: at most `max_running` requests are placed at once; up to `max_queued` more
//      wait for a slot (bounded by their deadline); beyond that a request is refused at once
//      with kResourceExhausted.
//   2. Prefill choice: among healthy prefill workers with room in their queue (at most
//      `max_prefill_queue_tokens` prompt tokens placed and not yet prefilled), the one whose
//      cache most likely holds the longest prefix of the prompt (an approximate index of the
//      128-token blocks this gateway sent each worker, cleared when the worker restarts), then
//      the one with the fewest queued tokens. When all are full the request waits here,
//      holding nothing on any worker.
//   3. Decode choice: among healthy decode workers, the one with the fewest requests this
//      gateway has placed there, then the most free KV bytes; its reservation comes before any
//      prefill starts. A refusal (batch or KV full) moves on to the next; when every worker is
//      full the request waits and tries again until its deadline.
//   4. The prefill worker computes and writes the state into the reserved region (UCX); the
//      decode worker streams TokenChunks to this gateway's sink actor, which routes them to the
//      request by attempt id. Tokens reach the caller in order, each exactly once.
//   5. Failure of a step (prefill failed or died, decode refused the hand-off, decode died
//      mid-stream, a corrupted transfer) releases what the attempt holds and replays the
//      request on other workers: the prompt plus the tokens already delivered, the remaining
//      token budget, and the sampling seed advanced past the tokens drawn, so the continuation
//      is the one the first placement would have produced. At most `max_attempts` placements,
//      and at most `max_prefill_losses` prefill workers lost while computing its prompt (a
//      prompt that hangs or kills every worker it is given fails rather than go round the pool).
//   6. Cancellation by the caller or the deadline releases everything on both workers.
// Every request therefore ends: completed, or failed with a Status that says why, no later
// than its deadline.
//
// Workers are watched two ways: the CAF connection (a dead process is seen at once) and
// periodic health probes (a hung one is seen after `probe_failures_before_down` misses; a
// restarted one by its new epoch, so nothing it held before is used again).
//
// Where each part lives: Placement (placement.h) makes the choices of steps 2 and 3 and counts
// what each worker holds; a request's run (actors/src/gateway_run.cc) waits only on events (its
// tokens, the prefill's reply, a lost worker, a cancel, room that may have appeared, a freed
// running slot), each wait bounded by the deadline.
//
// Thread-safety: generate() is called concurrently from any number of threads that are not
// actor threads (it blocks); snapshot() from anywhere.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/gateway_interface.h"
#include "dserve/actors/messages.h"
#include "dserve/core/status.h"

namespace dserve::ops {
class Logger;
class MetricsRegistry;
}  // namespace dserve::ops

namespace dserve::actors {

struct WorkerEndpoint {
  std::string host;
  uint16_t port = 0;
  std::string to_string() const { return host + ":" + std::to_string(port); }
};

// "host:port" -> endpoint; kInvalidArgument naming what is wrong.
Result<WorkerEndpoint> parse_endpoint(std::string_view text);
// "h1:p1,h2:p2" -> endpoints (empty text -> none).
Result<std::vector<WorkerEndpoint>> parse_endpoints(std::string_view text);

// Placements of one request at most: an attempt's id keeps its number in 8 bits.
inline constexpr int kMaxAttemptsLimit = 256;

struct GatewayOptions {
  std::vector<WorkerEndpoint> prefill_workers;
  std::vector<WorkerEndpoint> decode_workers;
  std::chrono::milliseconds probe_interval{250};
  std::chrono::milliseconds probe_timeout{2000};
  int probe_failures_before_down = 3;
  // Bound on one ReserveRequest round trip.
  std::chrono::milliseconds reserve_timeout{5000};
  // While an attempt's prefill runs, its decode reservation is renewed this often
  // (RenewReservation); keep it well under the decode workers' --reservation-timeout-ms.
  std::chrono::milliseconds reservation_renewal{5000};
  // Deadline of a request that names none.
  std::chrono::milliseconds default_deadline{300000};
  size_t max_running = 256;
  size_t max_queued = 1024;
  int max_attempts = 4;
  // A request whose prefill worker was lost (hung past its probes, crashed, restarted) while
  // it computed the prompt this many times fails (RESOURCE_EXHAUSTED) instead of being placed
  // again: one prompt must not take down the pool worker by worker.
  int max_prefill_losses = 2;
  // A request that finds no room (every prefill queue full, every decode worker refusing for
  // lack of room) waits for an event that may bring room: a request ended, a prefill finished,
  // a worker became reachable or reported more free KV bytes or fewer requests. This bounds the
  // wait between two asks when no such event comes (room freed by another gateway, say).
  std::chrono::milliseconds capacity_retry{250};
  // Prompt tokens placed on one prefill worker and not yet prefilled; a request waits at the
  // gateway (holding nothing on the workers) until a worker has room. An idle worker takes a
  // prompt of any length.
  uint64_t max_prefill_queue_tokens = 8192;
  // Blocks remembered per prefill worker by the prefix-affinity index.
  size_t affinity_blocks = 1 << 20;
  // Where the gateway's metrics go (must outlive the gateway); null: none. Registered:
  // dserve_gateway_requests_total{outcome}, _replays_total, _kv_transfer_bytes_total, the
  // histograms _time_to_first_token_seconds, _time_per_output_token_seconds,
  // _request_duration_seconds, _queue_seconds, _kv_transfer_seconds, and the gauges
  // _running_requests and _queued_requests.
  ops::MetricsRegistry* metrics = nullptr;
  // Where the request's life is logged (must outlive the gateway); null: nowhere. Events, each
  // with the request id: admitted, placed (prefill and decode addresses, attempt), replayed
  // (why), finished (outcome, tokens, ttft_ms). The id also travels to the workers as
  // ReserveRequest/PrefillRequest::trace_id, so that their logs carry it too.
  ops::Logger* log = nullptr;
};

struct GenerateJob {
  std::vector<TokenId> prompt;
  uint32_t max_new_tokens = 64;
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  // model::SamplingParams's penalties and logit bias: checked by the API that made the job
  // (model::validate_sampling_params) and again by the decode worker.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<std::pair<int32_t, float>> logit_bias;
  // Absolute wall-clock deadline in ms since the Unix epoch; 0: now + default_deadline.
  int64_t deadline_unix_ms = 0;
  // The caller's id for the request (what cancel() names and every process logs); unique among
  // running requests (kInvalidArgument otherwise). Empty: the gateway assigns one.
  std::string request_id;
  // Who sent it (the client's name in the token file; "anonymous" without one), for the logs.
  std::string client;
};

struct GenerateOutcome {
  std::string request_id;             // the job's, or the one the gateway assigned
  Status status;                      // ok: the request finished
  std::string finish_reason;          // on success: "stop" (end of sequence) or "length"
  uint32_t tokens = 0;                // delivered to the caller
  uint32_t attempts = 0;              // placements tried (1 when nothing failed)
  uint32_t cached_prefix_tokens = 0;  // of the last placement's prefill
  double queue_ms = 0;                // waiting for admission and for decode room
  double ttft_ms = 0;                 // admission to first token (0 when none)
  // The last placement's hand-off (PrefillReply): prefill queue + compute, the KV bytes written
  // into the decode worker's region, that write, and write to the decode's acknowledgement.
  double prefill_ms = 0;
  uint64_t transfer_bytes = 0;
  double transfer_ms = 0;
  double handoff_ms = 0;
};

// New tokens in order: tokens[i] is output position first_index + i. Never repeats a position.
using TokenCallback = std::function<void(std::span<const TokenId> tokens, uint32_t first_index)>;
// Asked while the request waits (about every 20 ms: a client gone from a synchronous gRPC call
// or an HTTP stream has no event); true cancels it. Gateway::cancel wakes the request at once.
using CancelCheck = std::function<bool()>;

struct WorkerView {
  Role role = Role::kPrefill;
  std::string address;
  bool healthy = false;
  bool draining = false;  // being removed (remove_worker): nothing new is placed on it
  Epoch epoch = 0;
  uint64_t restarts = 0;       // new epochs seen after the first
  uint32_t placed = 0;         // requests this gateway has on it now
  uint64_t placed_total = 0;   // requests this gateway has ever placed on it
  uint64_t queued_tokens = 0;  // prefill: prompt tokens placed and not yet prefilled
  HealthReport last_report;
  std::string last_error;
};

struct GatewayCounters {
  uint64_t admitted = 0;
  uint64_t completed = 0;
  uint64_t failed = 0;
  uint64_t cancelled = 0;
  uint64_t refused = 0;  // queue full
  uint64_t replays = 0;  // placements after the first
};

struct GatewaySnapshot {
  std::vector<WorkerView> workers;
  size_t running = 0;
  size_t queued = 0;
  GatewayCounters counters;
  bool accepting = true;  // false after stop_accepting()
};

class Gateway {
 public:
  // Spawns the sink actor and the worker watchers; connects in the background. The runtime
  // must outlive the gateway. Fails on options that cannot work (no workers of a role,
  // zero limits).
  static Result<std::unique_ptr<Gateway>> start(ActorRuntime& runtime, GatewayOptions options);
  ~Gateway();
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  // The actor to publish at the gateway's control address (token sink + health).
  GatewayActor actor() const;

  // Blocks until at least one prefill and one decode worker are healthy; kUnavailable naming
  // the workers that are not, after `timeout`.
  Status wait_ready(std::chrono::milliseconds timeout);

  // Runs one request to its end (see the file comment). Blocks the calling thread.
  GenerateOutcome generate(const GenerateJob& job, const TokenCallback& on_tokens,
                           const CancelCheck& cancelled);

  // The pool members (workers removed by remove_worker are not shown).
  GatewaySnapshot snapshot() const;

  // Cancels the running or queued request with this id on behalf of `client` (a
  // GenerateJob::client): its generate() returns kCancelled and what it holds on the workers is
  // released. A request belongs to the client that made it; only it, or an `admin`, may cancel
  // it. kNotFound when no such request runs, or it is another client's (the same answer, so
  // that ids of others' requests cannot be probed; the refusal is logged); kInvalidArgument for
  // an id no request can have.
  Status cancel(const std::string& request_id, const std::string& client, bool admin);

  // Adds a running worker process to the prefill or decode pool; returns once the gateway has
  // seen it healthy. kInvalidArgument when the address is already in a pool; kUnavailable
  // (and the worker stays out) when it is not healthy within `timeout`.
  Status add_worker(Role role, const WorkerEndpoint& endpoint, std::chrono::milliseconds timeout);

  // Drains the worker at `address` ("host:port"): nothing new is placed on it, and once the
  // requests it has are done (decode: finished; prefill: handed off) it leaves the pool; returns
  // how many it had when draining began. kNotFound for an unknown address, kInvalidArgument for
  // the last worker of its pool, kDeadlineExceeded when it still has requests after `timeout`
  // (it stays draining).
  Result<uint32_t> remove_worker(const std::string& address, std::chrono::milliseconds timeout);

  // From now on generate() refuses new requests (kUnavailable); the running ones go on.
  void stop_accepting();
  // Waits until no request runs or waits; false after `timeout`.
  bool wait_idle(std::chrono::milliseconds timeout);

  class Impl;

 private:
  explicit Gateway(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dserve::actors
