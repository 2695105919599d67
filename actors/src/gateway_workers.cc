// Watching the workers: the sink actor that routes token chunks to their requests, one prober
// thread per worker (connect, health probes, epochs), and what a lost or restarted worker
// means for the requests placed on it.

#include <caf/all.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/actors/prefill_interface.h"
#include "gateway_impl.h"

namespace dserve::actors {

using detail::Event;

GatewayActor::behavior_type Gateway::Impl::sink_behavior(GatewayActor::pointer, Impl* impl) {
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

void Gateway::Impl::route(TokenChunk chunk) {
  std::shared_ptr<detail::Channel> ch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routes_.find(chunk.request_id);
    if (it == routes_.end()) return;  // an attempt that ended: stale
    ch = it->second.channel;
  }
  Event e;
  e.kind = Event::Kind::kChunk;
  e.attempt = chunk.request_id;
  e.chunk = std::move(chunk);
  ch->push(std::move(e));
}

void Gateway::Impl::probe_loop(size_t i) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_ && !workers_[i].removed) {
    lock.unlock();
    probe_once(i);
    lock.lock();
    stop_cv_.wait_for(lock, opt_.probe_interval, [&] { return stopping_; });
  }
}

Result<caf::actor> Gateway::Impl::connect(const Worker& w) {
  if (w.role == Role::kPrefill) {
    auto h = rt_.connect<PrefillActor>(w.endpoint.host, w.endpoint.port, opt_.probe_timeout);
    if (!h.is_ok()) return h.status();
    return caf::actor_cast<caf::actor>(*h);
  }
  auto h = rt_.connect<DecodeActor>(w.endpoint.host, w.endpoint.port, opt_.probe_timeout);
  if (!h.is_ok()) return h.status();
  return caf::actor_cast<caf::actor>(*h);
}

// Connects to worker i (not connected now), pays the cancels owed to it and watches the
// connection: a drop marks the worker down at once.
void Gateway::Impl::connect_and_watch(size_t i) {
  std::deque<std::pair<RequestId, std::string>> owed;
  Worker copy_for_connect;
  {
    std::lock_guard<std::mutex> lock(mu_);
    copy_for_connect.role = workers_[i].role;
    copy_for_connect.endpoint = workers_[i].endpoint;
  }
  auto connected = connect(copy_for_connect);
  caf::actor handle;
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
    send_cancel(copy_for_connect.role, handle, attempt, reason);
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

void Gateway::Impl::probe_once(size_t i) {
  caf::actor handle;
  Role role;
  {
    std::lock_guard<std::mutex> lock(mu_);
    handle = workers_[i].handle;
    role = workers_[i].role;
  }
  if (!handle) {
    connect_and_watch(i);
    std::lock_guard<std::mutex> lock(mu_);
    handle = workers_[i].handle;
  }
  if (!handle) return;
  const HealthProbe probe{Role::kGateway, rt_.epoch(), detail::unix_ms_now()};
  Result<HealthReport> report =
      role == Role::kPrefill
          ? rt_.call<HealthReport>(caf::actor_cast<PrefillActor>(handle), probe, opt_.probe_timeout)
          : rt_.call<HealthReport>(caf::actor_cast<DecodeActor>(handle), probe, opt_.probe_timeout);
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
  take_report_locked(i, std::move(report).value());
}

void Gateway::Impl::take_report_locked(size_t i, HealthReport report) {
  Worker& w = workers_[i];
  w.failures = 0;
  // A peer's figures are shown, never trusted for size: at most every bucket and k.
  if (report.speculation_tokens_per_second.size() > kMaxSpeculationFigures)
    report.speculation_tokens_per_second.clear();
  if (w.epoch != 0 && report.epoch != w.epoch) {
    // A new incarnation: whatever the old one held (reservations, keys, cache) is gone.
    notify_down_locked(i, w.epoch, "restarted (new epoch)");
    ++w.restarts;
    placement_.forget_prefixes(i);
  }
  // Room may have appeared: a worker that came back, one that reports more free KV bytes or
  // fewer requests than before (a reservation expired there, a region was purged), or one
  // that refused a reservation since its last report (what it says now is newer than that).
  const bool more_room = !w.healthy || w.refused_since_report ||
                         report.free_kv_bytes > w.report.free_kv_bytes ||
                         report.active_requests + report.queued_requests <
                             w.report.active_requests + w.report.queued_requests;
  w.refused_since_report = false;
  w.epoch = report.epoch;
  w.report = std::move(report);
  w.last_error.clear();
  placement_.set_free_kv_bytes(i, w.report.free_kv_bytes);
  if (!w.healthy) {
    w.healthy = true;
    sync_available_locked(i);
    ready_cv_.notify_all();
  }
  if (more_room) notify_capacity_locked();
}

void Gateway::Impl::mark_down_locked(size_t i, const std::string& why) {
  Worker& w = workers_[i];
  w.last_error = why;
  w.failures = 0;
  disconnect_locked(i);
  notify_down_locked(i, w.epoch, why);
}

void Gateway::Impl::notify_down_locked(size_t i, Epoch epoch, const std::string& why) {
  const std::string who = std::string(role_name(workers_[i].role)) + " worker " +
                          workers_[i].endpoint.to_string() + " " + why;
  for (auto& [attempt, p] : routes_) {
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

}  // namespace dserve::actors
