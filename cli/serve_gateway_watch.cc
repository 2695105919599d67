#include "serve_gateway_watch.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <map>

namespace dserve::cli {

void add_pool_loss_flags(CLI::App& serve, PoolLossFlags& flags) {
  serve
      .add_option("--on-pool-lost", flags.on_pool_lost,
                  "gateway: restart (keep serving while node agents restart workers) or "
                  "fail-job (exit with status 3 when a pool has had no healthy worker for "
                  "--pool-lost-ms, so that the cluster ends and releases its nodes)")
      ->check(CLI::IsMember({"restart", "fail-job"}))
      ->capture_default_str();
  serve
      .add_option("--pool-lost-ms", flags.pool_lost_ms,
                  "gateway: how long a pool may have no healthy worker under fail-job")
      ->check(CLI::Range(int64_t{1}, int64_t{86400000}))
      ->capture_default_str();
}

int wait_for_stop_or_pool_loss(const sigset_t& stop, const actors::Gateway& gateway,
                               const PoolLossFlags& flags) {
  using Clock = std::chrono::steady_clock;
  const bool watch = flags.on_pool_lost == "fail-job";
  std::map<actors::Role, Clock::time_point> empty_since;
  for (;;) {
    timespec tick{0, 100000000};  // 100 ms
    if (const int sig = sigtimedwait(&stop, nullptr, watch ? &tick : nullptr); sig > 0) return sig;
    if (!watch) continue;
    std::map<actors::Role, int> healthy = {{actors::Role::kPrefill, 0}, {actors::Role::kDecode, 0}};
    for (const auto& w : gateway.snapshot().workers) {
      if (w.healthy && !w.draining) ++healthy[w.role];
    }
    const auto now = Clock::now();
    for (const auto& [role, n] : healthy) {
      if (n > 0) {
        empty_since.erase(role);
        continue;
      }
      const auto since = empty_since.emplace(role, now).first->second;
      if (now - since > std::chrono::milliseconds(flags.pool_lost_ms)) {
        std::fprintf(stderr,
                     "dserve: gateway: the %s pool has had no healthy worker for %lld ms "
                     "(--on-pool-lost fail-job): ending\n",
                     role == actors::Role::kPrefill ? "prefill" : "decode",
                     static_cast<long long>(flags.pool_lost_ms));
        return 0;
      }
    }
  }
}

}  // namespace dserve::cli
