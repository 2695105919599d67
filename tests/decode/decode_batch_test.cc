// The continuous batch: requests joining and leaving between steps get exactly the tokens a
// one-request generate loop gives them; cancellation, deadlines and limits end requests and
// return their pages.

#include "dserve/decode/decode_batch.h"

#include <gtest/gtest.h>

#include <map>

#include "test_model.h"

namespace dserve::decode {
namespace {

using model::testing_support::prompt_of;
using model::testing_support::tiny_engine;
using model::testing_support::tiny_model;

model::SamplingParams sampling_for(uint64_t i) {
  model::SamplingParams p;
  if (i % 2 == 1) {  // every other request samples
    p.temperature = 0.9f;
    p.top_p = 0.9f;
    p.top_k = 50;
    p.seed = 100 + i;
  }
  return p;
}

// A prompt run alone through the model, in chunks of 512: its state and last logits.
std::pair<model::RequestState, Tensor> prefill_alone(const std::vector<int32_t>& prompt) {
  const model::Model& m = tiny_model();
  model::RequestState state = m.new_state();
  Tensor last;
  for (size_t begin = 0; begin < prompt.size(); begin += 512) {
    const size_t n = std::min<size_t>(512, prompt.size() - begin);
    auto logits =
        m.forward(std::span(prompt).subspan(begin, n), state, model::LogitsFor::kLastToken);
    EXPECT_TRUE(logits.is_ok());
    last = std::move(*logits);
  }
  return {std::move(state), std::move(last)};
}

// The same prompt as a request of the engine the batches run on (a hand-off's import).
DecodeRequest prefilled(uint64_t id, const std::vector<int32_t>& prompt, int64_t max_tokens) {
  auto [state, logits] = prefill_alone(prompt);
  DecodeRequest r;
  r.id = id;
  auto imported = tiny_engine().import_state(std::move(state));
  EXPECT_TRUE(imported.is_ok());
  r.request = std::move(imported).value();
  r.prompt_logits = std::move(logits);
  r.sampling = sampling_for(id);
  r.max_tokens = max_tokens;
  return r;
}

// What `dserve generate` does for one prompt: sample, stop at EOS or the limit, else forward.
std::vector<int32_t> generate_alone(const std::vector<int32_t>& prompt, uint64_t id,
                                    int64_t max_tokens) {
  const model::Model& m = tiny_model();
  auto [state, logits] = prefill_alone(prompt);
  model::Sampler sampler(sampling_for(id));
  std::vector<int32_t> out;
  for (int64_t produced = 0; produced < max_tokens;) {
    const int32_t t = sampler.sample(logits.span());
    ++produced;
    if (t == m.config().eos_token_id) break;
    out.push_back(t);
    if (produced == max_tokens) break;
    const int32_t one[1] = {t};
    logits = std::move(*m.forward(one, state, model::LogitsFor::kLastToken));
  }
  return out;
}

TEST(DecodeBatch, RequestsJoiningBetweenStepsGetTheTokensOfAGenerateAlone) {
  DecodeBatch batch(tiny_engine(), {.max_batch = 8});
  std::map<uint64_t, std::vector<int32_t>> prompts, got;
  std::map<uint64_t, int64_t> limits;
  for (uint64_t id = 1; id <= 6; ++id) {
    prompts[id] = prompt_of(20 + static_cast<int64_t>(id) * 37, id);
    limits[id] = 5 + static_cast<int64_t>(id) * 3;
  }
  std::map<uint64_t, FinishReason> finished;
  uint64_t next = 1;
  for (int step = 0; !batch.empty() || next <= 6; ++step) {
    if (step % 3 == 0 && next <= 6) {  // two join every third step
      for (int j = 0; j < 2 && next <= 6; ++j, ++next)
        ASSERT_TRUE(batch.add(prefilled(next, prompts[next], limits[next])).is_ok());
    }
    for (const TokenEvent& e : batch.step()) {
      if (e.token) {
        EXPECT_EQ(e.index, static_cast<int64_t>(got[e.request_id].size()));
        got[e.request_id].push_back(*e.token);
      }
      if (e.finished != FinishReason::kNone) finished[e.request_id] = e.finished;
    }
  }
  for (uint64_t id = 1; id <= 6; ++id) {
    EXPECT_EQ(got[id], generate_alone(prompts[id], id, limits[id])) << "request " << id;
    EXPECT_TRUE(finished[id] == FinishReason::kMaxTokens ||
                finished[id] == FinishReason::kEndOfSequence)
        << finish_reason_name(finished[id]);
  }
}

TEST(DecodeBatch, CancelledAndExpiredRequestsLeaveAndReturnTheirPages) {
  const model::Model& m = tiny_model();
  const uint64_t before = m.page_pools().bytes_in_use();
  {
    DecodeBatch batch(tiny_engine(), {.max_batch = 4});
    for (uint64_t id = 1; id <= 3; ++id)
      ASSERT_TRUE(batch.add(prefilled(id, prompt_of(300, id), 1000)).is_ok());
    DecodeRequest late = prefilled(4, prompt_of(300, 4), 1000);
    late.deadline = Clock::now();  // already past at the first step
    ASSERT_TRUE(batch.add(std::move(late)).is_ok());
    EXPECT_GT(m.page_pools().bytes_in_use(), before);
    EXPECT_EQ(batch.add(prefilled(5, prompt_of(10, 5), 3)).code(), StatusCode::kResourceExhausted);

    auto events = batch.step();
    ASSERT_EQ(events.size(), 4u);
    EXPECT_EQ(events[3].finished, FinishReason::kDeadline);
    EXPECT_EQ(batch.size(), 3u);
    batch.cancel(2);
    batch.cancel(77);  // unknown: ignored
    events = batch.step();
    EXPECT_EQ(events[1].request_id, 2u);
    EXPECT_EQ(events[1].finished, FinishReason::kCancelled);
    EXPECT_FALSE(events[1].token.has_value());
    batch.cancel(1);
    batch.cancel(3);
    batch.step();
    EXPECT_TRUE(batch.empty());
    EXPECT_EQ(m.page_pools().bytes_in_use(), before) << "pages of finished requests leaked";
  }
}

TEST(DecodeBatch, RefusesBadRequestsWithTheReason) {
  const model::Model& m = tiny_model();
  DecodeBatch batch(tiny_engine(), {});
  ASSERT_TRUE(batch.add(prefilled(1, prompt_of(10, 1), 3)).is_ok());
  const Status dup = batch.add(prefilled(1, prompt_of(10, 1), 3));
  EXPECT_EQ(dup.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(dup.message().find("already decoding"), std::string::npos);
  DecodeRequest empty;
  empty.id = 2;
  empty.request = std::move(tiny_engine().new_request()).value();
  empty.prompt_logits = Tensor({1, m.config().vocab_size});
  EXPECT_EQ(batch.add(std::move(empty)).code(), StatusCode::kInvalidArgument);
  DecodeRequest bad = prefilled(3, prompt_of(10, 3), 3);
  bad.sampling.top_p = 2.0f;
  EXPECT_EQ(batch.add(std::move(bad)).code(), StatusCode::kInvalidArgument);
}

// Ids past the tokenizer's vocabulary (the embedding's padding rows) are never sampled, greedy
// or not, even where they hold the largest logits: one could not be decoded to text nor sent
// back as a prompt. Without the bound (sampleable_ids = 0, as every batch ran before) the
// padding id is what comes out.
TEST(DecodeBatch, SamplesOnlyIdsTheTokenizerCanDecode) {
  const model::Model& m = tiny_model();
  const int64_t vocab = m.config().vocab_size;
  const int64_t tokenizer_ids = vocab - 465;  // V4: 128,815 ids in 129,280 rows
  for (const bool bounded : {false, true}) {
    for (const uint64_t id : {1u, 2u}) {  // sampling (temperature, top-k, top-p), then greedy
      SCOPED_TRACE(std::string(bounded ? "bounded" : "unbounded") + ", request " +
                   std::to_string(id));
      DecodeBatch batch(tiny_engine(),
                        {.max_batch = 4, .sampleable_ids = bounded ? tokenizer_ids : 0});
      DecodeRequest r = prefilled(id, prompt_of(20, 7), 1);
      for (int64_t v = tokenizer_ids; v < vocab; ++v)
        r.prompt_logits.data()[v] = 1000.0f;  // padding rows far above every real id
      ASSERT_TRUE(batch.add(std::move(r)).is_ok());
      const auto events = batch.step();
      ASSERT_EQ(events.size(), 1u);
      ASSERT_TRUE(events[0].token.has_value());
      if (bounded) {
        EXPECT_LT(*events[0].token, tokenizer_ids);
      } else {
        EXPECT_GE(*events[0].token, tokenizer_ids);
      }
    }
  }
}

}  // namespace
}  // namespace dserve::decode
