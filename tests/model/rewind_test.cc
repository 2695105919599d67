// Taking a step's last rows back (Engine::rewind, Model::rewind) and the MTP block's drafting
// (Engine::draft): after a rewind the state is, byte for byte, that of a run that only ever saw
// the kept rows, whatever the dropped rows were and wherever the windows, compressors and pages
// stood; drafting leaves the block's state as a run of its rows of known tokens would.

#include <gtest/gtest.h>

#include <cstring>
#include <iostream>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/model/engine.h"
#include "dserve/model/state_packing.h"
#include "test_model.h"

namespace dserve::model {
namespace {

using testing_support::prompt_of;

// One request on two engines' worth of states: `spec` verifies rows and takes some back,
// `plain` runs only the kept tokens, one chunk each. After every rewind both must pack to the
// same bytes, hold the same pages, and the kept rows' logits must be the plain run's.
void check_rewinds(kvstore::KvDtype kv_dtype, int64_t prompt_tokens, int64_t steps, uint64_t seed) {
  const auto& model = testing_support::tiny_model_shared(kv_dtype);
  auto made = make_engine(model, {});
  ASSERT_TRUE(made.is_ok());
  Engine& engine = **made;
  auto spec = std::move(engine.new_request()).value();
  auto plain = std::move(engine.new_request()).value();
  const std::vector<int32_t> prompt = prompt_of(prompt_tokens, seed);
  for (EngineRequest* r : {spec.get(), plain.get()}) {
    const StepRows rows{r, prompt, LogitsFor::kLastToken};
    ASSERT_TRUE(engine.step(std::span(&rows, 1)).is_ok());
  }
  SplitMix64 rng(seed);
  const int64_t vocab = engine.config().vocab_size;
  int64_t taken_back = 0;
  for (int64_t s = 0; s < steps; ++s) {
    // A next token and up to 5 drafts, random; keep a random prefix of at least the first.
    std::vector<int32_t> fed(1 + rng.below(6));
    for (int32_t& t : fed)
      t = static_cast<int32_t>(1 + rng.below(static_cast<uint64_t>(vocab - 1)));
    const auto keep = static_cast<int64_t>(1 + rng.below(fed.size()));
    const int64_t start = spec->position();
    const StepRows verify{spec.get(), fed, LogitsFor::kAllTokens, true};
    auto logits = engine.step(std::span(&verify, 1));
    ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
    ASSERT_TRUE(engine.rewind(*spec, start + keep).is_ok());
    taken_back += static_cast<int64_t>(fed.size()) - keep;
    ASSERT_EQ(spec->position(), start + keep);

    const StepRows kept{plain.get(), std::span(fed).first(static_cast<size_t>(keep)),
                        LogitsFor::kAllTokens};
    auto expected = engine.step(std::span(&kept, 1));
    ASSERT_TRUE(expected.is_ok());
    const Tensor& got = (*logits)[0];
    const Tensor& want = (*expected)[0];
    ASSERT_EQ(std::memcmp(got.data(), want.data(), static_cast<size_t>(want.numel()) * 4), 0)
        << "step " << s << ": the kept rows' logits differ";
    const RequestState& a = *engine.host_state(*spec);
    const RequestState& b = *engine.host_state(*plain);
    ASSERT_EQ(pack_state(engine.config(), a), pack_state(engine.config(), b))
        << "step " << s << " at position " << spec->position() << ": the states differ";
    for (size_t l = 0; l < a.layers().size(); ++l) {
      ASSERT_EQ(a.layers()[l].compressed.pages().size(), b.layers()[l].compressed.pages().size());
      ASSERT_EQ(a.layers()[l].index_keys.pages().size(), b.layers()[l].index_keys.pages().size());
    }
  }
  std::cout << "[ figures  ] " << steps << " verify steps to position " << spec->position() << ", "
            << taken_back << " rows taken back\n";
}

class Rewind : public ::testing::TestWithParam<kvstore::KvDtype> {};

// Past many CSA (4) and HCA (16) windows and around the 16-token sliding window many times.
TEST_P(Rewind, TakenBackRowsLeaveTheStateOfARunThatNeverSawThem) {
  check_rewinds(GetParam(), 37, 260, 5);
}

INSTANTIATE_TEST_SUITE_P(KvDtypes, Rewind, ::testing::ValuesIn(testing_support::kKvDtypes),
                         testing_support::kv_dtype_param_name);

TEST(RewindErrors, OnlyTheRowsOfARewindableLastStep) {
  Engine& engine = testing_support::tiny_engine();
  auto r = std::move(engine.new_request()).value();
  const std::vector<int32_t> prompt = prompt_of(9, 3);
  const StepRows plain{r.get(), prompt, LogitsFor::kLastToken};
  ASSERT_TRUE(engine.step(std::span(&plain, 1)).is_ok());
  EXPECT_EQ(engine.rewind(*r, 8).code(), StatusCode::kInvalidArgument) << "not rewindable";
  const int32_t fed[] = {5, 6, 7};
  const StepRows verify{r.get(), fed, LogitsFor::kAllTokens, true};
  ASSERT_TRUE(engine.step(std::span(&verify, 1)).is_ok());
  EXPECT_EQ(engine.rewind(*r, 8).code(), StatusCode::kInvalidArgument) << "before the step";
  EXPECT_EQ(engine.rewind(*r, 13).code(), StatusCode::kInvalidArgument) << "after it";
  EXPECT_TRUE(engine.rewind(*r, 10).is_ok());
  EXPECT_EQ(r->position(), 10);
  EXPECT_EQ(engine.rewind(*r, 9).code(), StatusCode::kInvalidArgument) << "only once";
}

// Drafting runs the block's waiting rows and a chain after them; the chain's rows leave no
// trace, so a state that drafted 3 tokens and one that drafted 1 hold the same block state, and
// their first drafts agree. Without the block's inputs (a state just imported) there is nothing
// to draft from.
TEST(MtpDraft, TheChainLeavesNoTraceAndDraftsAreDeterministic) {
  EngineOptions options;
  options.draft = true;
  auto made = make_engine(testing_support::tiny_model_shared(), options);
  ASSERT_TRUE(made.is_ok()) << made.status().to_string();
  Engine& engine = **made;
  ASSERT_TRUE(engine.can_draft());
  const std::vector<int32_t> prompt = prompt_of(45, 8);
  std::vector<RequestHandle> requests;
  for (int i = 0; i < 2; ++i) {
    requests.push_back(std::move(engine.new_request()).value());
    const StepRows rows{requests.back().get(), prompt, LogitsFor::kLastToken};
    ASSERT_TRUE(engine.step(std::span(&rows, 1)).is_ok());
  }
  const DraftRows asks[] = {{requests[0].get(), 77, 3}, {requests[1].get(), 77, 1}};
  auto drafts = engine.draft(asks, 0);
  ASSERT_TRUE(drafts.is_ok()) << drafts.status().to_string();
  ASSERT_EQ((*drafts)[0].size(), 3u);
  ASSERT_EQ((*drafts)[1].size(), 1u);
  EXPECT_EQ((*drafts)[0][0], (*drafts)[1][0]);
  const MtpState& a = engine.host_state(*requests[0])->mtp();
  const MtpState& b = engine.host_state(*requests[1])->mtp();
  EXPECT_EQ(a.layer.window, b.layer.window);
  EXPECT_EQ(a.next_position, 46);
  EXPECT_EQ(b.next_position, 46);
  EXPECT_TRUE(a.hidden.empty() && a.tokens.empty());
  // Nothing waits now: no drafts until the main model runs the token.
  auto again = engine.draft(std::span(asks).first(1), 0);
  ASSERT_TRUE(again.is_ok());
  EXPECT_TRUE((*again)[0].empty());

  auto exported = engine.export_state(*requests[0]);
  ASSERT_TRUE(exported.is_ok());
  RequestState without_block = std::move(exported).value();
  without_block =
      unpack_state(engine.config(), engine.page_pools(), pack_state(engine.config(), without_block))
          .value();
  auto imported = engine.import_state(std::move(without_block));
  ASSERT_TRUE(imported.is_ok());
  const DraftRows fresh[] = {{imported->get(), 77, 2}};
  auto none = engine.draft(fresh, 0);
  ASSERT_TRUE(none.is_ok());
  EXPECT_TRUE((*none)[0].empty()) << "a state imported without the block's has no inputs yet";
}

// The block's window does not depend on when its rows ran: one request drafts after every
// token (its rows run one at a time, through the whole layer), the other only at the end (its
// waiting rows, past the 16-token window, have only their keys computed): the same window, bit
// for bit, and the same drafts.
TEST(MtpDraft, TheWindowIsTheSameHoweverItsRowsWereBatched) {
  EngineOptions options;
  options.draft = true;
  auto made = make_engine(testing_support::tiny_model_shared(), options);
  ASSERT_TRUE(made.is_ok());
  Engine& engine = **made;
  const std::vector<int32_t> prompt = prompt_of(12, 21);
  const std::vector<int32_t> more = prompt_of(41, 22);
  auto often = std::move(engine.new_request()).value();
  auto once = std::move(engine.new_request()).value();
  for (EngineRequest* r : {often.get(), once.get()}) {
    const StepRows rows{r, prompt, LogitsFor::kLastToken};
    ASSERT_TRUE(engine.step(std::span(&rows, 1)).is_ok());
  }
  for (size_t i = 1; i + 1 < more.size(); ++i) {
    const DraftRows ask[] = {{often.get(), more[i], 2}};
    ASSERT_TRUE(engine.draft(ask, 0).is_ok());
    for (EngineRequest* r : {often.get(), once.get()}) {
      const StepRows rows{r, std::span(&more[i], 1), LogitsFor::kLastToken};
      ASSERT_TRUE(engine.step(std::span(&rows, 1)).is_ok());
    }
  }
  const DraftRows last[] = {{often.get(), more.back(), 3}, {once.get(), more.back(), 3}};
  auto drafts = engine.draft(last, 0);
  ASSERT_TRUE(drafts.is_ok());
  EXPECT_EQ((*drafts)[0], (*drafts)[1]);
  const MtpState& a = engine.host_state(*often)->mtp();
  const MtpState& b = engine.host_state(*once)->mtp();
  EXPECT_EQ(a.next_position, b.next_position);
  ASSERT_EQ(a.layer.window.size(), b.layer.window.size());
  EXPECT_EQ(std::memcmp(a.layer.window.data(), b.layer.window.data(), a.layer.window.size() * 4),
            0);
}

TEST(MtpDraft, AnEngineWithoutDraftingRefusesToDraft) {
  Engine& engine = testing_support::tiny_engine();
  EXPECT_FALSE(engine.can_draft());
  auto r = std::move(engine.new_request()).value();
  const DraftRows ask[] = {{r.get(), 5, 1}};
  EXPECT_EQ(engine.draft(ask, 0).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dserve::model
