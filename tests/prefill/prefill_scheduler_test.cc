// The prefill scheduler: several requests per step within the token budget, oldest first,
// results equal to a one-request prefill; cancellation, deadlines and limits.

#include "dserve/prefill/prefill_scheduler.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::prefill {
namespace {

using model::testing_support::prompt_of;
using model::testing_support::tiny_engine;
using model::testing_support::tiny_model;

std::unique_ptr<model::PrefixCache> cache() {
  auto c = model::PrefixCache::open(tiny_engine(), "prefill-scheduler-test", {});
  EXPECT_TRUE(c.is_ok()) << c.status().to_string();
  return std::move(c).value();
}

TEST(PrefillScheduler, SpendsTheBudgetOldestFirstAndMatchesAOneRequestPrefill) {
  auto c = cache();
  // No time bound: the steps this test counts depend on the token budget alone.
  PrefillScheduler s(*c, {.token_budget = 256, .max_queued = 16, .max_step_time = {}});
  std::map<uint64_t, std::vector<int32_t>> prompts{
      {1, prompt_of(600, 1)}, {2, prompt_of(40, 2)}, {3, prompt_of(90, 3)}, {4, prompt_of(300, 4)}};
  for (const auto& [id, p] : prompts)
    ASSERT_TRUE(s.submit(id, p).is_ok());
  std::map<uint64_t, model::PrefillResult> done;
  std::vector<std::vector<uint64_t>> finished_per_step;
  while (!s.empty()) {
    auto outcomes = s.step();
    EXPECT_LE(s.last_step_tokens(), 256);
    finished_per_step.emplace_back();
    for (auto& o : outcomes) {
      ASSERT_TRUE(o.status.is_ok()) << o.status.to_string();
      finished_per_step.back().push_back(o.id);
      done.emplace(o.id, std::move(*o.result));
    }
  }
  // 1030 tokens at 256 per step: 1, 2 and 3 (730 tokens) finish in step 3, 4 in step 5.
  ASSERT_GE(finished_per_step.size(), 4u);
  EXPECT_TRUE(finished_per_step[0].empty());
  EXPECT_EQ(finished_per_step[2], (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(finished_per_step.back(), (std::vector<uint64_t>{4}));
  EXPECT_EQ(finished_per_step.size(), 5u);
  const model::Model& m = tiny_model();
  for (const auto& [id, p] : prompts) {
    model::RequestState state = m.new_state();
    const auto want = m.forward(p, state, model::LogitsFor::kLastToken);
    ASSERT_TRUE(want.is_ok());
    const auto& got = done.at(id);
    EXPECT_EQ(got.request->position(), static_cast<int64_t>(p.size()));
    EXPECT_EQ(std::memcmp(got.last_logits.data(), want->data(),
                          static_cast<size_t>(want->numel()) * sizeof(float)),
              0)
        << "request " << id;
    EXPECT_EQ(model::argmax(got.last_logits.span()), model::argmax(want->span())) << id;
  }
}

// A step ends on its time bound (after at least one slice) long before its token budget, and
// where the steps end changes no bit of the results.
TEST(PrefillScheduler, AStepEndsOnItsTimeBoundAndTheResultsDoNotChange) {
  auto c = cache();
  PrefillScheduler s(*c, {.token_budget = 4096,
                          .max_queued = 16,
                          .max_step_time = std::chrono::milliseconds(1),
                          .slice_tokens = 128});
  std::map<uint64_t, std::vector<int32_t>> prompts{{1, prompt_of(700, 11)},
                                                   {2, prompt_of(200, 12)}};
  for (const auto& [id, p] : prompts)
    ASSERT_TRUE(s.submit(id, p).is_ok());
  std::map<uint64_t, model::PrefillResult> done;
  int steps = 0, timed_out = 0;
  while (!s.empty()) {
    auto outcomes = s.step();
    ++steps;
    EXPECT_GT(s.last_step_tokens(), 0) << "a step computed nothing";
    if (s.last_step_timed_out()) ++timed_out;
    for (auto& o : outcomes) {
      ASSERT_TRUE(o.status.is_ok()) << o.status.to_string();
      done.emplace(o.id, std::move(*o.result));
    }
  }
  // The token budget alone would take both prompts (900 tokens) in one step; a 128-token slice
  // of the tiny model takes far more than 1 ms.
  EXPECT_GE(steps, 2);
  EXPECT_GE(timed_out, 1);
  const model::Model& m = tiny_model();
  for (const auto& [id, p] : prompts) {
    model::RequestState state = m.new_state();
    const auto want = m.forward(p, state, model::LogitsFor::kLastToken);
    ASSERT_TRUE(want.is_ok());
    EXPECT_EQ(std::memcmp(done.at(id).last_logits.data(), want->data(),
                          static_cast<size_t>(want->numel()) * sizeof(float)),
              0)
        << "request " << id;
  }
}

TEST(PrefillScheduler, ASecondRequestWithTheSamePrefixReusesIt) {
  auto c = cache();
  PrefillScheduler s(*c, {.token_budget = 4096});
  auto p = prompt_of(3 * 128 + 20, 9);
  ASSERT_TRUE(s.submit(1, p).is_ok());
  ASSERT_EQ(s.step().size(), 1u);
  p.back() = 5;  // same blocks, another tail
  ASSERT_TRUE(s.submit(2, p).is_ok());
  auto out = s.step();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].result->reused_tokens, 3 * 128);
  EXPECT_EQ(out[0].result->computed_tokens, 20);
}

TEST(PrefillScheduler, CancelDeadlineAndLimitsEndRequestsWithTheReason) {
  auto c = cache();
  PrefillScheduler s(*c, {.token_budget = 64, .max_queued = 3});
  ASSERT_TRUE(s.submit(1, prompt_of(500, 1)).is_ok());
  ASSERT_TRUE(s.submit(2, prompt_of(500, 2), Clock::now()).is_ok());
  ASSERT_TRUE(s.submit(3, prompt_of(500, 3)).is_ok());
  EXPECT_EQ(s.submit(4, prompt_of(5, 4)).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.submit(3, prompt_of(5, 4)).code(), StatusCode::kInvalidArgument);
  s.cancel(3);
  auto out = s.step();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].id, 2u);
  EXPECT_EQ(out[0].status.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(out[1].id, 3u);
  EXPECT_FALSE(out[1].status.is_ok());
  EXPECT_EQ(s.queued(), 1u);
  const std::vector<int32_t> bad{0, -3};
  const Status st = s.submit(5, bad);
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange);
  EXPECT_NE(st.message().find("request 5"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace dserve::prefill
