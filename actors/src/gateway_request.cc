// Reserving a decode worker, claiming a prefill worker and ending attempts: what a request's run
// (gateway_run.cc) asks of the pools, under the gateway's lock where it touches them.

#include <algorithm>

#include <caf/all.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/actors/prefill_interface.h"
#include "gateway_impl.h"

namespace dserve::actors {

using detail::Event;
using detail::milliseconds;
using detail::SteadyClock;

// ---- placing and ending attempts -----------------------------------------------------------

// Reserves room on a decode worker: kResourceExhausted when every healthy worker refused for
// lack of room now (try again later), kInvalidArgument when none can ever take it,
// kUnavailable when none is healthy.
Result<Gateway::Impl::Reserved> Gateway::Impl::reserve(const ReserveRequest& req) {
  std::vector<std::pair<size_t, caf::actor>> order;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i : placement_.decode_order())
      order.emplace_back(i, workers_[i].handle);
  }
  if (order.empty()) return unavailable("no healthy decode worker");
  std::string reasons;
  bool any_retryable = false;
  for (auto& [i, handle] : order) {
    // Bounded by the request's deadline as well: a slow worker must not hold the request past
    // it (a grant that comes too late expires on the worker by the same deadline).
    const auto bound = std::clamp(milliseconds(req.deadline_unix_ms - detail::unix_ms_now()),
                                  milliseconds(1), opt_.reserve_timeout);
    auto reply = rt_.call<ReserveReply>(caf::actor_cast<DecodeActor>(handle), req, bound);
    std::string where;
    {
      std::lock_guard<std::mutex> lock(mu_);
      where = workers_[i].endpoint.to_string();
    }
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
      {
        std::lock_guard<std::mutex> lock(mu_);
        // Still the worker that was asked: not retired by remove_worker, not lost meanwhile.
        if (!workers_[i].removed && workers_[i].handle == handle) {
          placement_.start_decode(i);
          return Reserved{i, std::move(reply).value()};
        }
      }
      send_cancel(Role::kDecode, handle, req.request_id, "the worker left the pool");
      any_retryable = true;
      reasons += "; " + where + ": left the pool as it granted";
      continue;
    }
    any_retryable = any_retryable || reply->retryable;
    reasons += "; " + where + ": " + reply->reason;
    if (reply->retryable) {
      std::lock_guard<std::mutex> lock(mu_);
      workers_[i].refused_since_report = true;
    }
  }
  reasons.erase(0, 2);
  if (any_retryable) return resource_exhausted("no decode worker has room now: " + reasons);
  return invalid_argument("no decode worker can take this request: " + reasons);
}

// Claims room for `tokens` prompt tokens on a prefill worker for `attempt` (Placement's
// choice). kResourceExhausted when all are full, kUnavailable when none is healthy.
Result<Gateway::Impl::Claimed> Gateway::Impl::claim_prefill(RequestId attempt,
                                                            std::span<const uint64_t> chain,
                                                            uint64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  auto chosen = placement_.claim_prefill(chain, tokens);
  if (!chosen.is_ok()) return chosen.status();
  const size_t i = *chosen;
  AttemptRoute& p = routes_.at(attempt);
  p.prefill = i;
  p.prefill_epoch = workers_[i].epoch;
  p.prefill_tokens = tokens;
  return Claimed{i, workers_[i].handle};
}

// The prefill of `p` is over (done, failed or abandoned): its tokens leave the queue count.
void Gateway::Impl::release_prefill_locked(AttemptRoute& p) {
  if (!p.prefill || p.prefill_done) return;
  placement_.end_prefill(*p.prefill, p.prefill_tokens);
  p.prefill_done = true;
  if (workers_[*p.prefill].draining) drained_cv_.notify_all();
  notify_capacity_locked();
}

void Gateway::Impl::cancel_on(size_t worker, Epoch epoch, RequestId attempt,
                              const std::string& reason) {
  caf::actor handle;
  Role role;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Worker& w = workers_[worker];
    if (w.epoch != epoch) return;  // restarted: nothing of ours is left there
    role = w.role;
    if (!w.handle) {
      // Unreachable now (a hung or busy process keeps computing): owed until it is back.
      if (w.cancels_owed.size() >= detail::kMaxCancelsOwed) w.cancels_owed.pop_front();
      w.cancels_owed.emplace_back(attempt, reason);
      return;
    }
    handle = w.handle;
  }
  send_cancel(role, handle, attempt, reason);
}

void Gateway::Impl::send_cancel(Role role, const caf::actor& handle, RequestId attempt,
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

// Ends an attempt: forgets its route, releases its placement counts and, unless it completed,
// cancels what it still holds on its workers.
void Gateway::Impl::end_attempt(RequestId attempt, bool completed, const std::string& reason) {
  // What to cancel, as (worker, epoch); plain values, not the route's optionals.
  size_t decode = 0, prefill = 0;
  Epoch decode_epoch = 0, prefill_epoch = 0;
  bool cancel_decode = false, cancel_prefill = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routes_.find(attempt);
    if (it == routes_.end()) return;
    AttemptRoute& p = it->second;
    if (p.decode) {
      placement_.end_decode(*p.decode);
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
    routes_.erase(it);
    notify_capacity_locked();
  }
  if (completed) return;
  if (cancel_decode) cancel_on(decode, decode_epoch, attempt, reason);
  if (cancel_prefill) cancel_on(prefill, prefill_epoch, attempt, reason);
}

}  // namespace dserve::actors
