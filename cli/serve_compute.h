#pragma once
// The engines of a `dserve serve` process: one per worker, or for the co-located role one
// engine shared by its two workers through a MixedStepEngine (decode rows and prefill chunks
// in one step under --max-step-tokens).

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dserve/core/status.h"
#include "dserve/model/engine.h"
#include "dserve/model/mixed_step_engine.h"
#include "dserve/ops/metrics.h"

namespace dserve::cli {

// The flags of the roles that compute (prefill, decode, colocated).
struct ServeComputeFlags {
  std::string device = "cpu";          // cpu or cuda:N
  int64_t device_max_context = 16384;  // cuda: the longest request a GPU state holds
  int64_t max_step_tokens = 512;       // colocated: rows of one mixed step
  int64_t step_mix_wait_us = 2000;     // colocated: a step's wait for the other worker
};
void add_serve_compute_flags(CLI::App& serve, ServeComputeFlags& flags);
// The engine's options from the flags: INVALID_ARGUMENT naming the flag for a bad value,
// UNAVAILABLE with the probe's reason for a GPU this machine or build cannot use.
Result<model::EngineOptions> engine_options_from_flags(const ServeComputeFlags& flags,
                                                       bool colocated, int64_t max_batch);

struct ServeComputeOptions {
  bool prefill = false;
  bool decode = false;
  bool colocated = false;  // prefill and decode share one engine
  model::EngineOptions engine;
  int64_t prefill_requests = 16;  // requests the prefill worker's engine holds at once
  int64_t prefill_step_tokens = 2048;
  int64_t max_batch = 64;  // the decode worker's requests
  // The decode worker's draft tokens per request per step at most (0: no speculation): its
  // engine keeps the MTP block's state (EngineOptions::draft) and steps take k + 1 rows each.
  int64_t draft_tokens = 0;
  model::MixedStepOptions mixed;
};

// Members in this order: the sessions go before the engine they share.
struct ServeCompute {
  std::unique_ptr<model::MixedStepEngine> shared;
  std::unique_ptr<model::Engine> prefill;
  std::unique_ptr<model::Engine> decode;

  const model::Engine& any() const { return prefill ? *prefill : *decode; }
};

// Counts a co-located engine's steps into `metrics` (which must outlive it):
// dserve_colocated_steps_total, _mixed_steps_total, _rows_total{kind=decode|prefill}.
std::function<void(int64_t, int64_t)> mixed_step_metrics(ops::MetricsRegistry& metrics);

// make_engine's errors.
Result<ServeCompute> make_serve_compute(const std::shared_ptr<const model::Model>& model,
                                        const ServeComputeOptions& options);

}  // namespace dserve::cli
