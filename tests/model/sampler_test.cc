#include "dserve/model/sampler.h"

#include <gtest/gtest.h>

#include <map>
#include <vector>

namespace dserve::model {
namespace {

const std::vector<float> kLogits{0.5f, 3.0f, 2.9f, -1.0f, 3.0f, 1.0f};

SamplingParams params(float temperature, int64_t top_k, float top_p, uint64_t seed) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

TEST(Sampler, GreedyTakesArgmaxWithLowestIdOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(kLogits), 1);
  EXPECT_EQ(argmax(kLogits), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  auto draw = [](uint64_t seed) {
    Sampler s(params(1.0f, 0, 1.0f, seed));
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i)
      out.push_back(s.sample(kLogits));
    return out;
  };
  EXPECT_EQ(draw(3), draw(3));
  EXPECT_NE(draw(3), draw(4));
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  Sampler k1(params(2.0f, 1, 1.0f, 9));
  Sampler p0(params(2.0f, 0, 1e-6f, 9));
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(k1.sample(kLogits), 1);
    EXPECT_EQ(p0.sample(kLogits), 1);
  }
}

TEST(Sampler, TopKRestrictsToTheKBestAndFrequenciesFollowSoftmax) {
  Sampler s(params(1.0f, 3, 1.0f, 11));
  std::map<int32_t, int> counts;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i)
    ++counts[s.sample(kLogits)];
  EXPECT_EQ(counts.size(), 3u);  // ids 1, 4 (logit 3.0) and 2 (2.9)
  EXPECT_TRUE(counts.count(1) && counts.count(4) && counts.count(2));
  // p(2) = e^2.9 / (2 e^3 + e^2.9) = 0.3168
  EXPECT_NEAR(counts[2] / static_cast<double>(draws), 0.3168, 0.015);
}

TEST(Sampler, ValidatesParameters) {
  EXPECT_TRUE(validate_sampling_params(SamplingParams{}).is_ok());
  const Status bad = validate_sampling_params(params(-1.0f, -2, 0.0f, 0));
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("temperature"), std::string::npos);
  EXPECT_NE(bad.message().find("top_k"), std::string::npos);
  EXPECT_NE(bad.message().find("top_p"), std::string::npos);
}

// logit_bias moves a token's logit; greedy then follows it.
TEST(Sampler, LogitBiasIsAddedBeforeChoosing) {
  const std::vector<float> logits{0.0f, 3.0f, 1.0f, 2.5f};
  SamplingParams p;
  p.logit_bias = {{2, 2.5f}, {1, -1.0f}};  // 3.5 and 2.0
  Sampler s(p);
  EXPECT_EQ(s.sample(logits), 2);
  p.logit_bias = {{0, -100.0f}};
  EXPECT_EQ(Sampler(p).sample(logits), 1);
}

// Presence: a token already picked loses the penalty once; frequency: per time picked. Over the
// tokens this sampler generated (and add_history's), as OpenAI defines them.
TEST(Sampler, PresenceAndFrequencyPenaltiesCountWhatWasGenerated) {
  const std::vector<float> logits{0.0f, 3.0f, 2.0f, 1.8f};
  SamplingParams presence;
  presence.presence_penalty = 1.5f;
  Sampler s(presence);
  // 1 (3.0); 2 (1.5 < 2.0); 3 (1.5, 0.5 < 1.8); 1 again (1.5 > 0.5, 0.3: once, not per time).
  EXPECT_EQ(std::vector<int32_t>(
                {s.sample(logits), s.sample(logits), s.sample(logits), s.sample(logits)}),
            std::vector<int32_t>({1, 2, 3, 1}));
  SamplingParams frequency;
  frequency.frequency_penalty = 0.7f;
  Sampler f(frequency);
  // 1; 1 (2.3 > 2.0); 2 (1.6 < 2.0); 3 (1.6 and 1.3 < 1.8).
  EXPECT_EQ(std::vector<int32_t>(
                {f.sample(logits), f.sample(logits), f.sample(logits), f.sample(logits)}),
            std::vector<int32_t>({1, 1, 2, 3}));
  // A replay that already delivered 1, 2 and 3 continues where the first placement was.
  Sampler replayed(presence);
  const std::vector<int32_t> delivered{1, 2, 3};
  replayed.add_history(delivered);
  EXPECT_EQ(replayed.sample(logits), 1);
}

TEST(Sampler, ValidatesPenaltiesAndLogitBias) {
  SamplingParams p;
  p.presence_penalty = 2.5f;
  p.frequency_penalty = -3.0f;
  Status s = validate_sampling_params(p);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("presence_penalty must be in [-2, 2]"), std::string::npos);
  EXPECT_NE(s.message().find("frequency_penalty must be in [-2, 2]"), std::string::npos);
  p = {};
  p.logit_bias = {{5, 100.5f}};
  EXPECT_NE(validate_sampling_params(p).message().find("must be in [-100, 100]"),
            std::string::npos);
  p.logit_bias = {{129280, 1.0f}};
  EXPECT_TRUE(validate_sampling_params(p).is_ok());  // no vocabulary given
  EXPECT_NE(validate_sampling_params(p, 129280).message().find("not an id of the 129280-token"),
            std::string::npos);
  p.logit_bias.assign(301, {1, 1.0f});
  EXPECT_NE(validate_sampling_params(p).message().find("at most 300"), std::string::npos);
}

}  // namespace
}  // namespace dserve::model
