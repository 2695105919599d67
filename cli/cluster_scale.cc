// `dserve status` and `dserve scale` (cluster_commands.cc has the overview).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <string>

#include "cluster_common.h"
#include "commands.h"
#include "dserve/cluster/serve_args.h"

namespace dserve::cli {
namespace {

using cluster::ClusterState;
using cluster::Manifest;
using cluster::Process;
using cluster::ProcessRecord;
using cluster::ProcessRole;
using std::chrono::milliseconds;

// A free TCP port on `host` (nothing listens on it now), or 0.
bool port_free(const std::string& host, uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &addr.sin_addr) != 1) {
    ::close(fd);
    return false;
  }
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// The process for replica `replica` of `pool` beyond those the manifest lists: on the node
// its placement names (cycling through the list), on the next ports free on that node.
Result<Process> extra_replica(const Manifest& m, const cluster::Pool& pool, int64_t replica,
                              const ClusterState& state) {
  Process p = new_replica(pool.role, replica);
  p.node = pool.placement[static_cast<size_t>(replica) % pool.placement.size()];
  const cluster::Node* node = nullptr;
  for (const auto& n : m.nodes) {
    if (n.name == p.node) node = &n;
  }
  if (!node) return internal_error("pool placement names unknown node " + p.node);
  p.host = node->address;
  p.ssh = node->ssh.value_or("");
  p.program = node->program.value_or("");
  p.agent_by_systemd = node->agent_by_systemd;
  // Devices: those the node's running processes do not use.
  std::set<int64_t> used;
  for (const auto& r : state.processes) {
    if (r.process.node == p.node) used.insert(r.process.devices.begin(), r.process.devices.end());
  }
  for (int64_t d = 0;
       d < node->devices && static_cast<int64_t>(p.devices.size()) < pool.devices_per_replica;
       ++d) {
    if (!used.count(d)) p.devices.push_back(d);
  }
  if (static_cast<int64_t>(p.devices.size()) < pool.devices_per_replica) {
    return resource_exhausted(
        "node '" + p.node + "' has " + std::to_string(node->devices) + " devices and " +
        std::to_string(used.size()) + " are in use; " + p.name + " needs " +
        std::to_string(pool.devices_per_replica) +
        " of its own (sharing one would run it co-located with another worker)");
  }
  const std::set<int64_t> ports = ports_in_use(state.processes, p.node);
  const int64_t from = ports.empty() ? node->base_port.value_or(20000) : *ports.rbegin() + 1;
  DSERVE_RETURN_IF_ERROR(
      assign_free_ports(p, from, m.network.metrics_port_offset, [&](int64_t port) {
        // Another machine's ports cannot be probed from here: the state's record decides.
        return !ports.count(port) &&
               (!p.ssh.empty() || port_free(p.host, static_cast<uint16_t>(port)));
      }));
  return p;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// The agents' view of each process; how many are not running (or not ready).
int print_processes(const Deployment& d) {
  int down = 0;
  std::map<std::string, Result<cluster::AgentReport>> reports;
  std::printf("%-14s %-10s %-9s %8s %8s %10s  %s\n", "PROCESS", "NODE", "AGENT", "PID", "RESTARTS",
              "RECOVERY.S", "LAST EXIT");
  for (const auto& r : d.state.processes) {
    if (!runs_under_agents(d.state)) {
      // A cluster started without agents: the recorded pid decides.
      const bool running = cluster::is_running(r);
      if (!running) ++down;
      std::printf("%-14s %-10s %-9s %8d %8s %10s  %s\n", r.process.name.c_str(),
                  r.process.node.c_str(), running ? "running" : "DOWN", r.pid, "-", "-",
                  running ? "" : r.log_path.c_str());
      continue;
    }
    auto it = reports.find(r.process.node);
    if (it == reports.end()) it = reports.emplace(r.process.node, d.report(r.process.node)).first;
    const cluster::WorkerReport* w = nullptr;
    if (it->second.is_ok()) {
      for (const auto& x : it->second->workers) {
        if (x.name == r.process.name) w = &x;
      }
    }
    std::string agent_state = !it->second.is_ok() ? "NO-AGENT"
                              : it->second->ended ? "ENDED"
                              : w                 ? w->state
                                                  : "missing";
    if (!w || w->state != "ready") ++down;
    std::printf("%-14s %-10s %-9s %8d %8lld %10.2f  %s\n", r.process.name.c_str(),
                r.process.node.c_str(), agent_state.c_str(), w ? w->pid : 0,
                static_cast<long long>(w ? w->restarts : 0), w ? w->last_recovery_s : 0.0,
                w ? w->last_exit.c_str() : "");
  }
  return down;
}

// A decode worker's speculative decoding: acceptance, and tokens/s per batch size and k.
void print_speculation(const dserve::v1::WorkerStatus& w) {
  std::printf("         speculation: acceptance length %.2f, %llu drafts, %llu accepted\n",
              w.acceptance_length(), static_cast<unsigned long long>(w.drafted_tokens()),
              static_cast<unsigned long long>(w.accepted_draft_tokens()));
  uint32_t shown_from = 0;
  for (const auto& speed : w.speculation_speed()) {
    if (speed.batch_from() != shown_from) {
      if (shown_from != 0) std::printf("\n");
      shown_from = speed.batch_from();
      const std::string to = speed.batch_to() == 0 ? "+" : "-" + std::to_string(speed.batch_to());
      std::printf("         tokens/s at batch %u%s:", speed.batch_from(),
                  speed.batch_to() == speed.batch_from() ? "" : to.c_str());
    }
    std::printf(" k=%u %.1f", speed.draft_tokens(), speed.tokens_per_second());
  }
  if (shown_from != 0) std::printf("\n");
}

}  // namespace

int run_status(const ClusterOptions& o) {
  auto opened = open_deployment(o);
  if (!opened.is_ok()) {
    print_error(opened.status().message());
    return opened.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  const Deployment& d = *opened;
  const auto* state = &d.state;
  const auto* m = &d.manifest;
  // Which process each worker address belongs to.
  std::map<std::string, const ProcessRecord*> by_address;
  for (const auto& r : state->processes) {
    for (const auto& [role, address] : cluster::worker_addresses(r.process))
      by_address[address] = &r;
  }
  std::printf("cluster %s (%s, launcher %s)\n", state->manifest_path.c_str(),
              std::string(cluster::serving_mode_name(m->mode)).c_str(),
              std::string(cluster::launcher_name(state->launcher)).c_str());
  if (state->launcher == cluster::Launcher::kSlurm) print_slurm_status(d);
  const int down = print_processes(d);
  auto client = connect_gateway(*m, *state, o);
  if (!client.is_ok()) {
    print_error(client.status().message());
    return 1;
  }
  auto st = (*client)->status();
  if (!st.is_ok()) {
    print_error(st.status().message());
    return 1;
  }
  std::printf("gateway %s:%u  model %s  %s\n", state->gateway()->process.host.c_str(),
              static_cast<unsigned>(state->gateway()->process.second_port), st->model().c_str(),
              st->accepting() ? "accepting" : "NOT accepting (shutting down)");
  std::printf(
      "requests  running %u  queued %u  admitted %llu  completed %llu  failed %llu  "
      "cancelled %llu  refused %llu  replays %llu\n",
      st->running(), st->queued(), static_cast<unsigned long long>(st->admitted()),
      static_cast<unsigned long long>(st->completed()),
      static_cast<unsigned long long>(st->failed()),
      static_cast<unsigned long long>(st->cancelled()),
      static_cast<unsigned long long>(st->refused()),
      static_cast<unsigned long long>(st->replays()));
  std::map<std::string, int> healthy, total;
  for (const auto& w : st->workers()) {
    ++total[w.role()];
    if (w.healthy() && !w.draining()) ++healthy[w.role()];
  }
  for (const auto& [role, n] : total)
    std::printf("pool %-8s %d workers, %d healthy\n", role.c_str(), n, healthy[role]);
  std::printf("%-8s %-14s %-21s %-9s %6s %6s %6s %9s %12s %12s %10s\n", "ROLE", "PROCESS",
              "ADDRESS", "STATE", "PLACED", "ACTIVE", "QUEUED", "Q.TOKENS", "KV.USED.MiB",
              "KV.BUDGET.MiB", "CACHE.MiB");
  for (const auto& w : st->workers()) {
    const auto it = by_address.find(w.address());
    const std::string name = it == by_address.end() ? "-" : it->second->process.name;
    const std::string state_word = w.draining() ? "draining" : (w.healthy() ? "healthy" : "DOWN");
    std::printf(
        "%-8s %-14s %-21s %-9s %6u %6u %6u %9llu %12s %12s %10s\n", w.role().c_str(), name.c_str(),
        w.address().c_str(), state_word.c_str(), w.placed(), w.active_requests(),
        w.queued_requests(), static_cast<unsigned long long>(w.queued_tokens()),
        mib(w.role() == "decode" ? w.kv_budget_bytes_in_use() : w.kv_page_bytes_in_use()).c_str(),
        w.role() == "decode" ? mib(w.kv_budget_bytes()).c_str() : "-",
        w.role() == "prefill" ? mib(w.cached_kv_bytes()).c_str() : "-");
    if (!w.healthy() && !w.last_error().empty())
      std::printf("         last error: %s\n", w.last_error().c_str());
    if (w.drafted_tokens() > 0 || w.speculation_speed_size() > 0) print_speculation(w);
  }
  return down == 0 ? 0 : 1;
}

int run_scale(const ClusterOptions& o) {
  const auto eq = o.scale.find('=');
  int64_t want = -1;
  std::string pool_name = o.scale.substr(0, eq == std::string::npos ? 0 : eq);
  if (eq != std::string::npos) {
    try {
      size_t used = 0;
      want = std::stoll(o.scale.substr(eq + 1), &used);
      if (used != o.scale.size() - eq - 1) want = -1;
    } catch (const std::exception&) {
    }
  }
  if (want < 1 || want > cluster::kMaxPoolReplicas || pool_name.empty()) {
    print_error("scale takes POOL=N with 1 <= N <= " + std::to_string(cluster::kMaxPoolReplicas) +
                " (e.g. decode=3), got '" + o.scale.substr(0, 64) + "'");
    return 2;
  }
  auto m = load_cluster_manifest(o);
  if (!m.is_ok()) {
    print_error(m.status().message());
    return 2;
  }
  const cluster::Pool* pool = nullptr;
  std::string pools;
  for (const auto& p : m->pools) {
    pools +=
        std::string(pools.empty() ? "" : ", ") + std::string(cluster::process_role_name(p.role));
    if (cluster::process_role_name(p.role) == pool_name) pool = &p;
  }
  if (!pool) {
    print_error("the manifest has no pool '" + pool_name + "' (it has " + pools + ")");
    return 2;
  }
  auto opened = open_deployment(o);
  if (!opened.is_ok()) {
    print_error(opened.status().message());
    return 1;
  }
  Deployment& d = *opened;
  if (!runs_under_agents(d.state)) {
    print_error("the cluster in " + d.dir +
                " runs without node agents (started by an older "
                "dserve): `dserve down` it and `dserve up` again to scale it");
    return 1;
  }
  auto client = connect_gateway(d.manifest, d.state, o);
  if (!client.is_ok()) {
    print_error(client.status().message());
    return 1;
  }
  const auto started = std::chrono::steady_clock::now();
  auto current = d.state.pool(pool->role);
  std::fprintf(stderr, "dserve: scale: pool %s from %zu to %lld workers\n", pool_name.c_str(),
               current.size(), static_cast<long long>(want));
  const milliseconds ready(d.manifest.timeouts.ready_ms);
  // Grow: into the plan, ready, then added to the gateway; one at a time so a failure leaves a
  // consistent pool.
  while (static_cast<int64_t>(current.size()) < want) {
    int64_t replica = 0;
    for (const ProcessRecord* r : current)
      replica = std::max(replica, r->process.replica + 1);
    Result<Process> p = internal_error("unset");
    if (d.manifest.launcher == cluster::Launcher::kSlurm) {
      p = slurm_extra_replica(d, *pool, replica);
    } else if (replica < pool->replicas) {
      const Process* listed =
          cluster::find_process(d.manifest, std::string(cluster::process_role_name(pool->role)) +
                                                "-" + std::to_string(replica));
      p = listed ? Result<Process>(*listed) : internal_error("no manifest process");
    } else {
      p = extra_replica(d.manifest, *pool, replica, d.state);
    }
    Status s = p.is_ok() ? add_to_plan(d, *p) : p.status();
    if (s.is_ok() && d.manifest.launcher == cluster::Launcher::kNodes) s = start_agents(d);
    if (s.is_ok()) s = d.publish();
    if (s.is_ok()) s = cluster::save_state(d.dir, d.state);
    if (s.is_ok()) s = d.wait_ready(*p, ready);
    for (const auto& [role, address] : cluster::worker_addresses(*p)) {
      if (!s.is_ok()) break;
      s = (*client)->add_worker(role, address, ready);
    }
    if (!s.is_ok()) {
      print_error("cannot add a worker to pool " + pool_name + ": " + s.message());
      if (p.is_ok()) {
        remove_from_plan(d, p->name);
        (void)d.publish();
        (void)cluster::save_state(d.dir, d.state);
      }
      return 1;
    }
    std::fprintf(stderr, "dserve: scale: %s added on %s:%u, node %s (%.1f s)\n", p->name.c_str(),
                 p->host.c_str(), static_cast<unsigned>(p->port), p->node.c_str(),
                 seconds_since(started));
    current = d.state.pool(pool->role);
  }
  // Shrink: the newest workers first; each drained at the gateway before it stops.
  while (static_cast<int64_t>(current.size()) > want) {
    const Process victim = current.back()->process;
    for (const auto& [role, address] : cluster::worker_addresses(victim)) {
      auto drained = (*client)->remove_worker(address, milliseconds(o.drain_timeout_ms));
      if (!drained.is_ok() && drained.status().code() != StatusCode::kNotFound) {
        print_error("cannot remove " + victim.name + " (" + address +
                    "): " + drained.status().message());
        return 1;
      }
      if (drained.is_ok()) {
        std::fprintf(stderr, "dserve: scale: %s %s drained (%u requests finished there)\n",
                     victim.name.c_str(), role.c_str(), *drained);
      }
    }
    remove_from_plan(d, victim.name);
    Status s = d.publish();
    if (s.is_ok()) s = cluster::save_state(d.dir, d.state);
    if (s.is_ok()) s = d.wait_gone(victim, milliseconds(o.stop_timeout_ms));
    if (!s.is_ok()) {
      print_error("stopping " + victim.name + ": " + s.message());
      return 1;
    }
    std::fprintf(stderr, "dserve: scale: %s stopped (%.1f s)\n", victim.name.c_str(),
                 seconds_since(started));
    current = d.state.pool(pool->role);
  }
  std::printf("dserve: pool %s has %zu workers\n", pool_name.c_str(), current.size());
  return 0;
}

}  // namespace dserve::cli
