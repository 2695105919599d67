// Reading the sections that say how the processes are launched and supervised: `launcher`,
// `slurm` and `supervision`, and the nodes a Slurm manifest plans on before the job runs.

#include <algorithm>
#include <cstdint>

#include "manifest_internal.h"

namespace dserve::cluster::internal {
namespace {

constexpr int64_t kMaxPort = 65535;
constexpr int64_t kHour = int64_t{3600} * 1000;

// A value passed to sbatch as one word: no white space, quotes or shell characters, so that
// what Slurm sees is what the manifest says (Slurm itself checks the meaning).
bool is_sbatch_word(const std::string& s) {
  return !s.empty() && s.size() <= 256 && s.front() != '-' &&
         s.find_first_of(" \t\n'\"\\;&|$`<>") == std::string::npos;
}

std::string sbatch_word(MapReader& m, std::string_view key, ProblemSink& sink, Location* at) {
  *at = m.at(key);
  auto value = m.string(key, false);
  if (!value) return "";
  if (!is_sbatch_word(*value)) {
    sink.add(m.at(key), m.path(key), "'" + value->substr(0, 80) + "'",
             "one word without spaces, quotes or shell characters (passed to sbatch)");
    return "";
  }
  return *value;
}

}  // namespace

void read_launcher(const YAML::Node& root_launcher, Location at, ProblemSink& sink, Manifest& out) {
  if (!root_launcher.IsScalar()) {
    sink.add(location_of(root_launcher, at), "launcher", describe(root_launcher),
             "'nodes' or 'slurm'");
    return;
  }
  const std::string& v = root_launcher.Scalar();
  if (v == "nodes") {
    out.launcher = Launcher::kNodes;
  } else if (v == "slurm") {
    out.launcher = Launcher::kSlurm;
  } else {
    sink.add(location_of(root_launcher, at), "launcher", "'" + v + "'", "'nodes' or 'slurm'");
  }
}

void read_slurm(const YAML::Node& node, Location at, ProblemSink& sink, SlurmSpec& slurm) {
  MapReader m(node, "slurm", at, sink,
              {"partition", "account", "time_limit", "constraint", "base_port", "program"});
  slurm.at = m.at();
  slurm.partition = sbatch_word(m, "partition", sink, &slurm.partition_at);
  slurm.account = sbatch_word(m, "account", sink, &slurm.account_at);
  slurm.time_limit = sbatch_word(m, "time_limit", sink, &slurm.time_limit_at);
  slurm.constraint = sbatch_word(m, "constraint", sink, &slurm.constraint_at);
  slurm.base_port = m.integer("base_port", 1, kMaxPort, false).value_or(slurm.base_port);
  if (auto program = m.string("program", false)) {
    if (program->front() == '/' && program->find_first_of("'\n") == std::string::npos) {
      slurm.program = *program;
    } else {
      sink.add(m.at("program"), m.path("program"), "'" + *program + "'",
               "the absolute path of the dserve program on the allocated nodes");
    }
  }
}

void read_supervision(const YAML::Node& node, Location at, ProblemSink& sink, SupervisionSpec& s) {
  MapReader m(node, "supervision", at, sink,
              {"max_restarts", "restart_window_ms", "backoff_ms", "backoff_max_ms",
               "stop_timeout_ms", "on_pool_lost", "pool_lost_ms"});
  s.max_restarts = m.integer("max_restarts", 0, 1000, false).value_or(s.max_restarts);
  s.restart_window_ms =
      m.integer("restart_window_ms", 1000, 24 * kHour, false).value_or(s.restart_window_ms);
  s.backoff_ms = m.integer("backoff_ms", 0, kHour, false).value_or(s.backoff_ms);
  s.backoff_max_ms = m.integer("backoff_max_ms", 0, kHour, false).value_or(s.backoff_max_ms);
  if (s.backoff_max_ms < s.backoff_ms) {
    sink.add(m.at("backoff_max_ms"), m.path("backoff_max_ms"), std::to_string(s.backoff_max_ms),
             "at least backoff_ms (" + std::to_string(s.backoff_ms) + ")");
  }
  s.stop_timeout_ms = m.integer("stop_timeout_ms", 0, kHour, false).value_or(s.stop_timeout_ms);
  s.on_pool_lost =
      m.choice("on_pool_lost", {"restart", "fail-job"}, false).value_or(s.on_pool_lost);
  s.pool_lost_ms = m.integer("pool_lost_ms", 1, 24 * kHour, false).value_or(s.pool_lost_ms);
}

void plan_on_slurm_node(const YAML::Node& root, ProblemSink& sink, Manifest& out,
                        SectionInfo& info) {
  // Slurm chooses the nodes: the manifest names none, and places nothing.
  for (const char* key : {"nodes"}) {
    if (root[key].IsDefined()) {
      sink.add(location_of(root[key], {1, 1}), key, "a node list",
               "no nodes under launcher 'slurm' (the job's allocation decides where each "
               "process runs; ask for nodes with slurm.partition, slurm.constraint and the "
               "pools' gres)");
    }
  }
  if (!out.gateway.node.empty()) {
    sink.add(out.gateway.at, "gateway.node", "'" + out.gateway.node + "'",
             "no node under launcher 'slurm' (the gateway runs on the job's first node)");
  }
  for (const Pool& pool : out.pools) {
    const std::string key = "pools." + std::string(process_role_name(pool.role));
    if (!pool.placement_at.empty()) {
      sink.add(pool.placement_at.front(), key + ".placement", "a placement",
               "no placement under launcher 'slurm' (one allocated node per replica)");
    }
    if (!pool.ports.empty()) {
      sink.add(pool.ports_at.front(), key + ".ports", "explicit ports",
               "no ports under launcher 'slurm' (ports are assigned from slurm.base_port)");
    }
  }
  int64_t devices = 0;
  for (const Pool& pool : out.pools)
    devices += pool.replicas * pool.devices_per_replica;
  Node planning;
  planning.name = std::string(kSlurmPlanningNode);
  planning.address = "127.0.0.1";  // replaced by each allocated node's address
  planning.devices = devices;
  planning.base_port = out.slurm.base_port;
  out.nodes = {planning};
  out.gateway.node = planning.name;
  for (Pool& pool : out.pools) {
    pool.placement.assign(static_cast<size_t>(std::max<int64_t>(pool.replicas, 0)), planning.name);
    pool.placement_at.assign(pool.placement.size(), pool.at);
  }
  info.nodes_ok = true;
}

}  // namespace dserve::cluster::internal
