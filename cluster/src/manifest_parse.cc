// Reading each manifest section into the typed Manifest, with every problem reported.

#include <algorithm>
#include <cstdint>

#include "manifest_internal.h"

namespace dserve::cluster::internal {
namespace {

constexpr int64_t kMaxPort = 65535;
constexpr int64_t kBig = INT64_MAX;

// UCX 1.13 transport and alias names (UCX_TLS); "^" exclusions are not supported here.
const std::vector<std::string>& ucx_transport_names() {
  static const std::vector<std::string> names = {
      "all",      "tcp",  "sm",        "shm",      "mm",       "posix",   "sysv",      "xpmem",
      "cma",      "knem", "self",      "ib",       "rc",       "rc_v",    "rc_x",      "rc_verbs",
      "rc_mlx5",  "ud",   "ud_v",      "ud_x",     "ud_verbs", "ud_mlx5", "dc",        "dc_x",
      "dc_mlx5",  "cuda", "cuda_copy", "cuda_ipc", "gdr_copy", "rocm",    "rocm_copy", "rocm_ipc",
      "rocm_gdr", "ugni", "ugni_rdma", "ugni_udt", "ugni_smsg"};
  return names;
}

// kvstore/codec.h's codec_name values; kept here so the manifest does not link the KV store.
const std::vector<std::string> kCodecs = {"lossless", "fp8"};

bool is_absolute(const std::string& path) {
  return !path.empty() && path[0] == '/';
}

bool is_node_name(const std::string& name) {
  if (name.empty() || name.size() > 63 || name.front() == '-' || name.back() == '-') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
  });
}

bool is_net_device(const std::string& name) {
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '.' || c == ':' || c == '-';
  });
}

std::optional<std::string> absolute_path(MapReader& m, std::string_view key, bool required,
                                         ProblemSink& sink) {
  auto path = m.string(key, required);
  if (path && !is_absolute(*path)) {
    sink.add(m.at(key), m.path(key), "'" + *path + "'", "an absolute path (starting with '/')");
    return std::nullopt;
  }
  return path;
}

void read_model(const YAML::Node& node, Location at, ProblemSink& sink, ModelSpec& model) {
  MapReader m(node, "model", at, sink, {"path", "context_tokens", "sha256", "kv_dtype"});
  if (auto p = absolute_path(m, "path", true, sink)) model.path = *p;
  model.context_tokens = m.integer("context_tokens", 1, kBig, false);
  model.kv_dtype = m.choice("kv_dtype", {"fp32", "fp8"}, false).value_or(model.kv_dtype);
  if (auto digest = m.string("sha256", false)) {
    const bool hex =
        digest->size() == 64 && std::all_of(digest->begin(), digest->end(), [](char c) {
          return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
        });
    if (hex) {
      model.sha256 = *digest;
    } else {
      sink.add(m.at("sha256"), m.path("sha256"), "'" + digest->substr(0, 80) + "'",
               "64 lowercase hex digits (the SHA-256 `dserve model init` prints for "
               "checksums.sha256)");
    }
  }
}

void read_nodes(const YAML::Node& node, Location at, ProblemSink& sink, std::vector<Node>& nodes,
                SectionInfo& info) {
  if (!node.IsSequence() || node.size() == 0) {
    sink.add(location_of(node, at), "nodes", node.IsSequence() ? "an empty list" : describe(node),
             "a list of nodes, each with name, address and devices");
    return;
  }
  info.nodes_ok = true;
  for (size_t i = 0; i < node.size(); ++i) {
    const std::string path = "nodes[" + std::to_string(i) + "]";
    MapReader m(
        node[i], path, location_of(node, at), sink,
        {"name", "address", "devices", "memory_gib", "base_port", "ssh", "program", "agent"});
    Node n;
    n.at = m.at();
    if (auto name = m.string("name", true)) {
      if (is_node_name(*name)) {
        n.name = *name;
      } else {
        sink.add(m.at("name"), m.path("name"), "'" + *name + "'",
                 "a name of lower-case letters, digits and '-' (at most 63)");
      }
    }
    if (auto address = m.string("address", true)) {
      if (is_valid_address(*address)) {
        n.address = *address;
      } else {
        sink.add(m.at("address"), m.path("address"), "'" + *address + "'",
                 "an IPv4 address (a.b.c.d, each 0..255) or a host name");
      }
    }
    n.devices = m.integer("devices", 0, 1024, false).value_or(0);
    n.memory_gib = m.integer("memory_gib", 1, kBig, false);
    n.base_port = m.integer("base_port", 1, kMaxPort, false);
    if (auto ssh = m.string("ssh", false)) {
      // An ssh destination: [user@]host or ssh://[user@]host[:port]; never an option.
      const bool ok = !ssh->empty() && ssh->front() != '-' &&
                      ssh->find_first_of(" \t'\"\\;&|$`") == std::string::npos;
      if (ok) {
        n.ssh = *ssh;
      } else {
        sink.add(m.at("ssh"), m.path("ssh"), "'" + *ssh + "'",
                 "an ssh destination: [user@]host or ssh://[user@]host[:port]");
      }
    }
    n.agent_by_systemd = m.choice("agent", {"up", "systemd"}, false).value_or("up") == "systemd";
    if (auto program = m.string("program", false)) {
      if (!program->empty() && program->front() == '/' &&
          program->find_first_of("'\n") == std::string::npos) {
        n.program = *program;
      } else {
        sink.add(m.at("program"), m.path("program"), "'" + *program + "'",
                 "the absolute path of the dserve program on the node");
      }
    }
    if (n.name.empty() || n.address.empty()) info.nodes_ok = false;
    nodes.push_back(std::move(n));
  }
}

void read_gateway(const YAML::Node& node, Location at, ProblemSink& sink, GatewaySpec& gw,
                  bool slurm) {
  MapReader m(node, "gateway", at, sink, {"node", "port", "grpc_port", "http_port"});
  gw.at = m.at();
  gw.node = m.string("node", !slurm).value_or("");
  gw.port = m.integer("port", 1, kMaxPort, false);
  gw.grpc_port = m.integer("grpc_port", 1, kMaxPort, false);
  gw.port_at = m.at("port");
  gw.grpc_port_at = m.at("grpc_port");
  gw.http_port = m.integer("http_port", 1, kMaxPort, false);
  gw.http_port_at = m.at("http_port");
}

void read_pool(const YAML::Node& node, const std::string& path, Location at, ProcessRole role,
               ProblemSink& sink, Pool& pool, bool slurm) {
  std::vector<std::string_view> keys = {"replicas", "placement", "ports", "devices_per_replica",
                                        "device"};
  if (slurm) keys.push_back("gres");
  if (role != ProcessRole::kDecode) keys.insert(keys.end(), {"token_budget", "step_ms"});
  if (role != ProcessRole::kPrefill) {
    keys.insert(keys.end(), {"max_batch", "kv_budget_mib", "speculative_tokens", "speculation"});
  }
  if (role == ProcessRole::kColocated) keys.push_back("max_step_tokens");
  MapReader m(node, path, at, sink, keys);
  pool.role = role;
  pool.at = m.at();
  pool.replicas = m.integer("replicas", 1, kMaxPoolReplicas, true).value_or(0);
  pool.devices_per_replica = m.integer("devices_per_replica", 0, 1024, false).value_or(1);
  pool.device = m.choice("device", {"cpu", "cuda"}, false).value_or(pool.device);
  if (pool.device == "cuda" && pool.devices_per_replica < 1) {
    sink.add(m.at("device"), path + ".device", "cuda with devices_per_replica 0",
             "devices_per_replica of at least 1 (the GPU a replica computes on)");
  }
  if (role != ProcessRole::kDecode) {
    pool.token_budget = m.integer("token_budget", 1, kBig, false).value_or(pool.token_budget);
    pool.step_ms = m.integer("step_ms", 0, kBig, false).value_or(pool.step_ms);
  }
  if (role != ProcessRole::kPrefill) {
    pool.max_batch = m.integer("max_batch", 1, kBig, false).value_or(pool.max_batch);
    pool.kv_budget_mib = m.integer("kv_budget_mib", 1, kBig, false).value_or(pool.kv_budget_mib);
    pool.speculative_tokens =
        m.integer("speculative_tokens", 0, kMaxSpeculativeTokens, false).value_or(0);
    pool.speculation =
        m.choice("speculation", {"adaptive", "fixed"}, false).value_or(pool.speculation);
  }
  if (role == ProcessRole::kColocated) {
    pool.max_step_tokens =
        m.integer("max_step_tokens", 2, int64_t{1} << 20, false).value_or(pool.max_step_tokens);
    if (pool.max_step_tokens <= pool.max_batch) {
      sink.add(m.at("max_step_tokens"), path + ".max_step_tokens",
               std::to_string(pool.max_step_tokens),
               "more than max_batch (" + std::to_string(pool.max_batch) +
                   "), or a full decode batch leaves no row of a step for prefill");
    }
  }

  if (auto gres = m.string("gres", false)) {
    pool.gres_at = m.at("gres");
    const bool word = gres->size() <= 256 && gres->front() != '-' &&
                      gres->find_first_of(" \t\n'\"\\;&|$`<>") == std::string::npos;
    if (!word) {
      sink.add(m.at("gres"), path + ".gres", "'" + gres->substr(0, 80) + "'",
               "a Slurm gres specification such as gpu:1 (one word)");
    } else {
      pool.gres = *gres;
    }
  }

  // placement: one node per replica, or one node name for all of them.
  const YAML::Node placement = m.child("placement");
  if (!placement.IsDefined()) {
    if (m.is_map() && !slurm)
      m.missing("placement", "a node name, or a list of one node name per replica");
  } else if (placement.IsScalar() && !placement.Scalar().empty()) {
    pool.placement.assign(static_cast<size_t>(std::max<int64_t>(pool.replicas, 0)),
                          placement.Scalar());
    pool.placement_at.assign(pool.placement.size(), m.at("placement"));
  } else if (auto list = m.string_list("placement", true,
                                       "a node name, or a list of one node name per replica",
                                       &pool.placement_at)) {
    pool.placement = std::move(*list);
    if (pool.replicas > 0 && pool.placement.size() != static_cast<size_t>(pool.replicas)) {
      sink.add(m.at("placement"), m.path("placement"),
               std::to_string(pool.placement.size()) + " node names",
               std::to_string(pool.replicas) + " (one per replica, as " + m.path("replicas") +
                   " says), or a single node name for all replicas");
      pool.placement.clear();
      pool.placement_at.clear();
    }
  }

  // ports: explicit control ports, one per replica.
  const YAML::Node ports = m.child("ports");
  if (ports.IsDefined()) {
    const std::string expected =
        "a list of " + std::to_string(pool.replicas) + " ports in 1..65535 (one per replica)";
    if (!ports.IsSequence() ||
        (pool.replicas > 0 && ports.size() != static_cast<size_t>(pool.replicas))) {
      sink.add(m.at("ports"), m.path("ports"),
               ports.IsSequence() ? std::to_string(ports.size()) + " ports" : describe(ports),
               expected);
    } else {
      for (size_t i = 0; i < ports.size(); ++i) {
        const YAML::Node p = ports[i];
        const std::string item_path = m.path("ports") + "[" + std::to_string(i) + "]";
        const auto parsed = p.IsScalar() ? parse_integer(p.Scalar()) : std::nullopt;
        const int64_t value = parsed.value_or(-1);
        if (value < 1 || value > kMaxPort) {
          sink.add(location_of(p, m.at("ports")), item_path, describe(p), "a port in 1..65535");
          continue;
        }
        pool.ports.push_back(value);
        pool.ports_at.push_back(location_of(p, m.at("ports")));
      }
      if (pool.ports.size() != ports.size()) {
        pool.ports.clear();
        pool.ports_at.clear();
      }
    }
  }
}

void read_pools(const YAML::Node& node, Location at, ProblemSink& sink, Manifest& out,
                SectionInfo& info) {
  MapReader m(node, "pools", at, sink, {"prefill", "decode", "colocated"});
  info.pools_at = m.at();
  if (!m.is_map()) return;
  const std::pair<const char*, ProcessRole> kinds[] = {{"prefill", ProcessRole::kPrefill},
                                                       {"decode", ProcessRole::kDecode},
                                                       {"colocated", ProcessRole::kColocated}};
  for (const auto& [key, role] : kinds) {
    if (!m.has(key)) continue;
    Pool pool;
    read_pool(m.child(key), m.path(key), m.at(key), role, sink, pool, info.slurm);
    // A pool the mode does not run is reported below; placing it would only add noise.
    const bool fits_mode = !info.mode_known || (out.mode == ServingMode::kColocated) ==
                                                   (role == ProcessRole::kColocated);
    if (fits_mode) out.pools.push_back(std::move(pool));
  }
  if (!info.mode_known) return;
  // The mode and the pools must agree: a pool that would quietly be ignored or merged changes
  // how the cluster serves.
  if (out.mode == ServingMode::kDisaggregated) {
    for (const char* key : {"prefill", "decode"}) {
      if (!m.has(key)) {
        m.missing(key, std::string("a ") + key +
                           " pool: mode 'disaggregated' runs prefill and decode in separate "
                           "pools");
      }
    }
    if (m.has("colocated")) {
      sink.add(m.at("colocated"), m.path("colocated"), "a colocated pool",
               "no colocated pool under mode 'disaggregated' (set mode: colocated to run "
               "prefill and decode in one process)");
    }
  } else {
    if (!m.has("colocated")) {
      m.missing("colocated",
                "a colocated pool: mode 'colocated' runs prefill and decode in one "
                "process per replica");
    }
    for (const char* key : {"prefill", "decode"}) {
      if (m.has(key)) {
        sink.add(m.at(key), m.path(key), std::string("a separate ") + key + " pool",
                 "only pools.colocated under mode 'colocated' (set mode: disaggregated to run "
                 "separate prefill and decode pools)");
      }
    }
  }
}

void read_network(const YAML::Node& node, Location at, ProblemSink& sink, NetworkSpec& net) {
  MapReader m(node, "network", at, sink,
              {"ucx_transports", "ucx_net_devices", "metrics_port_offset"});
  if (auto offset = m.integer("metrics_port_offset", 0, kMaxPort - 1, false)) {
    net.metrics_port_offset = *offset;
  }
  net.metrics_port_offset_at = m.at("metrics_port_offset");
  std::vector<Location> where;
  if (auto tls = m.string_list("ucx_transports", false, "a list of UCX transport names, e.g. [tcp]",
                               &where)) {
    bool ok = true;
    for (size_t i = 0; i < tls->size(); ++i) {
      const std::string& name = (*tls)[i];
      const auto& known = ucx_transport_names();
      if (std::find(known.begin(), known.end(), name) != known.end()) continue;
      std::string expected =
          "a UCX transport (tcp, sm, posix, sysv, cma, rc, ud, dc, cuda_copy, "
          "cuda_ipc, gdr_copy, ...)";
      if (const std::string guess = nearest(name, known); !guess.empty()) {
        expected += " (did you mean '" + guess + "'?)";
      }
      sink.add(where[i], m.path("ucx_transports") + "[" + std::to_string(i) + "]", "'" + name + "'",
               expected);
      ok = false;
    }
    if (ok) net.ucx_transports = *tls;
  }
  where.clear();
  if (auto devices =
          m.string_list("ucx_net_devices", false,
                        "a list of network devices, e.g. [eth0] or [mlx5_0:1]", &where)) {
    bool ok = true;
    for (size_t i = 0; i < devices->size(); ++i) {
      if (is_net_device((*devices)[i])) continue;
      sink.add(where[i], m.path("ucx_net_devices") + "[" + std::to_string(i) + "]",
               "'" + (*devices)[i] + "'",
               "a device name of letters, digits, '_', '.', ':' and '-' (e.g. mlx5_0:1)");
      ok = false;
    }
    if (ok) net.ucx_net_devices = *devices;
  }
}

void read_kv_store(const YAML::Node& node, Location at, ProblemSink& sink, KvStoreSpec& kv,
                   SectionInfo& info) {
  MapReader m(node, "kv_store", at, sink, {"device_mib", "host_mib", "host_codec", "disk"});
  kv.device_mib = m.integer("device_mib", 1, kBig, false).value_or(kv.device_mib);
  kv.host_mib = m.integer("host_mib", 1, kBig, false).value_or(kv.host_mib);
  info.kv_host_mib_at = m.at("host_mib");
  kv.host_codec = m.choice("host_codec", kCodecs, false).value_or(kv.host_codec);
  if (!m.has("disk")) return;
  MapReader d(m.child("disk"), m.path("disk"), m.at("disk"), sink,
              {"path", "size_mib", "codec", "write_queue_mib"});
  KvDiskTier disk;
  disk.path = absolute_path(d, "path", true, sink).value_or("");
  disk.size_mib = d.integer("size_mib", 1, kBig, false).value_or(disk.size_mib);
  disk.codec = d.choice("codec", kCodecs, false).value_or(disk.codec);
  disk.write_queue_mib =
      d.integer("write_queue_mib", 1, kBig, false).value_or(disk.write_queue_mib);
  kv.disk = std::move(disk);
}

void read_security(const YAML::Node& node, Location at, ProblemSink& sink, SecuritySpec& sec) {
  MapReader m(node, "security", at, sink,
              {"token_file", "tls_cert", "tls_key", "tls_ca", "control_tls"});
  sec.token_file = absolute_path(m, "token_file", false, sink);
  sec.tls_cert = absolute_path(m, "tls_cert", false, sink);
  sec.tls_key = absolute_path(m, "tls_key", false, sink);
  sec.tls_ca = absolute_path(m, "tls_ca", false, sink);
  // A certificate without its key (or the reverse) cannot serve TLS: refusing it beats serving
  // in plain text.
  if (m.has("tls_cert") && !m.has("tls_key")) {
    m.missing("tls_key", "the private key of security.tls_cert", m.at("tls_cert"));
  }
  if (m.has("tls_key") && !m.has("tls_cert")) {
    m.missing("tls_cert", "the certificate of security.tls_key", m.at("tls_key"));
  }
  if (m.has("tls_ca") && !m.has("tls_cert")) {
    m.missing("tls_cert", "a certificate: security.tls_ca checks peers, which needs TLS on",
              m.at("tls_ca"));
  }
  // The control plane between the cluster's processes: all three files, or no section.
  if (m.has("control_tls")) {
    MapReader c(m.child("control_tls"), m.path("control_tls"), m.at("control_tls"), sink,
                {"cert", "key", "ca"});
    ControlTlsSpec tls;
    tls.cert = absolute_path(c, "cert", true, sink).value_or("");
    tls.key = absolute_path(c, "key", true, sink).value_or("");
    tls.ca = absolute_path(c, "ca", true, sink).value_or("");
    sec.control_tls = std::move(tls);
  }
}

void read_limits(const YAML::Node& node, Location at, ProblemSink& sink, const ModelSpec& model,
                 Limits& limits) {
  MapReader m(node, "limits", at, sink,
              {"max_running", "max_queued", "max_attempts", "max_prefill_losses",
               "max_prefill_queue_tokens", "default_max_tokens", "max_prompt_tokens",
               "max_output_tokens", "requests_per_second_per_token", "concurrent_per_token"});
  limits.max_running = m.integer("max_running", 1, kBig, false).value_or(limits.max_running);
  limits.max_queued = m.integer("max_queued", 0, kBig, false).value_or(limits.max_queued);
  // The gateway keeps an attempt's number in 8 bits (actors::kMaxAttemptsLimit).
  limits.max_attempts = m.integer("max_attempts", 1, 256, false).value_or(limits.max_attempts);
  limits.max_prefill_losses =
      m.integer("max_prefill_losses", 1, kBig, false).value_or(limits.max_prefill_losses);
  limits.max_prefill_queue_tokens = m.integer("max_prefill_queue_tokens", 1, kBig, false)
                                        .value_or(limits.max_prefill_queue_tokens);
  const int64_t context = model.context_tokens.value_or(kBig);
  const std::string context_note =
      model.context_tokens
          ? "(model.context_tokens is " + std::to_string(*model.context_tokens) + ")"
          : std::string();
  limits.default_max_tokens = m.integer("default_max_tokens", 1, context, false, context_note)
                                  .value_or(limits.default_max_tokens);
  limits.max_prompt_tokens = m.integer("max_prompt_tokens", 1, context, false, context_note)
                                 .value_or(limits.max_prompt_tokens);
  // The gateway holds these two as 32-bit counts.
  constexpr int64_t kMaxCount = UINT32_MAX;
  limits.max_output_tokens =
      m.integer("max_output_tokens", 1, std::min(context, kMaxCount), false, context_note)
          .value_or(limits.max_output_tokens);
  // A request that sets no max_tokens gets the default, which must itself be allowed.
  if (limits.default_max_tokens > limits.max_output_tokens) {
    const char* key = m.has("default_max_tokens") ? "default_max_tokens" : "max_output_tokens";
    const bool on_default = m.has("default_max_tokens");
    sink.add(m.at(key), m.path(key),
             std::to_string(on_default ? limits.default_max_tokens : limits.max_output_tokens),
             on_default ? "at most limits.max_output_tokens (" +
                              std::to_string(limits.max_output_tokens) + ")"
                        : "at least limits.default_max_tokens (" +
                              std::to_string(limits.default_max_tokens) + ")");
  }
  limits.requests_per_second_per_token =
      m.integer("requests_per_second_per_token", 0, kBig, false, "(0: unlimited)")
          .value_or(limits.requests_per_second_per_token);
  limits.concurrent_per_token =
      m.integer("concurrent_per_token", 0, kMaxCount, false, "(0: unlimited)")
          .value_or(limits.concurrent_per_token);
}

void read_timeouts(const YAML::Node& node, Location at, ProblemSink& sink, Timeouts& t) {
  MapReader m(node, "timeouts", at, sink,
              {"ready_ms", "request_ms", "probe_interval_ms", "transfer_ms", "reservation_ms",
               "region_grace_ms"});
  t.ready_ms = m.integer("ready_ms", 1, kBig, false).value_or(t.ready_ms);
  t.request_ms = m.integer("request_ms", 1, kBig, false).value_or(t.request_ms);
  t.probe_interval_ms =
      m.integer("probe_interval_ms", 1, kBig, false).value_or(t.probe_interval_ms);
  t.transfer_ms = m.integer("transfer_ms", 1, kBig, false).value_or(t.transfer_ms);
  t.reservation_ms = m.integer("reservation_ms", 1, kBig, false).value_or(t.reservation_ms);
  // A put still in flight when its reservation is dropped lands in the region until the
  // sender's transfer timeout: the region must outlive it (as `dserve serve` checks).
  if (auto grace = m.integer("region_grace_ms", 0, kBig, false)) t.region_grace_ms = *grace;
  if (t.region_grace_ms <= t.transfer_ms) {
    sink.add(m.at("region_grace_ms"), m.path("region_grace_ms"), std::to_string(t.region_grace_ms),
             "more than timeouts.transfer_ms (" + std::to_string(t.transfer_ms) +
                 "): a put still in flight could land in another request's region");
  }
}

}  // namespace

void read_sections(const YAML::Node& root, ProblemSink& sink, Manifest& out, SectionInfo& info) {
  MapReader top(root, "", {1, 1}, sink,
                {"version", "mode", "model", "nodes", "gateway", "pools", "network", "kv_store",
                 "security", "limits", "timeouts", "launcher", "slurm", "supervision"});
  if (!top.is_map()) return;
  if (top.has("launcher")) read_launcher(top.child("launcher"), top.at("launcher"), sink, out);
  info.slurm = out.launcher == Launcher::kSlurm;
  if (top.has("slurm")) {
    if (info.slurm) {
      read_slurm(top.child("slurm"), top.at("slurm"), sink, out.slurm);
    } else {
      sink.add(top.at("slurm"), "slurm", "a slurm section",
               "launcher: slurm with it (the launcher is 'nodes')");
    }
  }
  if (top.has("supervision")) {
    read_supervision(top.child("supervision"), top.at("supervision"), sink, out.supervision);
  }
  top.integer("version", 1, 1, true, "(the manifest schema version)");
  if (auto mode = top.choice("mode", {"disaggregated", "colocated"}, true)) {
    out.mode = *mode == "colocated" ? ServingMode::kColocated : ServingMode::kDisaggregated;
    info.mode_known = true;
  }
  if (top.has("model")) {
    read_model(top.child("model"), top.at("model"), sink, out.model);
  } else {
    top.missing("model", "a mapping with the model's path");
  }
  if (info.slurm) {
    // The nodes come from the allocation (plan_on_slurm_node below).
  } else if (top.has("nodes")) {
    read_nodes(top.child("nodes"), top.at("nodes"), sink, out.nodes, info);
  } else {
    top.missing("nodes", "a list of nodes, each with name, address and devices");
  }
  if (top.has("gateway")) {
    read_gateway(top.child("gateway"), top.at("gateway"), sink, out.gateway, info.slurm);
  } else if (!info.slurm) {
    top.missing("gateway", "a mapping with the gateway's node");
  }
  if (top.has("pools")) {
    read_pools(top.child("pools"), top.at("pools"), sink, out, info);
  } else {
    top.missing("pools", "a mapping of pools (prefill and decode, or colocated)");
  }
  if (top.has("network")) read_network(top.child("network"), top.at("network"), sink, out.network);
  if (top.has("kv_store")) {
    out.kv_store.emplace();
    read_kv_store(top.child("kv_store"), top.at("kv_store"), sink, *out.kv_store, info);
  }
  if (top.has("security")) {
    out.security.emplace();
    read_security(top.child("security"), top.at("security"), sink, *out.security);
  }
  // The prompt limits' defaults never exceed what the model can take.
  if (out.model.context_tokens) {
    out.limits.max_prompt_tokens =
        std::min(out.limits.max_prompt_tokens, *out.model.context_tokens);
    out.limits.default_max_tokens =
        std::min(out.limits.default_max_tokens, *out.model.context_tokens);
    out.limits.max_output_tokens =
        std::min(out.limits.max_output_tokens, *out.model.context_tokens);
  }
  if (top.has("limits")) {
    read_limits(top.child("limits"), top.at("limits"), sink, out.model, out.limits);
  }
  if (top.has("timeouts")) {
    read_timeouts(top.child("timeouts"), top.at("timeouts"), sink, out.timeouts);
  }
  if (info.slurm) plan_on_slurm_node(root, sink, out, info);
}

}  // namespace dserve::cluster::internal
