#include "dserve/model/sampler.h"

#include <gtest/gtest.h>

#include <map>
#include <vector>

namespace dserve::model {
namespace {

const std::vector<float> kLogits{0.5f, 3.0f, 2.9f, -1.0f, 3.0f, 1.0f};

TEST(Sampler, GreedyTakesArgmaxWithLowestIdOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(kLogits), 1);
  EXPECT_EQ(argmax(kLogits), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  auto draw = [](uint64_t seed) {
    Sampler s(SamplingParams{.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i)
      out.push_back(s.sample(kLogits));
    return out;
  };
  EXPECT_EQ(draw(3), draw(3));
  EXPECT_NE(draw(3), draw(4));
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  Sampler k1(SamplingParams{.temperature = 2.0f, .top_k = 1, .top_p = 1.0f, .seed = 9});
  Sampler p0(SamplingParams{.temperature = 2.0f, .top_k = 0, .top_p = 1e-6f, .seed = 9});
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(k1.sample(kLogits), 1);
    EXPECT_EQ(p0.sample(kLogits), 1);
  }
}

TEST(Sampler, TopKRestrictsToTheKBestAndFrequenciesFollowSoftmax) {
  Sampler s(SamplingParams{.temperature = 1.0f, .top_k = 3, .top_p = 1.0f, .seed = 11});
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
  const Status bad = validate_sampling_params(
      SamplingParams{.temperature = -1.0f, .top_k = -2, .top_p = 0.0f, .seed = 0});
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("temperature"), std::string::npos);
  EXPECT_NE(bad.message().find("top_k"), std::string::npos);
  EXPECT_NE(bad.message().find("top_p"), std::string::npos);
}

}  // namespace
}  // namespace dserve::model
