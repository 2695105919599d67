#include "cluster_common.h"

#include <algorithm>
#include <filesystem>
#include <sstream>
#include <thread>

#include "dserve/api/auth.h"
#include "dserve/cluster/serve_args.h"

namespace dserve::cli {

namespace fs = std::filesystem;
using cluster::ClusterState;
using cluster::Manifest;
using cluster::Process;
using cluster::ProcessRecord;
using std::chrono::milliseconds;

std::vector<std::string> ssh_words(const std::string& command) {
  // No quoting: options are plain words.
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

namespace {

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

}  // namespace

Result<Manifest> load_cluster_manifest(const ClusterOptions& o) {
  auto m = cluster::load_manifest(o.manifest);
  if (!m.is_ok()) return m.status();
  // Checked before anything starts: without an admin token the commands cannot manage the pools.
  if (auto token = operator_token(*m); !token.is_ok()) return token.status();
  if (m->launcher == cluster::Launcher::kSlurm) return m;
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

Result<std::unique_ptr<api::ServingClient>> connect_gateway(const Manifest& m,
                                                            const ClusterState& state,
                                                            const ClusterOptions& o) {
  const ProcessRecord* gw = state.gateway();
  if (!gw) return not_found("the cluster state has no gateway");
  api::ClientOptions copts;
  DSERVE_ASSIGN_OR_RETURN(copts.token, operator_token(m));
  if (m.security && m.security->tls_cert) {
    // The gateway's own certificate is the root to trust when no CA is given (self-signed);
    // under mutual TLS the operator presents the gateway's certificate too.
    copts.tls_ca = m.security->tls_ca.value_or(*m.security->tls_cert);
    if (m.security->tls_ca) {
      copts.tls_cert = *m.security->tls_cert;
      copts.tls_key = m.security->tls_key.value_or("");
    }
  }
  if (!o.tls_ca.empty()) copts.tls_ca = o.tls_ca;
  if (!o.tls_cert.empty()) copts.tls_cert = o.tls_cert;
  if (!o.tls_key.empty()) copts.tls_key = o.tls_key;
  const std::string address = gw->process.host + ":" + std::to_string(gw->process.second_port);
  return api::ServingClient::connect(address, milliseconds(10000), copts);
}

Result<std::vector<std::string>> launch_args(const Manifest& m, const Process& p) {
  auto args = cluster::to_serve_args(m, p);
  if (args.is_ok()) args->insert(args->end(), {"--log-format", "json"});
  return args;
}

Process new_replica(cluster::ProcessRole role, int64_t replica) {
  Process p;
  p.role = role;
  p.replica = replica;
  p.name = std::string(cluster::process_role_name(role)) + "-" + std::to_string(replica);
  return p;
}

std::set<int64_t> ports_in_use(const std::vector<ProcessRecord>& records, const std::string& node) {
  std::set<int64_t> ports;
  for (const auto& r : records) {
    if (!node.empty() && r.process.node != node) continue;
    for (uint16_t port :
         {r.process.port, r.process.second_port, r.process.metrics_port, r.process.http_port}) {
      if (port) ports.insert(port);
    }
  }
  return ports;
}

Status assign_free_ports(Process& p, int64_t from, int64_t metrics_offset,
                         const std::function<bool(int64_t)>& usable) {
  const bool two = p.role == cluster::ProcessRole::kColocated;
  for (int64_t port = from; port + (two ? 1 : 0) + metrics_offset <= 65535; ++port) {
    std::vector<int64_t> want = {port};
    if (two) want.push_back(port + 1);
    if (metrics_offset > 0) want.push_back(port + metrics_offset);
    if (!std::all_of(want.begin(), want.end(), usable)) continue;
    p.port = static_cast<uint16_t>(port);
    if (two) p.second_port = static_cast<uint16_t>(port + 1);
    if (metrics_offset > 0) p.metrics_port = static_cast<uint16_t>(port + metrics_offset);
    return Status::ok();
  }
  return resource_exhausted("no free port left on node '" + p.node + "' for " + p.name);
}

Result<cluster::PlannedProcess> Deployment::planned(const Process& p) const {
  cluster::PlannedProcess out;
  out.process = p;
  DSERVE_ASSIGN_OR_RETURN(out.args, launch_args(manifest, p));
  out.program =
      !p.program.empty() ? p.program
      : (manifest.launcher == cluster::Launcher::kSlurm && !manifest.slurm.program.empty())
          ? manifest.slurm.program
          : self_program();
  const fs::path logs = fs::path(dir) / "logs";
  out.log_path = (logs / (p.name + ".log")).string();
  out.out_path = (logs / (p.name + ".out")).string();
  return out;
}

void Deployment::note_node(const ProcessRecord& r) {
  nodes[r.process.node] = cluster::access_of(r);
}

Status Deployment::publish() {
  ++plan.generation;
  plan.supervision = manifest.supervision;
  plan.slurm_job = state.slurm_job;
  const std::string text = cluster::plan_to_json(plan);
  const std::string path = dir + "/plan.json";
  // Under Slurm the state directory is shared; otherwise each node reached over ssh has its
  // own copy, and the nodes of this machine share one.
  bool local_written = false;
  if (manifest.launcher == cluster::Launcher::kSlurm || nodes.empty()) {
    return cluster::write_node_file({}, path, text);
  }
  for (const auto& [node, at] : nodes) {
    if (at.ssh.empty() && local_written) continue;
    DSERVE_RETURN_IF_ERROR(cluster::write_node_file(at, path, text));
    if (at.ssh.empty()) local_written = true;
  }
  return Status::ok();
}

cluster::NodeAccess Deployment::access(const std::string& node) const {
  const auto it = nodes.find(node);
  return it == nodes.end() ? cluster::NodeAccess{} : it->second;
}

Result<cluster::AgentReport> Deployment::report(const std::string& node) const {
  DSERVE_ASSIGN_OR_RETURN(const std::string text,
                          cluster::read_node_file(access(node), cluster::report_path(dir, node)));
  return cluster::report_from_json(text);
}

std::string Deployment::log_tail(const Process& p) const {
  ProcessRecord r;
  r.process = p;
  const cluster::NodeAccess at = access(p.node);
  r.process.ssh = at.ssh;
  r.ssh_command = at.ssh_command;
  r.log_path = dir + "/logs/" + p.name + ".log";
  return cluster::tail_of(r);
}

Status Deployment::wait_ready(const Process& p, milliseconds timeout) const {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto rep = report(p.node);
    // A report of an older plan (an agent that has not read this one yet, or one left by an
    // earlier cluster) says nothing of this process.
    if (rep.is_ok() && rep->plan_generation < plan.generation) {
      rep = unavailable("its report is of an older plan (generation " +
                        std::to_string(rep->plan_generation) + ", published " +
                        std::to_string(plan.generation) + ")");
    }
    if (rep.is_ok()) {
      for (const cluster::WorkerReport& w : rep->workers) {
        if (w.name != p.name) continue;
        if (w.state == "ready") return Status::ok();
        if (!w.last_exit.empty()) {
          return unavailable(p.name + " " + w.last_exit + " before it was ready; the end of " +
                             dir + "/logs/" + p.name + ".log:\n" + log_tail(p));
        }
      }
      if (rep->ended) {
        return unavailable("the agent of node '" + p.node + "' ended (" + rep->end_reason +
                           ") before " + p.name + " was ready");
      }
    }
    if (std::chrono::steady_clock::now() >= until) {
      return unavailable(p.name + " was not ready after " + std::to_string(timeout.count()) +
                         " ms" +
                         (rep.is_ok() ? ""
                                      : " (no report from the agent of node '" + p.node +
                                            "': " + rep.status().message() + ")") +
                         "; the end of its log:\n" + log_tail(p));
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
}

Status Deployment::wait_gone(const Process& p, milliseconds timeout) const {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto rep = report(p.node);
    if (rep.is_ok() && rep->plan_generation >= plan.generation &&
        std::none_of(rep->workers.begin(), rep->workers.end(),
                     [&](const cluster::WorkerReport& w) { return w.name == p.name; })) {
      return Status::ok();
    }
    if (rep.is_ok() && rep->ended) return Status::ok();
    // An agent that is gone (killed) took its processes with it.
    for (const ProcessRecord& a : state.agents) {
      if (a.process.node == p.node && !cluster::is_running(a)) return Status::ok();
    }
    if (std::chrono::steady_clock::now() >= until) {
      return unavailable("the agent of node '" + p.node + "' still runs " + p.name + " after " +
                         std::to_string(timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
}

}  // namespace dserve::cli
