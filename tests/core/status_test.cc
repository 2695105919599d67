#include "dserve/core/status.h"

#include <gtest/gtest.h>

namespace dserve {
namespace {

Result<int> parse_positive(int v) {
  if (v <= 0) return invalid_argument("value " + std::to_string(v) + " is not positive");
  return v;
}

Result<int> doubled(int v) {
  DSERVE_ASSIGN_OR_RETURN(int x, parse_positive(v));
  return 2 * x;
}

TEST(Status, OkAndErrorCarryCodeAndMessage) {
  EXPECT_TRUE(Status::ok().is_ok());
  Status s = not_found("tensor `embed.weight` is missing");
  EXPECT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.to_string(), "NOT_FOUND: tensor `embed.weight` is missing");
  EXPECT_EQ(s.with_context("model.safetensors").message(),
            "model.safetensors: tensor `embed.weight` is missing");
}

TEST(Result, PropagatesErrorsThroughAssignOrReturn) {
  EXPECT_EQ(doubled(4).value(), 8);
  Result<int> bad = doubled(-1);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
}

TEST(ResultDeathTest, ValueOfFailedResultAborts) {
  Result<int> bad = parse_positive(0);
  EXPECT_DEATH((void)bad.value(), "invariant broken");
}

}  // namespace
}  // namespace dserve
