#include "dserve/decode/decode_batch.h"

#include <algorithm>
#include <string>

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

DecodeBatch::DecodeBatch(model::Engine& engine, DecodeOptions options)
    : engine_(engine), options_(options) {}

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
  auto slot =
      std::make_unique<Slot>(Slot{std::move(request), model::Sampler({}), Tensor(), 0, false});
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

std::vector<TokenEvent> DecodeBatch::step() {
  std::vector<TokenEvent> events;
  events.reserve(slots_.size());
  const auto now = Clock::now();
  const auto eos = static_cast<int32_t>(engine_.config().eos_token_id);
  // First every request's next token; then one forward step over all that go on.
  std::vector<int32_t> next(slots_.size());
  std::vector<model::StepRows> step;
  std::vector<size_t> stepping;  // slot index of each step request
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = *slots_[i];
    TokenEvent e;
    e.request_id = s.request.id;
    e.index = s.produced;
    if (s.cancelled) {
      e.finished = FinishReason::kCancelled;
    } else if (s.request.deadline && now >= *s.request.deadline) {
      e.finished = FinishReason::kDeadline;
    } else {
      const int32_t token =
          s.sampler.sample(model::sampleable_logits(s.logits.span(), options_.sampleable_ids));
      ++s.produced;
      if (token == eos) {
        e.finished = FinishReason::kEndOfSequence;
      } else {
        e.token = token;
        if (s.produced >= s.request.max_tokens) {
          e.finished = FinishReason::kMaxTokens;
        } else {
          next[i] = token;
          stepping.push_back(i);
        }
      }
    }
    events.push_back(std::move(e));
  }
  step.reserve(step.size() + stepping.size());
  for (const size_t i : stepping) {
    step.push_back(
        {slots_[i]->request.request.get(), std::span(&next[i], 1), model::LogitsFor::kLastToken});
  }
  if (!step.empty()) {
    auto logits = engine_.step(step);
    for (size_t j = 0; j < stepping.size(); ++j) {
      const size_t i = stepping[j];
      if (logits.is_ok()) {
        slots_[i]->logits = std::move((*logits)[j]);
      } else {
        events[i].finished = FinishReason::kError;
        events[i].error = logits.status();
      }
    }
  }
  // Finished requests leave now; their states (and pages) go with them.
  size_t i = 0;
  std::erase_if(slots_, [&](const std::unique_ptr<Slot>&) {
    return events[i++].finished != FinishReason::kNone;
  });
  return events;
}

}  // namespace dserve::decode
