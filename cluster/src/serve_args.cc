#include "dserve/cluster/serve_args.h"

namespace dserve::cluster {
namespace {

std::string join(const std::vector<std::string>& items, char sep) {
  std::string out;
  for (const auto& s : items)
    out += (out.empty() ? "" : std::string(1, sep)) + s;
  return out;
}

std::string address(const std::string& host, uint16_t port) {
  return host + ":" + std::to_string(port);
}

}  // namespace

std::vector<std::pair<std::string, std::string>> worker_addresses(const Process& p) {
  switch (p.role) {
    case ProcessRole::kPrefill:
      return {{"prefill", address(p.host, p.port)}};
    case ProcessRole::kDecode:
      return {{"decode", address(p.host, p.port)}};
    case ProcessRole::kColocated:
      return {{"prefill", address(p.host, p.port)}, {"decode", address(p.host, p.second_port)}};
    case ProcessRole::kGateway:
    case ProcessRole::kNodeAgent:
      break;
  }
  return {};
}

Result<std::vector<std::string>> to_serve_args(const Manifest& m, const Process& process) {
  // Every process logs under its manifest name, so that one request's lines can be told apart.
  std::vector<std::string> args = {
      "serve",      "--role",   std::string(process_role_name(process.role)), "--model",
      m.model.path, "--listen", address(process.host, process.port),          "--process-name",
      process.name};
  auto add = [&args](const char* flag, int64_t value) {
    args.push_back(flag);
    args.push_back(std::to_string(value));
  };
  if (!m.model.sha256.empty()) args.insert(args.end(), {"--model-sha256", m.model.sha256});
  // fp32 is serve's default: a manifest without kv_dtype gives the arguments it always gave.
  if (m.model.kv_dtype != "fp32") args.insert(args.end(), {"--kv-dtype", m.model.kv_dtype});
  if (m.security && m.security->control_tls) {
    const ControlTlsSpec& tls = *m.security->control_tls;
    args.insert(args.end(), {"--control-tls-cert", tls.cert, "--control-tls-key", tls.key,
                             "--control-tls-ca", tls.ca});
  }
  if (process.metrics_port != 0) {
    args.insert(args.end(), {"--metrics-listen", address(process.host, process.metrics_port)});
  }
  if (process.http_port != 0) {
    args.insert(args.end(), {"--http-listen", address(process.host, process.http_port)});
  }
  if (process.role == ProcessRole::kGateway) {
    std::vector<std::string> prefill, decode;
    for (const Process& p : m.processes) {
      for (auto& [role, at] : worker_addresses(p))
        (role == "prefill" ? prefill : decode).push_back(std::move(at));
    }
    args.insert(args.end(), {"--grpc-listen", address(process.host, process.second_port),
                             "--prefill", join(prefill, ','), "--decode", join(decode, ',')});
    add("--ready-timeout-ms", m.timeouts.ready_ms);
    add("--request-timeout-ms", m.timeouts.request_ms);
    add("--probe-interval-ms", m.timeouts.probe_interval_ms);
    // A third of the decode workers' reservation timeout: two renewals may be lost.
    add("--reservation-renewal-ms", std::max<int64_t>(1, m.timeouts.reservation_ms / 3));
    add("--max-running", m.limits.max_running);
    add("--max-queued", m.limits.max_queued);
    add("--max-attempts", m.limits.max_attempts);
    add("--max-prefill-losses", m.limits.max_prefill_losses);
    add("--max-prefill-queue-tokens", m.limits.max_prefill_queue_tokens);
    add("--default-max-tokens", m.limits.default_max_tokens);
    add("--max-prompt-tokens", m.limits.max_prompt_tokens);
    add("--max-output-tokens", m.limits.max_output_tokens);
    add("--max-requests-per-second-per-token", m.limits.requests_per_second_per_token);
    add("--max-concurrent-per-token", m.limits.concurrent_per_token);
    if (m.supervision.on_pool_lost == "fail-job") {
      args.insert(args.end(), {"--on-pool-lost", "fail-job"});
      add("--pool-lost-ms", m.supervision.pool_lost_ms);
    }
    // Client security is the gateway's alone: workers take no client tokens (control_tls,
    // above, goes to every process).
    if (m.security) {
      for (const auto& [flag, path] : {std::pair{"--token-file", &m.security->token_file},
                                       std::pair{"--tls-cert", &m.security->tls_cert},
                                       std::pair{"--tls-key", &m.security->tls_key},
                                       std::pair{"--tls-ca", &m.security->tls_ca}}) {
        if (path->has_value()) args.insert(args.end(), {flag, **path});
      }
    }
    return args;
  }

  const Pool* pool = nullptr;
  for (const Pool& p : m.pools) {
    if (p.role == process.role) pool = &p;
  }
  DSERVE_CHECK_MSG(pool != nullptr, "process " + process.name + " has no pool in the manifest");
  if (process.role == ProcessRole::kColocated) {
    args.insert(args.end(), {"--decode-listen", address(process.host, process.second_port)});
    add("--max-step-tokens", pool->max_step_tokens);
  }
  args.insert(args.end(), {"--ucx-transports", join(m.network.ucx_transports, ','),
                           "--ucx-net-devices", join(m.network.ucx_net_devices, ',')});
  add("--transfer-timeout-ms", m.timeouts.transfer_ms);
  if (pool->device == "cuda" && !process.devices.empty()) {
    args.insert(args.end(), {"--device", "cuda:" + std::to_string(process.devices.front())});
  }
  if (process.role != ProcessRole::kDecode) {
    add("--token-budget", pool->token_budget);
    add("--step-ms", pool->step_ms);
    // The prefix store; without a kv_store section the flags' defaults are the section's.
    if (m.kv_store) {
      const KvStoreSpec& kv = *m.kv_store;
      add("--kv-device-mib", kv.device_mib);
      add("--kv-host-mib", kv.host_mib);
      args.insert(args.end(), {"--kv-host-codec", kv.host_codec});
      if (kv.disk) {
        args.insert(args.end(), {"--kv-disk-path", kv.disk->path});
        add("--kv-disk-mib", kv.disk->size_mib);
        args.insert(args.end(), {"--kv-disk-codec", kv.disk->codec});
        add("--kv-write-queue-mib", kv.disk->write_queue_mib);
      }
    }
  }
  if (process.role != ProcessRole::kPrefill) {
    add("--max-batch", pool->max_batch);
    add("--kv-budget-mib", pool->kv_budget_mib);
    add("--reservation-timeout-ms", m.timeouts.reservation_ms);
    add("--region-grace-ms", m.timeouts.region_grace_ms);
    // Off is serve's default: a manifest without it gives the arguments it always gave.
    if (pool->speculative_tokens > 0) {
      add("--speculative-tokens", pool->speculative_tokens);
      args.insert(args.end(), {"--speculation", pool->speculation});
    }
  }
  return args;
}

}  // namespace dserve::cluster
