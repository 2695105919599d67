#include "dserve/decode/decode_batch.h"

#include <algorithm>
#include <string>
#include <utility>

namespace dserve::decode {

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kEndOfSequence:
      return "end_of_sequence";
    case FinishReason::kMaxTokens:
      return "max_tokens";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

DecodeBatch::DecodeBatch(model::Engine& engine, const DecodeOptions& options)
    : engine_(engine),
      options_(options),
      control_(options.speculative_tokens, options.adaptive_speculation) {
  drafter_ = options_.drafter;
  if (options_.speculative_tokens > 0 && drafter_ == nullptr) {
    DSERVE_CHECK_MSG(engine_.can_draft(),
                     "speculative decoding without a drafter on an engine that cannot draft");
    own_drafter_ = std::make_unique<MtpDrafter>(engine_);
    drafter_ = own_drafter_.get();
  }
}

Status DecodeBatch::add(DecodeRequest request) {
  if (static_cast<int64_t>(slots_.size()) >= options_.max_batch) {
    return resource_exhausted("the decode batch is full (" + std::to_string(options_.max_batch) +
                              " requests); request " + std::to_string(request.id) + " must wait");
  }
  for (const auto& s : slots_) {
    if (s->request.id == request.id) {
      return invalid_argument("request " + std::to_string(request.id) + " is already decoding");
    }
  }
  if (request.prompt_logits.numel() != engine_.config().vocab_size) {
    return invalid_argument("request " + std::to_string(request.id) + ": prompt logits of " +
                            std::to_string(request.prompt_logits.numel()) + " values, expected " +
                            std::to_string(engine_.config().vocab_size));
  }
  if (request.request == nullptr || request.request->position() == 0) {
    return invalid_argument("request " + std::to_string(request.id) +
                            ": its state has seen no prompt");
  }
  if (request.max_tokens < 1) {
    return invalid_argument("request " + std::to_string(request.id) + ": max_tokens must be >= 1");
  }
  DSERVE_RETURN_IF_ERROR(
      model::validate_sampling_params(request.sampling, engine_.config().vocab_size));
  auto slot = std::make_unique<Slot>(
      Slot{std::move(request), model::Sampler({}), Tensor(), 0, false, {}, false});
  slot->sampler = model::Sampler(slot->request.sampling);
  slot->sampler.add_history(slot->request.generated);
  slot->logits = std::move(slot->request.prompt_logits);
  slots_.push_back(std::move(slot));
  return Status::ok();
}

void DecodeBatch::cancel(uint64_t id) {
  for (auto& s : slots_) {
    if (s->request.id == id) s->cancelled = true;
  }
}

namespace {

// A request's end by an error (a step or a rewind that failed), after its `produced` tokens.
TokenEvent error_event(uint64_t id, int64_t produced, Status error) {
  TokenEvent e;
  e.request_id = id;
  e.index = produced;
  e.finished = FinishReason::kError;
  e.error = std::move(error);
  return e;
}

}  // namespace

std::optional<int32_t> DecodeBatch::sample_rows(Slot& s, std::vector<TokenEvent>& events) {
  const auto eos = static_cast<int32_t>(engine_.config().eos_token_id);
  const int64_t vocab = engine_.config().vocab_size;
  const size_t drafts = s.fed.empty() ? 0 : s.fed.size() - 1;
  std::optional<int32_t> next;
  size_t row = 0;
  bool ended = false;
  for (;; ++row) {
    const std::span<const float> logits(s.logits.data() + static_cast<int64_t>(row) * vocab,
                                        static_cast<size_t>(vocab));
    const int32_t token =
        s.sampler.sample(model::sampleable_logits(logits, options_.sampleable_ids));
    TokenEvent e;
    e.request_id = s.request.id;
    e.index = s.produced++;
    if (token == eos) {
      e.finished = FinishReason::kEndOfSequence;
    } else {
      e.token = token;
      if (s.produced >= s.request.max_tokens) e.finished = FinishReason::kMaxTokens;
    }
    ended = e.finished != FinishReason::kNone;
    events.push_back(std::move(e));
    if (ended) break;
    // A draft counts while it is the token sampled before it (speculation.h).
    if (row < drafts && token == s.fed[row + 1]) continue;
    next = token;
    break;
  }
  if (drafts > 0)
    control_.record_verify(ended ? std::min(row, drafts) : drafts, std::min(row, drafts));
  if (next && row < drafts) {
    // The rejected rows go: the state is as if only the kept ones had run.
    const int64_t position = s.request.request->position() - static_cast<int64_t>(drafts - row);
    if (Status rewound = engine_.rewind(*s.request.request, position); !rewound.is_ok()) {
      events.push_back(error_event(s.request.id, s.produced, std::move(rewound)));
      return std::nullopt;
    }
  }
  return next;
}

std::vector<TokenEvent> DecodeBatch::step() {
  const auto now = Clock::now();
  std::vector<TokenEvent> events;
  events.reserve(slots_.size());
  // First every request's next tokens (the last step's rows sampled); then one forward step over
  // all that go on, each with its drafts.
  std::vector<int32_t> next(slots_.size());
  std::vector<bool> ended(slots_.size(), false);
  std::vector<size_t> stepping;  // slot index of each step request
  int64_t committed = 0;         // tokens the last step's requests got
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = *slots_[i];
    const bool stepped = std::exchange(s.stepped, false);
    TokenEvent e;
    e.request_id = s.request.id;
    e.index = s.produced;
    if (s.cancelled || (s.request.deadline && now >= *s.request.deadline)) {
      e.finished = s.cancelled ? FinishReason::kCancelled : FinishReason::kDeadline;
      events.push_back(std::move(e));
      ended[i] = true;
      continue;
    }
    const size_t first = events.size();
    const std::optional<int32_t> token = sample_rows(s, events);
    if (stepped) committed += static_cast<int64_t>(events.size() - first);
    if (token) {
      next[i] = *token;
      stepping.push_back(i);
      if (options_.on_committed) options_.on_committed(s.request.id, *s.request.request);
    } else {
      ended[i] = true;
    }
  }
  if (last_step_.batch > 0) {
    const double sampling = std::chrono::duration<double>(Clock::now() - now).count();
    control_.record_step(last_step_.batch, last_step_.k, last_step_.seconds + sampling, committed);
    last_step_ = {};
  }

  const auto step_start = Clock::now();
  const int64_t k = stepping.empty() ? 0 : control_.choose(static_cast<int64_t>(stepping.size()));
  std::vector<std::vector<int32_t>> drafts(stepping.size());
  if (k > 0) {
    std::vector<Drafter::Request> asks;
    for (const size_t i : stepping) {
      const Slot& s = *slots_[i];
      // Rows past the token limit would never be sampled.
      const int64_t count = std::min(k, s.request.max_tokens - s.produced - 1);
      asks.push_back({s.request.id, s.request.request.get(), next[i], s.produced - 1,
                      std::max<int64_t>(0, count)});
    }
    // Drafts only make steps faster; a drafter's failure leaves the step without them.
    auto proposed = drafter_->draft(asks, options_.sampleable_ids);
    if (proposed.is_ok() && proposed->size() == stepping.size()) {
      for (size_t j = 0; j < stepping.size(); ++j) {
        std::vector<int32_t>& d = (*proposed)[j];
        const auto limit = static_cast<size_t>(asks[j].count);
        if (d.size() > limit) d.resize(limit);
        const bool valid = std::all_of(d.begin(), d.end(), [&](int32_t t) {
          return t >= 0 && t < engine_.config().vocab_size;
        });
        if (valid) drafts[j] = std::move(d);
      }
    }
  }

  std::vector<model::StepRows> step;
  step.reserve(stepping.size());
  for (size_t j = 0; j < stepping.size(); ++j) {
    Slot& s = *slots_[stepping[j]];
    s.fed.assign(1, next[stepping[j]]);
    s.fed.insert(s.fed.end(), drafts[j].begin(), drafts[j].end());
    const bool speculative = s.fed.size() > 1;
    step.push_back({s.request.request.get(), s.fed,
                    speculative ? model::LogitsFor::kAllTokens : model::LogitsFor::kLastToken,
                    speculative});
  }
  if (!step.empty()) {
    auto logits = engine_.step(step);
    for (size_t j = 0; j < stepping.size(); ++j) {
      const size_t i = stepping[j];
      if (logits.is_ok()) {
        slots_[i]->logits = std::move((*logits)[j]);
        slots_[i]->stepped = true;
      } else {
        events.push_back(error_event(slots_[i]->request.id, slots_[i]->produced, logits.status()));
        ended[i] = true;
      }
    }
    if (logits.is_ok()) {
      size_t verified = 0;  // the step's k in effect: a drafter may propose fewer
      for (const auto& d : drafts)
        verified = std::max(verified, d.size());
      last_step_ = {static_cast<int64_t>(stepping.size()), static_cast<int64_t>(verified),
                    std::chrono::duration<double>(Clock::now() - step_start).count()};
    }
  }
  // Finished requests leave now; their states (and pages) go with them.
  size_t i = 0;
  std::erase_if(slots_, [&](const std::unique_ptr<Slot>&) { return ended[i++]; });
  return events;
}

}  // namespace dserve::decode
