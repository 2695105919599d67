#include "dserve/actors/gateway.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include <caf/all.hpp>

#include "dserve/core/check.h"
#include "dserve/ops/log.h"
#include "gateway_impl.h"

namespace dserve::actors {
namespace detail {

int64_t unix_ms_now() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double ms_since(SteadyClock::time_point t) {
  return std::chrono::duration<double, std::milli>(SteadyClock::now() - t).count();
}

void Channel::push(Event e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_one();
}

std::optional<Event> Channel::pop_until(SteadyClock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, until, [&] { return !events_.empty(); })) return std::nullopt;
  Event e = std::move(events_.front());
  events_.pop_front();
  return e;
}

namespace {

bool is_request_id_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
         c == '-';
}

}  // namespace

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

}  // namespace detail

using detail::milliseconds;
using detail::SteadyClock;

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

Gateway::Impl::Impl(ActorRuntime& runtime, GatewayOptions options)
    : rt_(runtime),
      opt_(std::move(options)),
      placement_(PlacementOptions{opt_.max_prefill_queue_tokens, opt_.affinity_blocks}) {
  if (opt_.metrics) metrics_ = std::make_unique<detail::GatewayMetrics>(*opt_.metrics);
  for (const auto& ep : opt_.prefill_workers)
    append_worker_locked(Role::kPrefill, ep);
  for (const auto& ep : opt_.decode_workers)
    append_worker_locked(Role::kDecode, ep);
}

// A new pool member at the end of workers_ (indices never change: routes refer to them).
size_t Gateway::Impl::append_worker_locked(Role role, const WorkerEndpoint& ep) {
  Worker w;
  w.role = role;
  w.endpoint = ep;
  workers_.push_back(std::move(w));
  const size_t i = placement_.add_worker(role);
  DSERVE_CHECK_MSG(i + 1 == workers_.size(), "the placement's workers follow the pools'");
  return i;
}

// The pool member (not removed) at `address`, if any.
std::optional<size_t> Gateway::Impl::find_worker_locked(const std::string& address) const {
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (!workers_[i].removed && workers_[i].endpoint.to_string() == address) return i;
  }
  return std::nullopt;
}

void Gateway::Impl::sync_available_locked(size_t i) {
  const Worker& w = workers_[i];
  placement_.set_available(i, w.healthy && w.handle && !w.draining && !w.removed);
}

void Gateway::Impl::notify_capacity_locked() {
  for (auto& [attempt, route] : routes_) {
    if (!route.waiting_for_room || route.room_event_queued) continue;
    route.room_event_queued = true;
    detail::Event e;
    e.kind = detail::Event::Kind::kCapacity;
    route.channel->push(std::move(e));
  }
}

Status Gateway::Impl::add_worker(Role role, const WorkerEndpoint& ep, milliseconds timeout) {
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

Result<uint32_t> Gateway::Impl::remove_worker(const std::string& address, milliseconds timeout) {
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
  sync_available_locked(i);
  const uint32_t had = placement_.load(i).placed;
  if (!drained_cv_.wait_for(lock, timeout, [&] { return placement_.load(i).placed == 0; })) {
    return deadline_exceeded(std::string(role_name(workers_[i].role)) + " worker " + address +
                             " still has " + std::to_string(placement_.load(i).placed) +
                             " requests after " + std::to_string(timeout.count()) +
                             " ms; it stays draining");
  }
  retire_locked(i);
  return had;
}

// Takes worker i out of the pool: no more probes, its connection dropped.
void Gateway::Impl::retire_locked(size_t i) {
  workers_[i].removed = true;
  disconnect_locked(i);
  stop_cv_.notify_all();
}

// Drops worker i's connection: not healthy, its watcher stopped, and whatever the old
// connection's watcher or prober still reports ignored (a new generation).
void Gateway::Impl::disconnect_locked(size_t i) {
  Worker& w = workers_[i];
  w.healthy = false;
  if (w.watcher) caf::anon_send_exit(w.watcher, caf::exit_reason::user_shutdown);
  w.watcher = nullptr;
  w.handle = nullptr;
  ++w.generation;
  sync_available_locked(i);
}

// Requests placed from now on are refused; the ones running go on.
void Gateway::Impl::stop_accepting() {
  std::lock_guard<std::mutex> lock(mu_);
  accepting_ = false;
}

bool Gateway::Impl::wait_idle(milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return drained_cv_.wait_for(lock, timeout, [&] { return running_ + queued_ == 0; });
}

Status Gateway::Impl::cancel(const std::string& request_id, const std::string& client, bool admin) {
  std::optional<std::string> owner;  // set when a request has this id
  bool allowed = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_ids_.find(request_id);
    if (it != active_ids_.end()) {
      owner = it->second.client;
      allowed = admin || *owner == client;
      if (allowed) {
        // The flag for the request's own checks, the event to wake it wherever it waits.
        it->second.cancel->store(true);
        detail::Event e;
        e.kind = detail::Event::Kind::kCancel;
        it->second.channel->push(std::move(e));
        admit_cv_.notify_all();
      }
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

void Gateway::Impl::start_threads() {
  sink_ = rt_.system().spawn(sink_behavior, this);
  rt_.own(sink_);
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < workers_.size(); ++i)
    probers_.emplace_back([this, i] { probe_loop(i); });
}

Gateway::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  ready_cv_.notify_all();
  admit_cv_.notify_all();  // queued requests end (stopping_) instead of waiting for a slot
  drained_cv_.notify_all();
  // No prober is added once stopping_ is set (add_worker checks it under the lock).
  for (auto& t : probers_)
    t.join();
  caf::anon_send_exit(sink_, caf::exit_reason::user_shutdown);
}

Status Gateway::Impl::wait_ready(milliseconds timeout) {
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

GatewaySnapshot Gateway::Impl::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  GatewaySnapshot s;
  for (size_t i = 0; i < workers_.size(); ++i) {
    const Worker& w = workers_[i];
    if (w.removed) continue;
    const WorkerLoad& load = placement_.load(i);
    WorkerView v;
    v.role = w.role;
    v.address = w.endpoint.to_string();
    v.healthy = w.healthy;
    v.draining = w.draining;
    v.placed_total = load.placed_total;
    v.queued_tokens = load.queued_tokens;
    v.epoch = w.epoch;
    v.restarts = w.restarts;
    v.placed = load.placed;
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

void Gateway::Impl::update_gauges_locked() {
  if (!metrics_) return;
  metrics_->running.set(static_cast<double>(running_));
  metrics_->queued.set(static_cast<double>(queued_));
}

Result<std::unique_ptr<Gateway>> Gateway::start(ActorRuntime& runtime, GatewayOptions options) {
  std::string problems;
  if (options.prefill_workers.empty()) problems += "no prefill workers; ";
  if (options.decode_workers.empty()) problems += "no decode workers; ";
  if (options.max_running == 0) problems += "max_running must be at least 1; ";
  if (options.max_attempts < 1 || options.max_attempts > kMaxAttemptsLimit) {
    problems += "max_attempts must be in 1.." + std::to_string(kMaxAttemptsLimit) +
                " (an attempt's id keeps its number in 8 bits); ";
  }
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
  if (request_id.empty() || !detail::is_valid_request_id(request_id)) {
    return invalid_argument(detail::kRequestIdRule);
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
