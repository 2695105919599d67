// `dserve up`, `dserve status`, `dserve scale` and `dserve down`: a cluster's life from its
// manifest.
//
//   up -f M      validates M, starts every worker it names (detached, logs in the state
//                directory), waits until each is ready, then the gateway, and waits until the
//                gateway reports itself healthy. Anything that fails stops what was started.
//   status       asks the gateway (gRPC Status) and prints pools, workers, load, queues, KV use.
//   scale P=N    starts or stops workers of pool P (prefill, decode or colocated) until it has
//                N: a new worker joins once ready (Admin.AddWorker); a removed one is drained
//                first (Admin.RemoveWorker: nothing new is placed on it, what it has finishes),
//                then stopped.
//   down         stops the gateway (which refuses new requests and lets the running ones
//                finish, up to its drain timeout), then the workers.
//
// The state directory (--state-dir, default from the manifest's path) holds state.json (what
// runs: pids, ports, command lines) and logs/<process>.{log,out}.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "commands.h"
#include "dserve/api/auth.h"
#include "dserve/api/serving_client.h"
#include "dserve/cluster/launcher.h"
#include "dserve/cluster/manifest.h"
#include "dserve/cluster/serve_args.h"

namespace dserve::cli {
namespace {

namespace fs = std::filesystem;
using cluster::ClusterState;
using cluster::Manifest;
using cluster::Process;
using cluster::ProcessRecord;
using cluster::ProcessRole;
using std::chrono::milliseconds;

struct ClusterOptions {
  std::string manifest;
  std::string state_dir;         // empty: cluster::default_state_dir(manifest)
  int64_t ready_timeout_ms = 0;  // 0: the manifest's timeouts.ready_ms
  int64_t stop_timeout_ms = 60000;
  int64_t drain_timeout_ms = 300000;
  std::string scale;                         // POOL=N
  std::string tls_ca, tls_cert, tls_key;     // override the manifest's security files
  std::string ssh = "ssh -o BatchMode=yes";  // how nodes with `ssh` are reached
};

// The --ssh command split into words (no quoting: options are plain words).
std::vector<std::string> ssh_words(const std::string& command) {
  std::vector<std::string> words;
  std::istringstream in(command);
  for (std::string w; in >> w;)
    words.push_back(w);
  return words;
}

std::string state_dir_of(const ClusterOptions& o) {
  return o.state_dir.empty() ? cluster::default_state_dir(o.manifest) : o.state_dir;
}

std::string self_program() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("dserve") : self.string();
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The token the operator commands send: the first admin token of the manifest's token file
// (pool changes need one); empty without a token file.
Result<std::string> operator_token(const Manifest& m) {
  if (!m.security || !m.security->token_file) return std::string();
  auto tokens = api::load_token_file(*m.security->token_file);
  if (!tokens.is_ok()) return tokens.status();
  const auto admin = std::find_if(tokens->begin(), tokens->end(),
                                  [](const auto& t) { return t.role == api::ClientRole::kAdmin; });
  if (admin == tokens->end()) {
    return invalid_argument("the token file " + *m.security->token_file +
                            " has no admin token, which up, status, scale and down need: give "
                            "one line the role admin (`NAME TOKEN admin`)");
  }
  return admin->token;
}

// How the operator commands reach the gateway: its gRPC address, with operator_token() and the
// manifest's TLS files.
Result<std::unique_ptr<api::ServingClient>> connect_gateway(const Manifest& m,
                                                            const ClusterState& state,
                                                            const ClusterOptions& o) {
  const ProcessRecord* gw = state.gateway();
  if (!gw) return not_found("the cluster state has no gateway");
  api::ClientOptions copts;
  DSERVE_ASSIGN_OR_RETURN(copts.token, operator_token(m));
  if (m.security) {
    if (m.security->tls_cert) {
      // The gateway's own certificate is the root to trust when no CA is given (self-signed);
      // under mutual TLS the operator presents the gateway's certificate too.
      copts.tls_ca = m.security->tls_ca.value_or(*m.security->tls_cert);
      if (m.security->tls_ca) {
        copts.tls_cert = *m.security->tls_cert;
        copts.tls_key = m.security->tls_key.value_or("");
      }
    }
  }
  if (!o.tls_ca.empty()) copts.tls_ca = o.tls_ca;
  if (!o.tls_cert.empty()) copts.tls_cert = o.tls_cert;
  if (!o.tls_key.empty()) copts.tls_key = o.tls_key;
  const std::string address = gw->process.host + ":" + std::to_string(gw->process.second_port);
  return api::ServingClient::connect(address, milliseconds(10000), copts);
}

// The command line `up` and `scale` start a process with: the manifest's, logging JSON lines.
Result<std::vector<std::string>> launch_args(const Manifest& m, const Process& p) {
  auto args = cluster::to_serve_args(m, p);
  if (args.is_ok()) args->insert(args->end(), {"--log-format", "json"});
  return args;
}

// Stops every running process of `records`, in order, printing how each ended.
void stop_all(const std::vector<ProcessRecord>& records, milliseconds timeout) {
  for (const ProcessRecord& r : records) {
    const std::string how = cluster::stop_process(r, timeout);
    std::fprintf(stderr, "dserve: %s (pid %d) %s\n", r.process.name.c_str(), r.pid, how.c_str());
  }
}

Result<Manifest> load(const ClusterOptions& o) {
  auto m = cluster::load_manifest(o.manifest);
  if (!m.is_ok()) return m.status();
  // Checked before anything starts: without an admin token the commands cannot manage the pools.
  if (auto token = operator_token(*m); !token.is_ok()) return token.status();
  for (const Process& p : m->processes) {
    if (p.ssh.empty() && !cluster::is_local_host(p.host)) {
      return invalid_argument(o.manifest + ": " + p.name + " runs on node '" + p.node + "' (" +
                              p.host +
                              "), which is not this machine, and the node has no `ssh` "
                              "destination to start it through");
    }
  }
  return m;
}

int run_up(const ClusterOptions& o) {
  auto m = load(o);
  if (!m.is_ok()) {
    print_error(m.status().message());
    return 2;
  }
  const std::string dir = state_dir_of(o);
  if (auto old = cluster::load_state(dir); old.is_ok()) {
    std::string running;
    for (const auto& r : old->processes) {
      if (cluster::is_running(r))
        running += " " + r.process.name + " (pid " + std::to_string(r.pid) + ")";
    }
    if (!running.empty()) {
      print_error("the cluster of " + o.manifest + " is already up:" + running +
                  "; `dserve down -f " + o.manifest + "` stops it");
      return 1;
    }
  }
  // Every command line first: a manifest this build cannot honour starts nothing.
  std::vector<std::pair<const Process*, std::vector<std::string>>> plan;
  for (const Process& p : m->processes) {
    auto args = launch_args(*m, p);
    if (!args.is_ok()) {
      print_error(args.status().message());
      return 2;
    }
    plan.emplace_back(&p, std::move(args).value());
  }
  ClusterState state;
  state.manifest_path = fs::absolute(o.manifest).string();
  cluster::LaunchOptions lopts;
  lopts.program = self_program();
  lopts.state_dir = dir;
  lopts.ssh_command = ssh_words(o.ssh);
  const milliseconds ready(o.ready_timeout_ms > 0 ? o.ready_timeout_ms : m->timeouts.ready_ms);
  const auto started = std::chrono::steady_clock::now();
  std::fprintf(stderr, "dserve: up: %zu processes from %s (state and logs in %s)\n", plan.size(),
               o.manifest.c_str(), dir.c_str());

  auto fail = [&](const std::string& message) {
    print_error(message);
    std::fprintf(stderr, "dserve: up failed; stopping what was started\n");
    std::vector<ProcessRecord> reverse(state.processes.rbegin(), state.processes.rend());
    stop_all(reverse, milliseconds(o.stop_timeout_ms));
    (void)cluster::remove_state(dir);
    return 1;
  };
  // Workers first, all at once (each loads the model), then the gateway that names them.
  for (bool gateway_pass : {false, true}) {
    size_t first = state.processes.size();
    for (auto& [p, args] : plan) {
      if ((p->role == ProcessRole::kGateway) != gateway_pass) continue;
      auto record = cluster::start_process(*p, args, lopts);
      if (!record.is_ok()) return fail(record.status().message());
      state.processes.push_back(std::move(record).value());
      if (Status s = cluster::save_state(dir, state); !s.is_ok()) return fail(s.message());
    }
    for (size_t i = first; i < state.processes.size(); ++i) {
      const ProcessRecord& r = state.processes[i];
      if (Status s = cluster::wait_ready(
              r, ready - milliseconds(static_cast<int64_t>(seconds_since(started) * 1000)));
          !s.is_ok()) {
        return fail(s.message());
      }
      std::fprintf(stderr, "dserve: up: %-12s ready on %s:%u (pid %d, %.1f s)\n",
                   r.process.name.c_str(), r.process.host.c_str(),
                   static_cast<unsigned>(r.process.port), r.pid, seconds_since(started));
    }
  }
  // The gateway printed its line once a worker of each role was healthy; up waits for all.
  auto client = connect_gateway(*m, state, o);
  if (!client.is_ok()) return fail(client.status().message());
  size_t expected = 0;
  for (const auto& r : state.processes)
    expected += cluster::worker_addresses(r.process).size();
  for (;;) {
    auto st = (*client)->status();
    size_t healthy = 0;
    std::string missing;
    if (st.is_ok()) {
      for (const auto& w : st->workers()) {
        if (w.healthy()) {
          ++healthy;
        } else {
          missing += " " + w.address();
        }
      }
    }
    if (st.is_ok() && healthy == expected) break;
    if (seconds_since(started) * 1000 > static_cast<double>(ready.count())) {
      return fail("the gateway does not see every worker healthy after " +
                  std::to_string(ready.count()) + " ms;" +
                  (st.is_ok() ? " not healthy:" + missing : " " + st.status().message()));
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
  const ProcessRecord* gw = state.gateway();
  std::printf("dserve: cluster up: %zu processes in %.1f s; gateway grpc %s:%u", plan.size(),
              seconds_since(started), gw->process.host.c_str(),
              static_cast<unsigned>(gw->process.second_port));
  if (gw->process.http_port)
    std::printf(" http %s:%u", gw->process.host.c_str(),
                static_cast<unsigned>(gw->process.http_port));
  std::printf("\n");
  std::fflush(stdout);
  return 0;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

int run_status(const ClusterOptions& o) {
  auto m = cluster::load_manifest(o.manifest);
  if (!m.is_ok()) {
    print_error(m.status().message());
    return 2;
  }
  auto state = cluster::load_state(state_dir_of(o));
  if (!state.is_ok()) {
    print_error(state.status().message());
    return 1;
  }
  // Which process each worker address belongs to.
  std::map<std::string, const ProcessRecord*> by_address;
  for (const auto& r : state->processes) {
    for (const auto& [role, address] : cluster::worker_addresses(r.process))
      by_address[address] = &r;
  }
  std::printf("cluster %s (%s)\n", state->manifest_path.c_str(),
              std::string(cluster::serving_mode_name(m->mode)).c_str());
  int down = 0;
  for (const auto& r : state->processes) {
    if (!cluster::is_running(r)) {
      std::printf("  process %s (pid %d) is not running; its log: %s\n", r.process.name.c_str(),
                  r.pid, r.log_path.c_str());
      ++down;
    }
  }
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
  }
  return down == 0 ? 0 : 1;
}

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
  Process p;
  p.role = pool.role;
  p.replica = replica;
  p.name = std::string(cluster::process_role_name(pool.role)) + "-" + std::to_string(replica);
  p.node = pool.placement[static_cast<size_t>(replica) % pool.placement.size()];
  const cluster::Node* node = nullptr;
  for (const auto& n : m.nodes) {
    if (n.name == p.node) node = &n;
  }
  if (!node) return internal_error("pool placement names unknown node " + p.node);
  p.host = node->address;
  p.ssh = node->ssh.value_or("");
  p.program = node->program.value_or("");
  // Devices: those the node's running processes do not use.
  std::set<int64_t> used;
  std::set<int64_t> ports;
  for (const auto& r : state.processes) {
    if (r.process.node != p.node) continue;
    used.insert(r.process.devices.begin(), r.process.devices.end());
    for (uint16_t port :
         {r.process.port, r.process.second_port, r.process.metrics_port, r.process.http_port}) {
      if (port) ports.insert(port);
    }
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
  const int64_t offset = m.network.metrics_port_offset;
  const bool two = pool.role == ProcessRole::kColocated;
  int64_t port = ports.empty() ? node->base_port.value_or(20000) : *ports.rbegin() + 1;
  for (; port + (two ? 1 : 0) + offset <= 65535; ++port) {
    std::vector<int64_t> want = {port};
    if (two) want.push_back(port + 1);
    if (offset > 0) want.push_back(port + offset);
    const bool ok = std::all_of(want.begin(), want.end(), [&](int64_t x) {
      // Another machine's ports cannot be probed from here: the state's record decides.
      return !ports.count(static_cast<uint16_t>(x)) &&
             (!p.ssh.empty() || port_free(p.host, static_cast<uint16_t>(x)));
    });
    if (!ok) continue;
    p.port = static_cast<uint16_t>(port);
    if (two) p.second_port = static_cast<uint16_t>(port + 1);
    if (offset > 0) p.metrics_port = static_cast<uint16_t>(port + offset);
    return p;
  }
  return resource_exhausted("no free port left on node '" + p.node + "' for " + p.name);
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
  auto m = load(o);
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
  const std::string dir = state_dir_of(o);
  auto state = cluster::load_state(dir);
  if (!state.is_ok()) {
    print_error(state.status().message());
    return 1;
  }
  auto client = connect_gateway(*m, *state, o);
  if (!client.is_ok()) {
    print_error(client.status().message());
    return 1;
  }
  const auto started = std::chrono::steady_clock::now();
  auto current = state->pool(pool->role);
  std::fprintf(stderr, "dserve: scale: pool %s from %zu to %lld workers\n", pool_name.c_str(),
               current.size(), static_cast<long long>(want));
  cluster::LaunchOptions lopts;
  lopts.program = self_program();
  lopts.state_dir = dir;
  lopts.ssh_command = ssh_words(o.ssh);
  // Grow: start, wait ready, add to the gateway; one at a time so a failure leaves a
  // consistent pool.
  while (static_cast<int64_t>(current.size()) < want) {
    int64_t replica = 0;
    for (const ProcessRecord* r : current)
      replica = std::max(replica, r->process.replica + 1);
    Result<Process> p = internal_error("unset");
    if (replica < pool->replicas) {
      const Process* listed = cluster::find_process(
          *m, std::string(cluster::process_role_name(pool->role)) + "-" + std::to_string(replica));
      p = listed ? Result<Process>(*listed) : internal_error("no manifest process");
    } else {
      p = extra_replica(*m, *pool, replica, *state);
    }
    if (!p.is_ok()) {
      print_error("cannot add a worker to pool " + pool_name + ": " + p.status().message());
      return 1;
    }
    auto args = launch_args(*m, *p);
    if (!args.is_ok()) {
      print_error(args.status().message());
      return 2;
    }
    auto record = cluster::start_process(*p, *args, lopts);
    if (!record.is_ok()) {
      print_error(record.status().message());
      return 1;
    }
    state->processes.push_back(*record);
    if (Status s = cluster::save_state(dir, *state); !s.is_ok()) {
      print_error(s.message());
      return 1;
    }
    Status s = cluster::wait_ready(*record, milliseconds(m->timeouts.ready_ms));
    for (const auto& [role, address] : cluster::worker_addresses(record->process)) {
      if (!s.is_ok()) break;
      s = (*client)->add_worker(role, address, milliseconds(m->timeouts.ready_ms));
    }
    if (!s.is_ok()) {
      print_error("cannot add " + record->process.name + ": " + s.message());
      cluster::stop_process(*record, milliseconds(o.stop_timeout_ms));
      state->processes.pop_back();
      (void)cluster::save_state(dir, *state);
      return 1;
    }
    std::fprintf(stderr, "dserve: scale: %s added on %s:%u (%.1f s)\n",
                 record->process.name.c_str(), record->process.host.c_str(),
                 static_cast<unsigned>(record->process.port), seconds_since(started));
    current = state->pool(pool->role);
  }
  // Shrink: the newest workers first; each drained at the gateway before it stops.
  while (static_cast<int64_t>(current.size()) > want) {
    const ProcessRecord victim = *current.back();
    for (const auto& [role, address] : cluster::worker_addresses(victim.process)) {
      auto drained = (*client)->remove_worker(address, milliseconds(o.drain_timeout_ms));
      if (!drained.is_ok() && drained.status().code() != StatusCode::kNotFound) {
        print_error("cannot remove " + victim.process.name + " (" + address +
                    "): " + drained.status().message());
        return 1;
      }
      if (drained.is_ok()) {
        std::fprintf(stderr, "dserve: scale: %s %s drained (%u requests finished there)\n",
                     victim.process.name.c_str(), role.c_str(), *drained);
      }
    }
    const std::string how = cluster::stop_process(victim, milliseconds(o.stop_timeout_ms));
    std::fprintf(stderr, "dserve: scale: %s (pid %d) %s (%.1f s)\n", victim.process.name.c_str(),
                 victim.pid, how.c_str(), seconds_since(started));
    std::erase_if(state->processes,
                  [&](const ProcessRecord& r) { return r.process.name == victim.process.name; });
    if (Status s = cluster::save_state(dir, *state); !s.is_ok()) {
      print_error(s.message());
      return 1;
    }
    current = state->pool(pool->role);
  }
  std::printf("dserve: pool %s has %zu workers\n", pool_name.c_str(), current.size());
  return 0;
}

int run_down(const ClusterOptions& o) {
  const std::string dir = state_dir_of(o);
  auto state = cluster::load_state(dir);
  if (!state.is_ok()) {
    print_error(state.status().message());
    return 1;
  }
  const auto started = std::chrono::steady_clock::now();
  // The gateway first: it refuses new requests and lets the running ones finish on the
  // workers, which must still be up for that.
  std::vector<ProcessRecord> order;
  if (const ProcessRecord* gw = state->gateway()) order.push_back(*gw);
  for (const auto& r : state->processes) {
    if (r.process.role != ProcessRole::kGateway) order.push_back(r);
  }
  stop_all(order, milliseconds(o.stop_timeout_ms));
  if (Status s = cluster::remove_state(dir); !s.is_ok()) {
    print_error(s.message());
    return 1;
  }
  std::printf("dserve: cluster down: %zu processes stopped in %.1f s (logs in %s/logs)\n",
              order.size(), seconds_since(started), dir.c_str());
  return 0;
}

void add_common(CLI::App* cmd, ClusterOptions& o) {
  cmd->add_option("-f,--file", o.manifest, "the cluster manifest (YAML)")->required();
  cmd->add_option("--state-dir", o.state_dir,
                  "where the cluster's state and logs are kept (default: "
                  "/var/tmp/dserve/<manifest name>-<hash of its path>)");
  cmd->add_option("--tls-ca", o.tls_ca,
                  "CA of the gateway's certificate (default: the manifest's security.tls_ca, "
                  "else its tls_cert)");
  cmd->add_option("--tls-cert", o.tls_cert, "client certificate for mutual TLS");
  cmd->add_option("--tls-key", o.tls_key, "its key");
}

}  // namespace

ClusterCommands add_cluster_commands(CLI::App& app) {
  auto o = std::make_shared<ClusterOptions>();
  ClusterCommands out;

  CLI::App* up = app.add_subcommand("up", "start the cluster a manifest describes");
  add_common(up, *o);
  up->add_option("--ssh", o->ssh,
                 "the command that reaches nodes with an `ssh` destination (options; the "
                 "destination is appended); recorded, so that scale and down use it too")
      ->capture_default_str();
  up->add_option("--ready-timeout-ms", o->ready_timeout_ms,
                 "how long every process may take to be ready (default: the manifest's "
                 "timeouts.ready_ms)");
  up->add_option("--stop-timeout-ms", o->stop_timeout_ms,
                 "on failure: how long a started process may take to stop before SIGKILL")
      ->capture_default_str();
  out.up = [o] { return run_up(*o); };

  CLI::App* status = app.add_subcommand("status", "pools, workers, load, queues and KV use");
  add_common(status, *o);
  out.status = [o] { return run_status(*o); };

  CLI::App* scale = app.add_subcommand("scale", "grow or shrink one pool while traffic flows");
  add_common(scale, *o);
  scale->add_option("pool", o->scale, "POOL=N: prefill=N, decode=N or colocated=N (N >= 1)")
      ->required();
  scale->add_option("--ssh", o->ssh, "as for up: how new workers' nodes are reached")
      ->capture_default_str();
  scale
      ->add_option("--drain-timeout-ms", o->drain_timeout_ms,
                   "how long a removed worker may take to finish its requests")
      ->capture_default_str();
  scale
      ->add_option("--stop-timeout-ms", o->stop_timeout_ms,
                   "how long a drained worker may take to exit before SIGKILL")
      ->capture_default_str();
  out.scale = [o] { return run_scale(*o); };

  CLI::App* down = app.add_subcommand("down", "stop the cluster gracefully");
  add_common(down, *o);
  down->add_option("--stop-timeout-ms", o->stop_timeout_ms,
                   "how long each process may take to exit (the gateway: to drain) before "
                   "SIGKILL")
      ->capture_default_str();
  out.down = [o] { return run_down(*o); };
  return out;
}

}  // namespace dserve::cli
