// RequestRun: one request's run through the gateway (Gateway::generate). Admission, then
// attempts: each claims a prefill worker, reserves a decode worker, sends the prefill and
// streams the tokens, and is replayed elsewhere when a worker fails. Every wait is on an
// event: the request's Channel (tokens, replies, lost workers, a cancel, room that may have
// appeared on the workers) or the admission condition (a running slot freed, a cancel), each
// bounded by the request's deadline. The one thing with no event is the caller's CancelCheck
// (a client gone from a synchronous gRPC call or an HTTP stream): it is asked every
// kCancelCheckInterval while the request waits.

#include <algorithm>
#include <set>

#include <caf/all.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/actors/prefill_interface.h"
#include "dserve/actors/prefix_affinity.h"
#include "dserve/core/random.h"
#include "dserve/ops/log.h"
#include "gateway_impl.h"

namespace dserve::actors::detail {

inline constexpr milliseconds kCancelCheckInterval{20};

class RequestRun {
 public:
  RequestRun(Gateway::Impl& gw, const GenerateJob& job, const TokenCallback& on_tokens,
             const CancelCheck& cancelled)
      : gw_(gw), job_(job), on_tokens_(on_tokens), cancelled_(cancelled) {}

  GenerateOutcome run();

 private:
  using Impl = Gateway::Impl;
  // How an attempt ended: the request is over (out_ says how), or it is placed again.
  enum class AttemptEnd { kFinished, kReplay };

  struct Attempt {
    uint32_t number = 0;
    RequestId id = 0;
    uint32_t offset = 0;          // tokens delivered before this attempt
    std::vector<TokenId> prompt;  // the request's prompt plus those tokens
    std::vector<uint64_t> chain;  // its block chain (prefix affinity)
    Impl::Claimed prefill;
    Impl::Reserved decode;
    bool prefill_replied = false;
  };

  bool register_id();
  bool admit();
  void leave_slot();
  std::optional<AttemptEnd> before_attempt(uint32_t attempt_no);
  AttemptEnd run_attempt(uint32_t attempt_no);
  ReserveRequest reserve_request(const Attempt& a) const;
  std::optional<AttemptEnd> claim_prefill(Attempt& a);
  std::optional<AttemptEnd> reserve_decode(Attempt& a);
  std::optional<AttemptEnd> wait_for_room(Attempt& a, const std::string& what);
  bool send_prefill(Attempt& a);
  AttemptEnd stream(Attempt& a);
  std::optional<AttemptEnd> on_chunk(Attempt& a, const TokenChunk& c);
  std::optional<AttemptEnd> on_prefill_reply(Attempt& a, const Result<PrefillReply>& r);
  std::optional<AttemptEnd> on_worker_down(Attempt& a, const Event& ev);
  bool count_prefill_loss(const Attempt& a, size_t worker);

  bool is_cancelled() const { return cancel_flag_->load() || (cancelled_ && cancelled_()); }
  // The next event on the channel before `until`; a kCancel event as soon as the request is
  // cancelled by either route.
  std::optional<Event> next_event(SteadyClock::time_point until);
  AttemptEnd finish(Status status);
  AttemptEnd finish_attempt(RequestId attempt, bool completed, const std::string& reason,
                            Status status);

  Impl& gw_;
  const GenerateJob& job_;
  const TokenCallback& on_tokens_;
  const CancelCheck& cancelled_;

  GenerateOutcome out_;
  std::shared_ptr<std::atomic<bool>> cancel_flag_ = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<Channel> channel_ = std::make_shared<Channel>();
  SteadyClock::time_point admitted_at_;
  int64_t deadline_ms_ = 0;
  SteadyClock::time_point deadline_;
  uint64_t base_ = 0;
  std::vector<TokenId> produced_;
  std::string last_error_;
  // Prefill workers (by index) lost (hung past their probes, crashed, restarted) while they
  // computed this request's prompt: a prompt that takes down every worker it is given is not
  // replayed on and on. One loss is often seen twice (the call fails, the connection drops) and
  // may be seen again by the next attempt if it was placed there before the loss was known.
  std::set<size_t> prefill_lost_;
};

std::optional<Event> RequestRun::next_event(SteadyClock::time_point until) {
  for (;;) {
    if (is_cancelled()) {
      Event e;
      e.kind = Event::Kind::kCancel;
      return e;
    }
    const auto wake =
        cancelled_ ? std::min(until, SteadyClock::now() + kCancelCheckInterval) : until;
    if (auto ev = channel_->pop_until(wake)) return ev;
    if (SteadyClock::now() >= until) return std::nullopt;
  }
}

// Ends the request with `status`, counted as completed, cancelled or failed by its code.
RequestRun::AttemptEnd RequestRun::finish(Status status) {
  out_.status = std::move(status);
  out_.tokens = static_cast<uint32_t>(produced_.size());
  std::lock_guard<std::mutex> lock(gw_.mu_);
  if (out_.status.is_ok()) {
    ++gw_.counters_.completed;
  } else if (out_.status.code() == StatusCode::kCancelled) {
    ++gw_.counters_.cancelled;
  } else {
    ++gw_.counters_.failed;
  }
  return AttemptEnd::kFinished;
}

RequestRun::AttemptEnd RequestRun::finish_attempt(RequestId attempt, bool completed,
                                                  const std::string& reason, Status status) {
  gw_.end_attempt(attempt, completed, reason);
  return finish(std::move(status));
}

// Enters the request's id among the running ones; false (out_.status set) when it cannot run.
bool RequestRun::register_id() {
  std::lock_guard<std::mutex> lock(gw_.mu_);
  if (!gw_.accepting_ || gw_.stopping_) {
    ++gw_.counters_.refused;
    out_.status = unavailable("the gateway is shutting down and admits no new request");
    return false;
  }
  if (!gw_.active_ids_
           .emplace(out_.request_id, Impl::ActiveRequest{cancel_flag_, channel_, job_.client})
           .second) {
    out_.status = invalid_argument("request_id '" + out_.request_id +
                                   "' is already in use by a running request");
    return false;
  }
  return true;
}

// Takes one of the max_running slots, waiting in the queue (up to max_queued) until one frees,
// the deadline passes or the request is cancelled; false (out_.status set) when it got none.
bool RequestRun::admit() {
  std::unique_lock<std::mutex> lock(gw_.mu_);
  const GatewayOptions& opt = gw_.opt_;
  if (gw_.running_ >= opt.max_running) {
    if (gw_.queued_ >= opt.max_queued) {
      ++gw_.counters_.refused;
      out_.status = resource_exhausted("the gateway is full: " + std::to_string(gw_.running_) +
                                       " requests running and " + std::to_string(gw_.queued_) +
                                       " queued (limits " + std::to_string(opt.max_running) +
                                       " and " + std::to_string(opt.max_queued) + ")");
      return false;
    }
    ++gw_.queued_;
    gw_.update_gauges_locked();
    while (gw_.running_ >= opt.max_running) {
      if (SteadyClock::now() >= deadline_ || is_cancelled() || gw_.stopping_) break;
      const auto wake =
          cancelled_ ? std::min(deadline_, SteadyClock::now() + kCancelCheckInterval) : deadline_;
      gw_.admit_cv_.wait_until(lock, wake);
    }
    --gw_.queued_;
    gw_.update_gauges_locked();
    gw_.drained_cv_.notify_all();
    if (gw_.running_ >= opt.max_running || is_cancelled()) {
      // A slot this request was woken for but does not take goes to the next in the queue.
      if (gw_.running_ < opt.max_running) gw_.admit_cv_.notify_one();
      ++(is_cancelled() ? gw_.counters_.cancelled : gw_.counters_.failed);
      out_.status = is_cancelled() ? cancelled_error("cancelled while queued")
                                   : deadline_exceeded("the deadline passed while queued (" +
                                                       std::to_string(gw_.queued_) + " queued)");
      return false;
    }
  }
  ++gw_.running_;
  gw_.update_gauges_locked();
  ++gw_.counters_.admitted;
  return true;
}

void RequestRun::leave_slot() {
  {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    --gw_.running_;
    gw_.update_gauges_locked();
  }
  gw_.admit_cv_.notify_one();
  gw_.drained_cv_.notify_all();
}

GenerateOutcome RequestRun::run() {
  if (Status v = validate_job(job_); !v.is_ok()) {
    out_.status = v;
    return out_;
  }
  // The request's id: the caller's, or one unique to this gateway incarnation.
  out_.request_id = job_.request_id.empty()
                        ? "gw-" + std::to_string(gw_.rt_.epoch() % 1000000) + "-" +
                              std::to_string(gw_.next_request_id_.fetch_add(1))
                        : job_.request_id;
  if (!register_id()) return out_;
  struct ActiveId {
    Impl& gw;
    std::string id;
    ~ActiveId() {
      std::lock_guard<std::mutex> lock(gw.mu_);
      gw.active_ids_.erase(id);
    }
  } active_id{gw_, out_.request_id};
  admitted_at_ = SteadyClock::now();
  deadline_ms_ = job_.deadline_unix_ms > 0 ? job_.deadline_unix_ms
                                           : unix_ms_now() + gw_.opt_.default_deadline.count();
  deadline_ = SteadyClock::now() + milliseconds(deadline_ms_ - unix_ms_now());
  if (!admit()) return out_;
  struct RunningSlot {
    RequestRun& run;
    ~RunningSlot() { run.leave_slot(); }
  } slot{*this};
  out_.queue_ms = ms_since(admitted_at_);
  if (gw_.opt_.log) {
    gw_.opt_.log->info("admitted", out_.request_id,
                       {{"client", job_.client},
                        {"prompt_tokens", job_.prompt.size()},
                        {"max_new_tokens", job_.max_new_tokens},
                        {"queue_ms", out_.queue_ms}});
  }
  base_ = gw_.next_request_.fetch_add(1);
  produced_.reserve(job_.max_new_tokens);
  for (uint32_t attempt_no = 0;; ++attempt_no) {
    if (before_attempt(attempt_no)) return out_;
    if (run_attempt(attempt_no) == AttemptEnd::kFinished) return out_;
    if (gw_.opt_.log) {
      gw_.opt_.log->warn(
          "replayed", out_.request_id,
          {{"attempt", attempt_no + 1}, {"tokens", produced_.size()}, {"why", last_error_}});
    }
  }
}

// The request's end before another placement, if it has come.
std::optional<RequestRun::AttemptEnd> RequestRun::before_attempt(uint32_t attempt_no) {
  if (produced_.size() >= job_.max_new_tokens) {
    out_.finish_reason = "length";
    return finish(Status::ok());
  }
  // A failure at or after the deadline (often caused by it: the prefill call is bounded by the
  // deadline) is no reason to place the request again: it ends as DEADLINE_EXCEEDED.
  if (attempt_no > 0 && SteadyClock::now() >= deadline_) {
    return finish(deadline_exceeded("the deadline passed after " +
                                    std::to_string(produced_.size()) +
                                    " tokens; the last failure: " + last_error_));
  }
  if (attempt_no >= static_cast<uint32_t>(gw_.opt_.max_attempts)) {
    return finish(unavailable("gave up after " + std::to_string(attempt_no) +
                              " placements; the last failure: " + last_error_));
  }
  return std::nullopt;
}

RequestRun::AttemptEnd RequestRun::run_attempt(uint32_t attempt_no) {
  if (attempt_no > 0) {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    ++gw_.counters_.replays;
  }
  out_.attempts = attempt_no + 1;
  Attempt a;
  a.number = attempt_no;
  a.id = (base_ << 8) | attempt_no;
  a.offset = static_cast<uint32_t>(produced_.size());
  a.prompt = job_.prompt;
  a.prompt.insert(a.prompt.end(), produced_.begin(), produced_.end());
  a.chain = prompt_block_chain(a.prompt);
  // Register the route first: a token may arrive before the reservation returns to us. It
  // waits for room (kCapacity events) until the decode worker is reserved.
  {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    AttemptRoute route;
    route.attempt = a.id;
    route.channel = channel_;
    route.waiting_for_room = true;
    gw_.routes_.emplace(a.id, std::move(route));
  }
  // A prefill worker with room in its queue first, so that decode reservations are not held
  // (and do not expire) while prompts wait in a prefill queue.
  const auto wait_started = SteadyClock::now();
  if (auto end = claim_prefill(a)) return *end;
  if (auto end = reserve_decode(a)) return *end;
  out_.queue_ms += ms_since(wait_started);
  if (!send_prefill(a)) {
    // Its prefill worker was lost or restarted while the decode worker was reserved: the
    // prompt never reached it, so this is no prefill loss of the prompt's making.
    gw_.end_attempt(a.id, false, "the prefill worker was lost");
    return AttemptEnd::kReplay;
  }
  return stream(a);
}

// Waits for room on the workers: a kCapacity event, or capacity_retry without one (ask again:
// nothing returned); the request's or the attempt's end when it is cancelled, its deadline
// passes or the prefill worker it claimed is lost meanwhile.
std::optional<RequestRun::AttemptEnd> RequestRun::wait_for_room(Attempt& a,
                                                                const std::string& what) {
  const auto until = std::min(deadline_, SteadyClock::now() + gw_.opt_.capacity_retry);
  for (;;) {
    if (SteadyClock::now() >= deadline_) {
      return finish_attempt(
          a.id, true, "",
          deadline_exceeded("the deadline passed while waiting for " + what + ": " + last_error_));
    }
    std::optional<Event> ev = next_event(until);
    if (!ev) {
      if (SteadyClock::now() >= deadline_) continue;
      return std::nullopt;  // ask again
    }
    switch (ev->kind) {
      case Event::Kind::kCancel:
        return finish_attempt(a.id, false, "cancelled by the client",
                              cancelled_error("cancelled while waiting for " + what));
      case Event::Kind::kCapacity: {
        std::lock_guard<std::mutex> lock(gw_.mu_);
        auto it = gw_.routes_.find(a.id);
        if (it != gw_.routes_.end()) it->second.room_event_queued = false;
        return std::nullopt;
      }
      case Event::Kind::kWorkerDown:
        if (ev->attempt != a.id) break;
        // The prefill worker claimed for this attempt is gone before it got the prompt.
        last_error_ = ev->why;
        gw_.end_attempt(a.id, false, "a worker of this request failed");
        return AttemptEnd::kReplay;
      case Event::Kind::kChunk:
      case Event::Kind::kPrefillReply:
        break;  // an earlier attempt's
    }
  }
}

// Claims a prefill worker, waiting while every one's queue is full; the attempt's end if it
// cannot.
std::optional<RequestRun::AttemptEnd> RequestRun::claim_prefill(Attempt& a) {
  for (;;) {
    auto c = gw_.claim_prefill(a.id, a.chain, a.prompt.size());
    if (c.is_ok()) {
      a.prefill = std::move(c).value();
      return std::nullopt;
    }
    last_error_ = c.status().message();
    if (auto end = wait_for_room(a, "a prefill worker")) return end;
  }
}

ReserveRequest RequestRun::reserve_request(const Attempt& a) const {
  ReserveRequest r;
  r.request_id = a.id;
  r.prompt_tokens = static_cast<uint32_t>(a.prompt.size());
  r.max_new_tokens = job_.max_new_tokens - a.offset;
  r.deadline_unix_ms = deadline_ms_;
  r.stream_to = caf::actor_cast<TokenSinkActor>(gw_.sink_);
  r.temperature = job_.temperature;
  r.top_k = job_.top_k;
  r.top_p = job_.top_p;
  // One draw per sampled token: skipping the draws of the delivered tokens continues the same
  // random stream.
  r.seed = job_.seed + static_cast<uint64_t>(a.offset) * kSplitMix64Gamma;
  r.presence_penalty = job_.presence_penalty;
  r.frequency_penalty = job_.frequency_penalty;
  for (const auto& [id, bias] : job_.logit_bias) {
    r.logit_bias_ids.push_back(id);
    r.logit_bias_values.push_back(bias);
  }
  // The penalties count what was generated before this placement too.
  if (job_.presence_penalty != 0.0f || job_.frequency_penalty != 0.0f)
    r.generated.assign(produced_.begin(), produced_.end());
  r.trace_id = out_.request_id;
  return r;
}

// Reserves a decode worker, waiting while every one is full; the attempt's end if it cannot.
std::optional<RequestRun::AttemptEnd> RequestRun::reserve_decode(Attempt& a) {
  const ReserveRequest req = reserve_request(a);
  for (;;) {
    auto r = gw_.reserve(req);
    if (r.is_ok()) {
      a.decode = std::move(r).value();
      return std::nullopt;
    }
    last_error_ = r.status().message();
    const bool can_wait = r.status().code() == StatusCode::kResourceExhausted ||
                          r.status().code() == StatusCode::kUnavailable;
    if (!can_wait) return finish_attempt(a.id, true, "", r.status());
    if (auto end = wait_for_room(a, "a decode worker")) return end;
  }
}

// Records the placement and sends the prompt to the prefill worker; its reply comes back as an
// event. False (nothing sent) when the prefill worker claimed for it is no longer the one
// claimed (lost, restarted).
bool RequestRun::send_prefill(Attempt& a) {
  const ReserveReply& grant = a.decode.reply;
  PrefillRequest preq;
  preq.request_id = a.id;
  preq.prompt = a.prompt;
  preq.deadline_unix_ms = deadline_ms_;
  preq.trace_id = out_.request_id;
  std::string prefill_at, decode_at;  // for the log
  {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    AttemptRoute& p = gw_.routes_.at(a.id);
    p.decode = a.decode.decode;
    p.decode_epoch = grant.decode_epoch;
    p.waiting_for_room = false;
    const Worker& pre = gw_.workers_[a.prefill.index];
    if (pre.epoch != p.prefill_epoch || pre.handle != a.prefill.handle) {
      last_error_ = "prefill worker " + pre.endpoint.to_string() +
                    " was lost before it got the prompt" +
                    (pre.last_error.empty() ? "" : ": " + pre.last_error);
      return false;
    }
    p.prefill_sent = true;
    const Worker& d = gw_.workers_[a.decode.decode];
    preq.target = DecodeTarget{d.endpoint.host, d.endpoint.port, grant.decode_epoch,
                               grant.reservation_id, grant.transfer_keys};
    prefill_at = gw_.workers_[a.prefill.index].endpoint.to_string();
    decode_at = d.endpoint.to_string();
  }
  if (gw_.opt_.log) {
    gw_.opt_.log->info("placed", out_.request_id,
                       {{"prefill", prefill_at},
                        {"decode", decode_at},
                        {"attempt", a.number + 1},
                        {"prompt_tokens", a.prompt.size()}});
  }
  const auto left = std::max(
      milliseconds(1), std::chrono::duration_cast<milliseconds>(deadline_ - SteadyClock::now()));
  gw_.rt_.call_async<PrefillReply>(caf::actor_cast<PrefillActor>(a.prefill.handle), std::move(preq),
                                   left,
                                   [channel = channel_, attempt = a.id](Result<PrefillReply> r) {
                                     Event e;
                                     e.kind = Event::Kind::kPrefillReply;
                                     e.attempt = attempt;
                                     e.prefill.emplace(std::move(r));
                                     channel->push(std::move(e));
                                   });
  return true;
}

// Streams the attempt's tokens to the caller until the request ends or the attempt fails.
// While the prefill runs, the decode reservation's lease is renewed (a long prompt takes
// longer than the decode worker's reservation timeout).
RequestRun::AttemptEnd RequestRun::stream(Attempt& a) {
  caf::actor decode_handle;
  {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    decode_handle = gw_.workers_[a.decode.decode].handle;
  }
  auto next_renewal = SteadyClock::now() + gw_.opt_.reservation_renewal;
  for (;;) {
    const bool renewing = !a.prefill_replied && decode_handle;
    std::optional<Event> ev = next_event(renewing ? std::min(deadline_, next_renewal) : deadline_);
    if (renewing && SteadyClock::now() >= next_renewal) {
      next_renewal = SteadyClock::now() + gw_.opt_.reservation_renewal;
      gw_.rt_.call_async<RenewReply>(caf::actor_cast<DecodeActor>(decode_handle),
                                     RenewReservation{a.id, a.decode.reply.reservation_id},
                                     gw_.opt_.reserve_timeout, [](const Result<RenewReply>&) {});
    }
    // Checked on every event too: a stream that never pauses must still stop when asked.
    if (is_cancelled()) {
      return finish_attempt(a.id, false, "cancelled by the client",
                            cancelled_error("cancelled by the client"));
    }
    if (SteadyClock::now() >= deadline_) {
      return finish_attempt(a.id, false, "deadline passed",
                            deadline_exceeded("the deadline passed after " +
                                              std::to_string(produced_.size()) + " tokens"));
    }
    if (!ev || ev->attempt != a.id) continue;  // a timer, or left over from an earlier attempt
    std::optional<AttemptEnd> end;
    switch (ev->kind) {
      case Event::Kind::kChunk:
        end = on_chunk(a, ev->chunk);
        break;
      case Event::Kind::kPrefillReply:
        end = on_prefill_reply(a, *ev->prefill);
        break;
      case Event::Kind::kWorkerDown:
        end = on_worker_down(a, *ev);
        break;
      case Event::Kind::kCancel:
      case Event::Kind::kCapacity:
        break;
    }
    if (!end) continue;
    if (*end == AttemptEnd::kReplay) gw_.end_attempt(a.id, false, "replayed");
    return *end;
  }
}

std::optional<RequestRun::AttemptEnd> RequestRun::on_chunk(Attempt& a, const TokenChunk& c) {
  if (c.decode_epoch != a.decode.reply.decode_epoch) return std::nullopt;
  if (Status v = validate(c); !v.is_ok()) {
    last_error_ = "malformed token chunk: " + v.message();
    return AttemptEnd::kReplay;
  }
  const uint64_t first = static_cast<uint64_t>(a.offset) + c.first_index;
  if (first > produced_.size()) {
    last_error_ = "tokens " + std::to_string(produced_.size()) + ".." + std::to_string(first) +
                  " never arrived";
    return AttemptEnd::kReplay;
  }
  const size_t skip = produced_.size() - static_cast<size_t>(first);
  if (skip < c.tokens.size()) {
    const auto fresh = std::span(c.tokens).subspan(skip);
    const auto at = static_cast<uint32_t>(produced_.size());
    produced_.insert(produced_.end(), fresh.begin(), fresh.end());
    if (out_.ttft_ms == 0) out_.ttft_ms = ms_since(admitted_at_);
    if (on_tokens_) on_tokens_(fresh, at);
  }
  if (!c.finished) return std::nullopt;
  if (c.error.empty()) {
    out_.finish_reason = produced_.size() >= job_.max_new_tokens ? "length" : "stop";
    return finish_attempt(a.id, true, "", Status::ok());
  }
  if (c.error.rfind("deadline", 0) == 0) {
    return finish_attempt(a.id, true, "", deadline_exceeded(c.error));
  }
  last_error_ = "decode worker failed the request: " + c.error;
  gw_.end_attempt(a.id, true, "");  // the worker already dropped it
  return AttemptEnd::kReplay;
}

std::optional<RequestRun::AttemptEnd> RequestRun::on_prefill_reply(Attempt& a,
                                                                   const Result<PrefillReply>& r) {
  a.prefill_replied = true;
  if (r.is_ok() && r->outcome == PrefillOutcome::kDone) {
    {
      std::lock_guard<std::mutex> lock(gw_.mu_);
      auto it = gw_.routes_.find(a.id);
      if (it != gw_.routes_.end() && !it->second.prefill_done) {
        gw_.release_prefill_locked(it->second);
        if (gw_.workers_[a.prefill.index].epoch == it->second.prefill_epoch)
          gw_.placement_.record_prefix(a.prefill.index, a.chain);
      }
    }
    out_.cached_prefix_tokens = r->cached_prefix_tokens;
    out_.prefill_ms = r->prefill_ms;
    out_.transfer_bytes = r->transfer_bytes;
    out_.transfer_ms = r->transfer_us / 1000.0;
    out_.handoff_ms = r->handoff_us / 1000.0;
    return std::nullopt;
  }
  {
    std::lock_guard<std::mutex> lock(gw_.mu_);
    last_error_ = "prefill on " + gw_.workers_[a.prefill.index].endpoint.to_string() +
                  " failed: " + (r.is_ok() ? r->reason : r.status().message());
  }
  gw_.end_attempt(a.id, false, "prefill failed");
  // No reply at all (the worker died or hung past the call's bound), as opposed to a worker's
  // own refusal: the worker was lost while computing this prompt.
  if (!r.is_ok() && count_prefill_loss(a, a.prefill.index)) return AttemptEnd::kFinished;
  return AttemptEnd::kReplay;
}

std::optional<RequestRun::AttemptEnd> RequestRun::on_worker_down(Attempt& a, const Event& ev) {
  last_error_ = ev.why;
  gw_.end_attempt(a.id, false, "a worker of this request failed");
  if (ev.worker == a.prefill.index && count_prefill_loss(a, a.prefill.index)) {
    return AttemptEnd::kFinished;
  }
  return AttemptEnd::kReplay;
}

// Counts a prefill worker lost while it computed this attempt's prompt; past the bound, ends
// the request (true): a prompt that stops every worker it is given is not replayed.
bool RequestRun::count_prefill_loss(const Attempt& a, size_t worker) {
  prefill_lost_.insert(worker);
  if (prefill_lost_.size() < static_cast<size_t>(gw_.opt_.max_prefill_losses)) return false;
  finish(resource_exhausted(
      "not placed again: " + std::to_string(prefill_lost_.size()) +
      " prefill workers were lost while they computed this prompt (" +
      std::to_string(a.prompt.size()) +
      " tokens), so the prompt itself may be what stops them; the last: " + last_error_));
  return true;
}

}  // namespace dserve::actors::detail

namespace dserve::actors {

GenerateOutcome Gateway::Impl::generate(const GenerateJob& job, const TokenCallback& on_tokens,
                                        const CancelCheck& cancelled) {
  return detail::RequestRun(*this, job, on_tokens, cancelled).run();
}

}  // namespace dserve::actors
