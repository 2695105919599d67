#pragma once
// The gateway's watch while it serves: it waits for a stop signal and, under
// `--on-pool-lost fail-job`, for a pool that has had no healthy worker for --pool-lost-ms;
// then the gateway drains and exits with cluster::kPoolLostExitCode, and its node agent ends
// the cluster (under Slurm, the job, so that it does not hold its nodes).

#include <signal.h>
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

#include "dserve/actors/gateway.h"

namespace dserve::cli {

struct PoolLossFlags {
  std::string on_pool_lost = "restart";  // restart: keep serving; fail-job: exit
  int64_t pool_lost_ms = 60000;
};

void add_pool_loss_flags(CLI::App& serve, PoolLossFlags& flags);

// Blocks until a signal of `stop` arrives (returns it) or, under fail-job, until a pool has
// been without a healthy, non-draining worker for longer than pool_lost_ms (prints which and
// returns 0).
int wait_for_stop_or_pool_loss(const sigset_t& stop, const actors::Gateway& gateway,
                               const PoolLossFlags& flags);

}  // namespace dserve::cli
