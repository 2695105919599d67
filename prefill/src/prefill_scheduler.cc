#include "dserve/prefill/prefill_scheduler.h"

#include <algorithm>
#include <string>

namespace dserve::prefill {

PrefillScheduler::PrefillScheduler(model::PrefixCache& cache, PrefillOptions options)
    : cache_(cache), options_(options) {}

Status PrefillScheduler::submit(uint64_t id, std::span<const int32_t> prompt,
                                std::optional<Clock::time_point> deadline) {
  for (const Entry& e : queue_) {
    if (e.id == id) return invalid_argument("request " + std::to_string(id) + " is already queued");
  }
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued) {
    return resource_exhausted("the prefill queue is full (" + std::to_string(options_.max_queued) +
                              " requests); request " + std::to_string(id) + " must go elsewhere");
  }
  auto job = cache_.begin(prompt);
  if (!job.is_ok()) return job.status().with_context("request " + std::to_string(id));
  queue_.push_back(Entry{id, std::move(job).value(), deadline, false, Status::ok()});
  return Status::ok();
}

void PrefillScheduler::cancel(uint64_t id) {
  for (Entry& e : queue_) {
    if (e.id == id) e.cancelled = true;
  }
}

std::vector<PrefillOutcome> PrefillScheduler::step() {
  std::vector<PrefillOutcome> out;
  const auto now = Clock::now();
  last_step_tokens_ = 0;
  last_step_timed_out_ = false;
  // Requests cancelled or past their deadline leave before anything runs.
  for (Entry& e : queue_) {
    if (e.cancelled) {
      e.status = unavailable("request " + std::to_string(e.id) + " was cancelled");
    } else if (e.deadline && now >= *e.deadline) {
      e.status =
          deadline_exceeded("request " + std::to_string(e.id) + " passed its deadline after " +
                            std::to_string(e.job.position()) + " of " +
                            std::to_string(e.job.length()) + " prompt tokens");
    }
  }
  // Rounds of one engine step each: the budget of a round goes to the requests in arrival
  // order, so several short prompts share a step (each weight read once for all their rows).
  const bool timed = options_.max_step_time.count() > 0;
  const int64_t slice = std::max<int64_t>(1, options_.slice_tokens);
  int64_t budget = options_.token_budget;
  while (budget > 0 && !last_step_timed_out_) {
    int64_t left = timed ? std::min(budget, slice) : budget;
    std::vector<model::PrefillJob*> jobs;
    std::vector<int64_t> take;
    std::vector<Entry*> owners;
    for (Entry& e : queue_) {
      if (left == 0) break;
      if (!e.status.is_ok() || e.job.done()) continue;
      const int64_t n = std::min(left, e.job.length() - e.job.position());
      jobs.push_back(&e.job);
      take.push_back(n);
      owners.push_back(&e);
      left -= n;
    }
    if (jobs.empty()) break;
    std::vector<int64_t> before;
    before.reserve(jobs.size());
    for (const model::PrefillJob* job : jobs)
      before.push_back(job->position());
    const std::vector<Status> status = cache_.advance_batch(jobs, take);
    int64_t computed = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      computed += jobs[i]->position() - before[i];
      if (!status[i].is_ok()) owners[i]->status = status[i];
    }
    budget -= computed;
    last_step_tokens_ += computed;
    last_step_timed_out_ = timed && Clock::now() - now >= options_.max_step_time;
  }
  for (auto it = queue_.begin(); it != queue_.end();) {
    Entry& e = *it;
    if (!e.status.is_ok() || e.job.done()) {
      PrefillOutcome o{e.id, e.status, std::nullopt};
      if (e.status.is_ok()) o.result = std::move(e.job.result());
      out.push_back(std::move(o));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

}  // namespace dserve::prefill
