#include "request_stream.h"

#include <chrono>

#include "serve_cluster.h"

namespace dserve::testing_support {

RequestStream::RequestStream(const std::string& gateway, int clients, uint32_t max_tokens,
                             const std::string& id_prefix)
    : gateway_(gateway), max_tokens_(max_tokens), prefix_(id_prefix) {
  for (int c = 0; c < clients; ++c)
    threads_.emplace_back([this, c] { run(c); });
}

RequestStream::~RequestStream() {
  stop();
}

void RequestStream::stop() {
  stop_ = true;
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

void RequestStream::run(int client) {
  auto connected = api::ServingClient::connect(gateway_, std::chrono::seconds(10));
  for (uint64_t i = 0; !stop_.load(); ++i) {
    const uint64_t seed = 7919 * static_cast<uint64_t>(client + 1) + i;
    const auto prompt = random_prompt(static_cast<int64_t>(1 + (seed * 37) % 200), seed);
    v1::GenerateRequest req = request_for(prompt, max_tokens_);
    const std::string id = prefix_ + "-" + std::to_string(client) + "-" + std::to_string(i);
    req.set_request_id(id);
    Result<api::Completion> got = connected.is_ok()
                                      ? (*connected)->generate(req, {}, std::chrono::seconds(120))
                                      : Result<api::Completion>(connected.status());
    std::lock_guard<std::mutex> lock(mu_);
    if (got.is_ok()) {
      if (!completed_.insert(id).second) ++tally_.duplicates;
      if (got->tokens == reference_tokens(prompt, max_tokens_)) {
        ++tally_.exact;
      } else {
        ++tally_.wrong;
      }
    } else {
      ++tally_.failed;
      tally_.failures.push_back(id + ": " + got.status().to_string());
    }
    if (!got.is_ok()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

bool RequestStream::wait_for_completions(size_t more, int timeout_s) {
  size_t start;
  {
    std::lock_guard<std::mutex> lock(mu_);
    start = tally_.exact + tally_.wrong;
  }
  for (int i = 0; i < timeout_s * 10; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::lock_guard<std::mutex> lock(mu_);
    if (tally_.exact + tally_.wrong >= start + more) return true;
  }
  return false;
}

std::string RequestStream::Tally::failure_lines() const {
  std::string out;
  for (const auto& f : failures)
    out += f + "\n";
  return out;
}

RequestStream::Tally RequestStream::tally() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tally_;
}

}  // namespace dserve::testing_support
