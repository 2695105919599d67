// The engines of a serving process (serve_compute.h).

#include "serve_compute.h"

#include <algorithm>
#include <utility>

#include "dserve/kernels/device.h"

namespace dserve::cli {

void add_serve_compute_flags(CLI::App& serve, ServeComputeFlags& flags) {
  serve
      .add_option("--device", flags.device,
                  "prefill, decode, colocated: where the model computes: cpu, or cuda:N (refused "
                  "at start, with the reason, when this machine or build cannot use that GPU)")
      ->capture_default_str();
  serve
      .add_option("--device-max-context", flags.device_max_context,
                  "cuda: the longest request (prompt and output tokens) a GPU request state "
                  "holds; sizes the GPU's page pools")
      ->capture_default_str();
  serve
      .add_option("--max-step-tokens", flags.max_step_tokens,
                  "colocated: rows of one engine step; the decode rows go in whole, prefill "
                  "chunks fill the rest (split where they do not fit); more than --max-batch")
      ->capture_default_str();
  serve
      .add_option("--step-mix-wait-us", flags.step_mix_wait_us,
                  "colocated: how long a step waits for the other worker's rows when that "
                  "worker took part in the step before")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1000000}));
}

Result<model::EngineOptions> engine_options_from_flags(const ServeComputeFlags& flags,
                                                       bool colocated, int64_t max_batch) {
  model::EngineOptions options;
  auto device = model::parse_device(flags.device);
  if (!device.is_ok()) return invalid_argument("--device: " + device.status().message());
  if (flags.device_max_context < 1 || flags.device_max_context > (int64_t{1} << 30)) {
    return invalid_argument("--device-max-context must be in 1..2^30, got " +
                            std::to_string(flags.device_max_context));
  }
  if (colocated && (flags.max_step_tokens <= max_batch || flags.max_step_tokens > (1 << 20))) {
    return invalid_argument("--max-step-tokens must be more than --max-batch (" +
                            std::to_string(max_batch) +
                            ", or a full decode batch would leave "
                            "no row of a step for prefill) and at most 2^20, got " +
                            std::to_string(flags.max_step_tokens));
  }
  options.device = *device;
  options.max_positions = flags.device_max_context;
  if (device->kind == model::Device::Kind::kCuda) {
    if (const std::string why = kernels::select_cuda_device(device->index); !why.empty())
      return unavailable("--device " + device->name() + ": " + why);
  }
  return options;
}

std::function<void(int64_t, int64_t)> mixed_step_metrics(ops::MetricsRegistry& metrics) {
  ops::Counter& steps =
      metrics.counter("dserve_colocated_steps_total", "Engine steps of the co-located process.");
  ops::Counter& mixed = metrics.counter("dserve_colocated_mixed_steps_total",
                                        "Of them, steps with decode and prefill rows both.");
  const auto rows = [&](const char* kind) -> ops::Counter& {
    return metrics.counter("dserve_colocated_rows_total", "Rows of those steps, by kind.",
                           {{"kind", kind}});
  };
  ops::Counter& decode = rows("decode");
  ops::Counter& prefill = rows("prefill");
  return [&steps, &mixed, &decode, &prefill](int64_t decode_rows, int64_t prefill_rows) {
    steps.inc();
    if (decode_rows > 0 && prefill_rows > 0) mixed.inc();
    decode.inc(static_cast<double>(decode_rows));
    prefill.inc(static_cast<double>(prefill_rows));
  };
}

Result<ServeCompute> make_serve_compute(const std::shared_ptr<const model::Model>& model,
                                        const ServeComputeOptions& options) {
  ServeCompute compute;
  if (options.colocated) {
    model::EngineOptions eo = options.engine;
    eo.max_requests = options.prefill_requests + options.max_batch;
    eo.max_step_tokens = options.mixed.max_step_tokens;
    eo.draft = options.draft_tokens > 0;
    auto made = model::make_engine(model, eo);
    if (!made.is_ok()) return made.status();
    compute.shared =
        std::make_unique<model::MixedStepEngine>(std::move(made).value(), options.mixed);
    compute.prefill = compute.shared->session(model::StepPriority::kPrefill);
    compute.decode = compute.shared->session(model::StepPriority::kDecode);
    return compute;
  }
  for (auto [wanted, slot, requests, step_tokens] :
       {std::tuple{options.prefill, &compute.prefill, options.prefill_requests,
                   options.prefill_step_tokens},
        std::tuple{options.decode, &compute.decode, options.max_batch,
                   options.max_batch * (options.draft_tokens + 1)}}) {
    if (!wanted) continue;
    model::EngineOptions eo = options.engine;
    eo.draft = slot == &compute.decode && options.draft_tokens > 0;
    eo.max_requests = std::max<int64_t>(requests, 1);
    eo.max_step_tokens = std::max<int64_t>(step_tokens, 1);
    auto made = model::make_engine(model, eo);
    if (!made.is_ok()) return made.status();
    *slot = std::move(made).value();
  }
  return compute;
}

}  // namespace dserve::cli
