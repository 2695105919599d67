// The acceptance test: one gateway, two prefill and two decode `dserve serve` processes
// on loopback serve 200 concurrent greedy requests (prompts of 1 to 2,000 tokens on `tiny`)
// through one gRPC client; every output is token-identical to `dserve generate`, every stream
// is contiguous, every worker takes part, and the decode workers hold nothing afterwards.

#include <gtest/gtest.h>

#include <vector>

#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::load_requests;
using testing_support::run_load_and_check;
using testing_support::ServeCluster;

TEST(Cluster, TwoHundredConcurrentRequestsMatchGenerate) {
  ClusterOptions o;
  o.prefill = 2;
  o.decode = 2;
  // Default settings: a burst of 200 prompts (about 200,000 tokens) waits at the gateway, not
  // in the prefill queues (--max-prefill-queue-tokens), so no decode reservation is held long
  // enough to expire, and each request is placed once.
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();

  const auto requests = load_requests(200, 2000, 2024);
  const auto report = run_load_and_check(cluster, requests);
  EXPECT_EQ(report.completed, requests.size());
  EXPECT_EQ(report.failed, 0u);
}

}  // namespace
}  // namespace dserve
