#pragma once
// A steady stream of greedy requests against a gateway, for tests that change a running
// cluster (kill workers, scale pools, end it): `clients` threads each send one request after
// another until stop(), and every outcome is counted. A completed request must be
// token-identical to the reference and never completed twice; the test decides which failures
// its change allows (none, or only after the cluster's end began).

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"

namespace dserve::testing_support {

class RequestStream {
 public:
  struct Tally {
    size_t exact = 0;                   // completed, token-identical to the reference
    size_t wrong = 0;                   // completed with other tokens
    size_t duplicates = 0;              // a request id completed twice
    size_t failed = 0;                  // not completed
    std::vector<std::string> failures;  // "id: status" of each, in order
    std::string failure_lines() const;  // the failures, one per line
  };

  // Starts `clients` threads sending requests of `max_tokens` to `gateway` (gRPC HOST:PORT).
  RequestStream(const std::string& gateway, int clients, uint32_t max_tokens,
                const std::string& id_prefix);
  ~RequestStream();  // stops

  // Waits until `more` further requests have completed (at most `timeout_s`); false on timeout.
  bool wait_for_completions(size_t more, int timeout_s = 120);
  void stop();
  Tally tally() const;

 private:
  void run(int client);

  std::string gateway_;
  uint32_t max_tokens_;
  std::string prefix_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  Tally tally_;
  std::set<std::string> completed_;
  std::vector<std::thread> threads_;
};

}  // namespace dserve::testing_support
