// The forward pass is causal and chunk-invariant: prefill in chunks of any size followed by
// one-token decode gives the logits of one whole forward (issue "DeepSeek-V4 end to end",
// Done-when 4), and the request state holds the three pools with the sizes MODEL-V4.md gives.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "dserve/core/random.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/model.h"
#include "dserve/model/model_init.h"
#include "test_model.h"

namespace dserve::model {
namespace {

using testing_support::relative_row_diff;

class ForwardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = &testing_support::tiny_model(); }

  static std::vector<int32_t> prompt(int64_t n) {
    SplitMix64 rng(42);
    std::vector<int32_t> ids{0};
    while (static_cast<int64_t>(ids.size()) < n) {
      ids.push_back(
          static_cast<int32_t>(rng.below(static_cast<uint64_t>(model_->config().vocab_size))));
    }
    return ids;
  }

  // Logits of every position, running the prompt in chunks of `chunk` tokens.
  static Tensor run_chunked(const std::vector<int32_t>& ids, int64_t chunk) {
    RequestState state = model_->new_state();
    const int64_t vocab = model_->config().vocab_size;
    Tensor all({static_cast<int64_t>(ids.size()), vocab});
    for (size_t begin = 0; begin < ids.size(); begin += static_cast<size_t>(chunk)) {
      const size_t end = std::min(ids.size(), begin + static_cast<size_t>(chunk));
      auto logits = model_->forward(std::span(ids).subspan(begin, end - begin), state);
      EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
      std::copy(logits->data(), logits->data() + logits->numel(),
                all.row(static_cast<int64_t>(begin)));
    }
    EXPECT_EQ(state.position(), static_cast<int64_t>(ids.size()));
    return all;
  }

  static const Model* model_;
};
const Model* ForwardTest::model_ = nullptr;

TEST_F(ForwardTest, ChunkedPrefillMatchesWholeForward) {
  const auto ids = prompt(70);
  const Tensor whole = run_chunked(ids, static_cast<int64_t>(ids.size()));
  for (int64_t chunk : {1, 3, 16, 128}) {
    const Tensor chunked = run_chunked(ids, chunk);
    double worst = 0.0;
    for (int64_t t = 0; t < whole.rows(); ++t) {
      worst = std::max(worst, relative_row_diff(chunked.row(t), whole.row(t), whole.cols()));
    }
    EXPECT_LT(worst, 1e-4) << "chunk size " << chunk;
  }
}

// Stronger than the tolerance above: the CPU backend computes every token's row on its own
// (kernels/src/cpu_ops.cc), so chunking changes no bit. Every serving path (prefix hits,
// batching, prefill/decode split) relies on this to give exactly the plain forward's tokens.
TEST_F(ForwardTest, ChunkingChangesNoBit) {
  const auto ids = prompt(150);
  const Tensor whole = run_chunked(ids, static_cast<int64_t>(ids.size()));
  for (int64_t chunk : {1, 7, 64, 100}) {
    const Tensor chunked = run_chunked(ids, chunk);
    EXPECT_EQ(std::memcmp(chunked.data(), whole.data(),
                          static_cast<size_t>(whole.numel()) * sizeof(float)),
              0)
        << "chunk size " << chunk;
  }
}

// Batched steps: random mixes of requests (1 to 12 of them), each step giving every live
// request a prefill chunk of 1 to 40 tokens or one decode token, the requests in a shuffled
// order each step, some asking all logits and some the last: every request's logits are
// bit-identical to the request run alone in one forward call over its whole prompt, and a
// request's stream does not change when others join or leave between steps.
TEST_F(ForwardTest, BatchedStepsEqualEachRequestAlone) {
  SplitMix64 rng(7);
  const int64_t vocab = model_->config().vocab_size;
  for (int round = 0; round < 6; ++round) {
    struct Live {
      std::vector<int32_t> ids;  // everything it will run
      size_t done = 0;
      RequestState state;
      Tensor got;  // logits of every position, filled as the steps run
    };
    const auto count = static_cast<size_t>(1 + rng.below(12));
    std::vector<Live> live;
    for (size_t r = 0; r < count; ++r) {
      std::vector<int32_t> ids(static_cast<size_t>(1 + rng.below(90)));
      for (int32_t& id : ids)
        id = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
      Tensor got({static_cast<int64_t>(ids.size()), vocab});
      live.push_back(Live{std::move(ids), 0, model_->new_state(), std::move(got)});
    }
    for (;;) {
      std::vector<size_t> order;
      std::vector<Model::StepRequest> step;
      std::vector<size_t> which_last;  // 1: asked only the last row's logits
      for (size_t r = 0; r < live.size(); ++r) {
        // Requests join late and skip steps at random: the batch changes around each one.
        if (live[r].done < live[r].ids.size() && rng.below(4) != 0) order.push_back(r);
      }
      if (order.empty()) {
        bool all_done = true;
        for (const Live& l : live)
          all_done = all_done && l.done == l.ids.size();
        if (all_done) break;
        continue;
      }
      for (size_t i = order.size(); i > 1; --i)
        std::swap(order[i - 1], order[static_cast<size_t>(rng.below(i))]);
      for (const size_t r : order) {
        Live& l = live[r];
        const size_t left = l.ids.size() - l.done;
        const size_t len = rng.below(3) == 0 ? 1 : std::min(left, 1 + rng.below(40));
        const bool last_only = len == 1 || rng.below(2) == 0;
        step.push_back({std::span(l.ids).subspan(l.done, len), &l.state,
                        last_only ? LogitsFor::kLastToken : LogitsFor::kAllTokens});
        which_last.push_back(last_only ? 1 : 0);
      }
      auto logits = model_->forward_batch(step);
      ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
      for (size_t j = 0; j < order.size(); ++j) {
        Live& l = live[order[j]];
        const auto len = static_cast<int64_t>(step[j].tokens.size());
        const Tensor& t = (*logits)[j];
        ASSERT_EQ(t.rows(), which_last[j] ? 1 : len);
        const int64_t first = static_cast<int64_t>(l.done) + (which_last[j] ? len - 1 : 0);
        std::copy(t.data(), t.data() + t.numel(), l.got.row(first));
        l.done += static_cast<size_t>(len);
      }
    }
    for (size_t r = 0; r < live.size(); ++r) {
      const Tensor alone = run_chunked(live[r].ids, static_cast<int64_t>(live[r].ids.size()));
      // Compare the rows that were asked for (the last of each step at least).
      for (int64_t t = 0; t < alone.rows(); ++t) {
        const float* got = live[r].got.row(t);
        if (std::all_of(got, got + vocab, [](float v) { return v == 0.0f; })) continue;
        ASSERT_EQ(std::memcmp(got, alone.row(t), static_cast<size_t>(vocab) * sizeof(float)), 0)
            << "round " << round << " request " << r << " position " << t;
      }
    }
  }
}

TEST_F(ForwardTest, ABatchedStepRefusesABadRequestWithoutTouchingAnyState) {
  RequestState a = model_->new_state(), b = model_->new_state();
  const std::vector<int32_t> good{1, 2, 3};
  const std::vector<int32_t> bad{4, static_cast<int32_t>(model_->config().vocab_size)};
  const Model::StepRequest step[2] = {{good, &a, LogitsFor::kLastToken},
                                      {bad, &b, LogitsFor::kLastToken}};
  auto r = model_->forward_batch(step);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(r.status().message().find("request 1"), std::string::npos) << r.status().to_string();
  EXPECT_EQ(a.position(), 0);
  EXPECT_EQ(b.position(), 0);
}

TEST_F(ForwardTest, DecodeAfterChunkedPrefillMatchesWholeForward) {
  const auto ids = prompt(70);
  const Tensor whole = run_chunked(ids, static_cast<int64_t>(ids.size()));
  RequestState state = model_->new_state();
  ASSERT_TRUE(model_->forward(std::span(ids).first(40), state, LogitsFor::kLastToken).is_ok());
  ASSERT_TRUE(
      model_->forward(std::span(ids).subspan(40, 13), state, LogitsFor::kLastToken).is_ok());
  for (size_t t = 53; t < ids.size(); ++t) {
    auto logits = model_->forward(std::span(ids).subspan(t, 1), state);
    ASSERT_TRUE(logits.is_ok());
    EXPECT_LT(relative_row_diff(logits->data(), whole.row(static_cast<int64_t>(t)), whole.cols()),
              1e-4)
        << "decode position " << t;
  }
}

TEST_F(ForwardTest, PrefixLogitsDoNotDependOnLaterTokens) {
  const auto ids = prompt(70);
  const Tensor whole = run_chunked(ids, 70);
  const std::vector<int32_t> head(ids.begin(), ids.begin() + 37);
  const Tensor prefix = run_chunked(head, 37);
  for (int64_t t = 0; t < 37; ++t) {
    EXPECT_LT(relative_row_diff(prefix.row(t), whole.row(t), whole.cols()), 1e-5)
        << "position " << t;
  }
}

TEST_F(ForwardTest, StateHoldsThePoolsWithTheirSizes) {
  const ModelConfig& c = model_->config();
  const auto ids = prompt(61);
  RequestState state = model_->new_state();
  ASSERT_TRUE(model_->forward(ids, state, LogitsFor::kLastToken).is_ok());
  const int64_t n = 61;
  for (size_t l = 0; l < state.layers().size(); ++l) {
    const LayerState& s = state.layers()[l];
    EXPECT_EQ(s.window_tokens(), std::min<int64_t>(n, c.sliding_window - 1)) << "layer " << l;
    const int64_t rate = c.compress_rate(s.kind);
    if (rate == 0) {
      EXPECT_EQ(s.compressed_entries(), 0);
      continue;
    }
    EXPECT_EQ(s.compressed_entries(), n / rate) << "layer " << l;
    // One page per (started) 128-token block.
    EXPECT_EQ(s.compressed.pages().size(), 1u) << "layer " << l;
    EXPECT_EQ(s.compressed.rows_per_page(), 128 / rate) << "layer " << l;
    EXPECT_EQ(s.kv_compressor.pending_tokens(), n % rate) << "layer " << l;
    if (s.kind == AttentionKind::kCompressed) {
      EXPECT_EQ(s.index_keys.rows(), n / rate);
      EXPECT_EQ(s.index_keys.width(), c.index_head_dim);
      EXPECT_TRUE(s.kv_compressor.has_overlap());
      EXPECT_EQ(s.index_compressor.pending_tokens(), n % rate);
    }
  }
  const auto bytes = state.pool_bytes();
  EXPECT_GT(bytes.window, 0u);
  EXPECT_GT(bytes.compressed, 0u);
  EXPECT_GT(bytes.index_keys, 0u);
  EXPECT_GT(bytes.compressor, 0u);
}

TEST_F(ForwardTest, RejectsTokenPastVocabularyWithoutTouchingState) {
  RequestState state = model_->new_state();
  const std::vector<int32_t> bad{0, 5, static_cast<int32_t>(model_->config().vocab_size)};
  auto r = model_->forward(bad, state);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(r.status().message().find("129280"), std::string::npos) << r.status().message();
  EXPECT_EQ(state.position(), 0);
  EXPECT_EQ(state.layers()[0].window_tokens(), 0);
  const std::vector<int32_t> negative{-1};
  EXPECT_EQ(model_->forward(negative, state).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(model_->forward({}, state).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dserve::model
