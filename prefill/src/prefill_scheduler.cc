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
  queue_.push_back(Entry{id, std::move(job).value(), deadline, false});
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
  int64_t budget = options_.token_budget;
  last_step_tokens_ = 0;
  last_step_timed_out_ = false;
  const bool timed = options_.max_step_time.count() > 0;
  const int64_t slice = std::max<int64_t>(1, options_.slice_tokens);
  for (auto it = queue_.begin(); it != queue_.end();) {
    Entry& e = *it;
    Status status = Status::ok();
    if (e.cancelled) {
      status = unavailable("request " + std::to_string(e.id) + " was cancelled");
    } else if (e.deadline && now >= *e.deadline) {
      status = deadline_exceeded("request " + std::to_string(e.id) + " passed its deadline after " +
                                 std::to_string(e.job.position()) + " of " +
                                 std::to_string(e.job.length()) + " prompt tokens");
    } else {
      while (budget > 0 && !last_step_timed_out_ && !e.job.done() && status.is_ok()) {
        const int64_t before = e.job.position();
        status = cache_.advance(e.job, timed ? std::min(budget, slice) : budget);
        budget -= e.job.position() - before;
        last_step_tokens_ += e.job.position() - before;
        last_step_timed_out_ = timed && Clock::now() - now >= options_.max_step_time;
      }
    }
    if (!status.is_ok() || e.job.done()) {
      PrefillOutcome o{e.id, status, std::nullopt};
      if (status.is_ok()) o.result = std::move(e.job.result());
      out.push_back(std::move(o));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

}  // namespace dserve::prefill
