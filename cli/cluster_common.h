#pragma once
// What `dserve up`, `status`, `scale` and `down` share: their options, the manifest and the
// gateway's client, and the Deployment: a running cluster's state, its plan (what the node
// agents run) and the agents' reports.

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "dserve/api/serving_client.h"
#include "dserve/cluster/launcher.h"
#include "dserve/cluster/manifest.h"
#include "dserve/cluster/node_agent.h"
#include "dserve/core/status.h"

namespace dserve::cli {

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

std::vector<std::string> ssh_words(const std::string& command);
std::string state_dir_of(const ClusterOptions& o);
std::string self_program();
double seconds_since(std::chrono::steady_clock::time_point t);

// The manifest, checked for what the commands need (an admin token when there is a token file;
// processes of launcher nodes on this machine or on a node with ssh).
Result<cluster::Manifest> load_cluster_manifest(const ClusterOptions& o);
// The gateway's gRPC client, with the manifest's admin token and TLS files.
Result<std::unique_ptr<api::ServingClient>> connect_gateway(const cluster::Manifest& m,
                                                            const cluster::ClusterState& state,
                                                            const ClusterOptions& o);
// The `dserve serve` command line of a process (the manifest's, logging JSON lines).
Result<std::vector<std::string>> launch_args(const cluster::Manifest& m, const cluster::Process& p);

// A running (or starting) cluster: its state, its plan and how its nodes are reached.
struct Deployment {
  ClusterOptions options;
  cluster::Manifest manifest;
  std::string dir;  // the state directory
  cluster::ClusterState state;
  cluster::ClusterPlan plan;
  // Every node the cluster has run on, and how its files are reached: the plan goes to each.
  std::map<std::string, cluster::NodeAccess> nodes;

  // Notes the node of a process or agent record.
  void note_node(const cluster::ProcessRecord& r);

  // The plan entry of process `p` (its command line, program and log files).
  Result<cluster::PlannedProcess> planned(const cluster::Process& p) const;
  // Writes the plan (its generation raised) where every agent reads it.
  Status publish();
  // How node `node`'s files are reached (this machine, or its agent's ssh).
  cluster::NodeAccess access(const std::string& node) const;
  // The agent report of `node`; kNotFound before its agent wrote one.
  Result<cluster::AgentReport> report(const std::string& node) const;
  // Waits until the agent of process `name` reports it ready; kUnavailable with the end of its
  // log when it dies first, its agent ends, or `timeout` passes.
  Status wait_ready(const cluster::Process& p, std::chrono::milliseconds timeout) const;
  // Waits until the agent of `p`'s node no longer runs it.
  Status wait_gone(const cluster::Process& p, std::chrono::milliseconds timeout) const;
  // The end of process `p`'s log, on its node.
  std::string log_tail(const cluster::Process& p) const;
};

// A replica beyond the manifest's (scale): its name ("decode-2"), role and replica index.
cluster::Process new_replica(cluster::ProcessRole role, int64_t replica);
// The ports the records use (control, second, metrics, HTTP): all of them, or those on `node`.
std::set<int64_t> ports_in_use(const std::vector<cluster::ProcessRecord>& records,
                               const std::string& node = "");
// Gives `p` the first control port from `from` up whose ports are all `usable`: the control
// port, the decode half's next to it when co-located, and the metrics port at +metrics_offset
// when that is not 0. kResourceExhausted when none is left below 65536.
Status assign_free_ports(cluster::Process& p, int64_t from, int64_t metrics_offset,
                         const std::function<bool(int64_t)>& usable);

// cluster_commands.cc: the steps up, scale and down share.
// Waits for every process of the plan to be ready (the gateway last) and for the gateway to
// see every worker healthy; prints the "cluster up" line. 0, or 1 after print_error.
int finish_up(Deployment& d, std::chrono::steady_clock::time_point started);
// Adds `p` to the state and the plan, or removes process `name` (neither publishes).
Status add_to_plan(Deployment& d, const cluster::Process& p);
void remove_from_plan(Deployment& d, const std::string& name);
// launcher nodes: starts the agent of every node that has a process and no agent yet.
Status start_agents(Deployment& d);
// Whether node agents run the cluster's processes (a state written by an older dserve has
// none: its processes were started directly).
bool runs_under_agents(const cluster::ClusterState& state);
// Notes the node of every process and agent of the state (Deployment::nodes).
void note_nodes(Deployment& d);
// The deployment of a cluster that is up (its manifest, state and plan).
Result<Deployment> open_deployment(const ClusterOptions& o);
// Stops what up started (the agents, or the Slurm job) and forgets the cluster.
void tear_down(Deployment& d);

// cluster_scale.cc
int run_status(const ClusterOptions& o);
int run_scale(const ClusterOptions& o);

// launcher slurm (cluster_slurm.cc): `up` submits the job and places the processes on its
// allocation; `down` ends the job; `status` prints the job and its steps.
int run_up_slurm(Deployment& d);
Status end_slurm_job(const Deployment& d);
void print_slurm_status(const Deployment& d);
// launcher slurm: the next replica of `pool` on the nodes of its component.
Result<cluster::Process> slurm_extra_replica(const Deployment& d, const cluster::Pool& pool,
                                             int64_t replica);

}  // namespace dserve::cli
