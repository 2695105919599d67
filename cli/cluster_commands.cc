// `dserve up`, `dserve status`, `dserve scale`, `dserve down` and `dserve agent`: a cluster's
// life from its manifest.
//
//   up -f M      validates M and writes the cluster plan (every process with its command line
//                and node). launcher nodes: starts one node agent per node (here, or over ssh,
//                detached); launcher slurm: submits the job whose steps start the agents, then
//                places each process on the allocated nodes. The agents start the processes;
//                up waits until each is ready and the gateway sees every worker healthy.
//                Anything that fails stops what was started (the job is cancelled).
//   status       the gateway's view (gRPC Status): pools, workers, load, queues, KV use; the
//                agents' view of each process (restarts, last exit); the Slurm job and steps.
//   scale P=N    adds processes to the plan (an agent starts each; it joins the gateway once
//                ready: Admin.AddWorker) or removes them (drained first: Admin.RemoveWorker).
//   down         stops the gateway (it refuses new requests and lets the running ones finish),
//                then the agents, which stop their workers (launcher slurm: ends the job).
//   agent        the node agent (cluster/node_agent.h), started by up or by the Slurm job.
//
// The state directory (--state-dir, default from the manifest's path) holds state.json (what
// runs where), plan.json (what the agents run), agents/<node>.json (their reports) and
// logs/<process>.{log,out}. Under Slurm it must be on a file system every node shares.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "cluster_common.h"
#include "commands.h"
#include "dserve/cluster/serve_args.h"
#include "dserve/cluster/slurm_job.h"

namespace dserve::cli {
namespace {

namespace fs = std::filesystem;
using cluster::ClusterState;
using cluster::Manifest;
using cluster::Process;
using cluster::ProcessRecord;
using cluster::ProcessRole;
using std::chrono::milliseconds;

// Stops every running process of `records`, in order, printing how each ended.
void stop_all(const std::vector<ProcessRecord>& records, milliseconds timeout) {
  for (const ProcessRecord& r : records) {
    const std::string how = cluster::stop_process(r, timeout);
    std::fprintf(stderr, "dserve: %s (pid %d) %s\n", r.process.name.c_str(), r.pid, how.c_str());
  }
}

}  // namespace

Status start_agents(Deployment& d) {
  std::set<std::string> have;
  for (const auto& a : d.state.agents)
    have.insert(a.process.node);
  cluster::LaunchOptions lopts;
  lopts.program = self_program();
  lopts.state_dir = d.dir;
  lopts.ssh_command = ssh_words(d.options.ssh);
  for (const Process& p : d.manifest.processes) {
    if (have.count(p.node) || p.agent_by_systemd) continue;
    Process agent;
    agent.name = "agent-" + p.node;
    agent.role = ProcessRole::kNodeAgent;
    agent.node = p.node;
    agent.host = p.host;
    agent.ssh = p.ssh;
    agent.program = p.program;
    auto record = cluster::start_process(
        agent, {"agent", "--state-dir", d.dir, "--node", p.node, "--plan-wait-ms", "60000"}, lopts);
    if (!record.is_ok()) return record.status();
    d.state.agents.push_back(std::move(record).value());
    d.note_node(d.state.agents.back());
    have.insert(p.node);
    DSERVE_RETURN_IF_ERROR(cluster::save_state(d.dir, d.state));
  }
  return Status::ok();
}

namespace {

// The pid each agent reports for the state's processes (their first run).
void record_pids(Deployment& d) {
  std::map<std::string, cluster::AgentReport> reports;
  for (auto& r : d.state.processes) {
    if (!reports.count(r.process.node)) {
      auto rep = d.report(r.process.node);
      if (!rep.is_ok()) continue;
      reports[r.process.node] = std::move(rep).value();
    }
    for (const auto& w : reports[r.process.node].workers) {
      if (w.name == r.process.name && w.pid > 0) {
        r.pid = w.pid;
        r.start_ticks = w.start_ticks;
      }
    }
  }
}

// Waits until the gateway reports every worker of the state healthy.
Status wait_gateway_sees_all(const Deployment& d, std::chrono::steady_clock::time_point started,
                             milliseconds ready) {
  auto client = connect_gateway(d.manifest, d.state, d.options);
  if (!client.is_ok()) return client.status();
  size_t expected = 0;
  for (const auto& r : d.state.processes)
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
    if (st.is_ok() && healthy == expected) return Status::ok();
    if (seconds_since(started) * 1000 > static_cast<double>(ready.count())) {
      return unavailable("the gateway does not see every worker healthy after " +
                         std::to_string(ready.count()) + " ms;" +
                         (st.is_ok() ? " not healthy:" + missing : " " + st.status().message()));
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
}

}  // namespace

// Shared with cluster_slurm.cc: waits for every process of the plan, the gateway last, then
// for the gateway's view; prints the "cluster up" line. 0, or 1 after print_error.
int finish_up(Deployment& d, std::chrono::steady_clock::time_point started) {
  const milliseconds ready(d.options.ready_timeout_ms > 0 ? d.options.ready_timeout_ms
                                                          : d.manifest.timeouts.ready_ms);
  for (bool gateway_pass : {false, true}) {
    for (const auto& r : d.state.processes) {
      if ((r.process.role == ProcessRole::kGateway) != gateway_pass) continue;
      const milliseconds left =
          ready - milliseconds(static_cast<int64_t>(seconds_since(started) * 1000));
      if (Status s = d.wait_ready(r.process, std::max(left, milliseconds(1))); !s.is_ok()) {
        print_error(s.message());
        return 1;
      }
      std::fprintf(stderr, "dserve: up: %-12s ready on %s:%u (node %s, %.1f s)\n",
                   r.process.name.c_str(), r.process.host.c_str(),
                   static_cast<unsigned>(r.process.port), r.process.node.c_str(),
                   seconds_since(started));
    }
  }
  record_pids(d);
  (void)cluster::save_state(d.dir, d.state);
  if (Status s = wait_gateway_sees_all(d, started, ready); !s.is_ok()) {
    print_error(s.message());
    return 1;
  }
  const ProcessRecord* gw = d.state.gateway();
  std::printf("dserve: cluster up: %zu processes in %.1f s; gateway grpc %s:%u",
              d.state.processes.size(), seconds_since(started), gw->process.host.c_str(),
              static_cast<unsigned>(gw->process.second_port));
  if (gw->process.http_port) {
    std::printf(" http %s:%u", gw->process.host.c_str(),
                static_cast<unsigned>(gw->process.http_port));
  }
  if (!d.state.slurm_job.empty()) std::printf(" slurm job %s", d.state.slurm_job.c_str());
  std::printf("\n");
  std::fflush(stdout);
  return 0;
}

// Adds `p` to the state and the plan (not yet published).
Status add_to_plan(Deployment& d, const Process& p) {
  DSERVE_ASSIGN_OR_RETURN(cluster::PlannedProcess planned, d.planned(p));
  ProcessRecord r;
  r.process = p;
  r.args = planned.args;
  r.log_path = planned.log_path;
  r.out_path = planned.out_path;
  if (!p.ssh.empty()) r.ssh_command = ssh_words(d.options.ssh);
  // A node whose agent up starts is reached the way that agent was; others as its processes.
  if (!d.nodes.count(p.node) || d.nodes[p.node].ssh.empty()) d.note_node(r);
  d.state.processes.push_back(std::move(r));
  d.plan.processes.push_back(std::move(planned));
  return Status::ok();
}

// Removes process `name` from the plan and the state (not yet published).
void remove_from_plan(Deployment& d, const std::string& name) {
  std::erase_if(d.plan.processes,
                [&](const cluster::PlannedProcess& p) { return p.process.name == name; });
  std::erase_if(d.state.processes, [&](const ProcessRecord& r) { return r.process.name == name; });
}

bool runs_under_agents(const ClusterState& state) {
  return !state.agents.empty() || state.launcher == cluster::Launcher::kSlurm ||
         std::any_of(state.processes.begin(), state.processes.end(),
                     [](const ProcessRecord& r) { return r.process.agent_by_systemd; });
}

void note_nodes(Deployment& d) {
  for (const auto& r : d.state.processes)
    d.note_node(r);
  for (const auto& r : d.state.agents)
    d.note_node(r);
}

Result<Deployment> open_deployment(const ClusterOptions& o) {
  Deployment d;
  d.options = o;
  DSERVE_ASSIGN_OR_RETURN(d.manifest, load_cluster_manifest(o));
  d.dir = state_dir_of(o);
  DSERVE_ASSIGN_OR_RETURN(d.state, cluster::load_state(d.dir));
  auto plan = cluster::load_plan(d.dir);
  if (plan.is_ok()) d.plan = std::move(plan).value();
  note_nodes(d);
  return d;
}

// Stops what up started: an empty plan (an agent run as a service stops its processes), then
// the agents up started (they stop theirs), or the Slurm job. The state stays when the job
// could not be ended, so that `down` can try again.
void tear_down(Deployment& d) {
  if (!d.plan.processes.empty()) {
    d.plan.processes.clear();
    if (Status s = d.publish(); !s.is_ok()) print_error(s.message());
    for (const auto& r : d.state.processes) {
      if (!r.process.agent_by_systemd) continue;
      if (Status s = d.wait_gone(r.process, milliseconds(d.options.stop_timeout_ms)); !s.is_ok())
        print_error(s.message());
    }
  }
  if (d.manifest.launcher == cluster::Launcher::kSlurm) {
    if (Status s = end_slurm_job(d); !s.is_ok()) {
      print_error(s.message() + "; the state stays in " + d.dir + ": `dserve down` tries again");
      return;
    }
  } else {
    std::vector<ProcessRecord> reverse(d.state.agents.rbegin(), d.state.agents.rend());
    stop_all(reverse, milliseconds(d.options.stop_timeout_ms));
  }
  (void)cluster::remove_state(d.dir);
  std::error_code ec;
  fs::remove(d.dir + "/plan.json", ec);
}

namespace {

int run_up(const ClusterOptions& o) {
  Deployment d;
  d.options = o;
  auto m = load_cluster_manifest(o);
  if (!m.is_ok()) {
    print_error(m.status().message());
    return 2;
  }
  d.manifest = std::move(m).value();
  d.dir = state_dir_of(o);
  if (auto old = cluster::load_state(d.dir); old.is_ok()) {
    std::string running;
    for (const auto* list : {&old->agents, &old->processes}) {
      for (const auto& r : *list) {
        if (r.pid > 0 && cluster::is_running(r))
          running += " " + r.process.name + " (pid " + std::to_string(r.pid) + ")";
      }
    }
    if (!old->slurm_job.empty()) {
      // A job Slurm no longer lists (cancelled, expired) holds nothing.
      auto components = cluster::slurm_job_components(d.manifest, old->slurm_job);
      if (!components.is_ok() || !components->empty()) running += " slurm job " + old->slurm_job;
    }
    if (!running.empty()) {
      print_error("the cluster of " + o.manifest + " is already up:" + running +
                  "; `dserve down -f " + o.manifest + "` stops it");
      return 1;
    }
  }
  d.state.manifest_path = fs::absolute(o.manifest).string();
  d.state.launcher = d.manifest.launcher;
  // Generations only grow, across clusters too: an agent that outlived an earlier cluster (a
  // service, or a copy of an old plan on a node) takes this plan as new.
  d.plan.generation =
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  if (d.manifest.launcher == cluster::Launcher::kSlurm) return run_up_slurm(d);
  // Every command line first: a manifest this build cannot honour starts nothing.
  for (const Process& p : d.manifest.processes) {
    if (Status s = add_to_plan(d, p); !s.is_ok()) {
      print_error(s.message());
      return 2;
    }
  }
  const auto started = std::chrono::steady_clock::now();
  std::fprintf(stderr, "dserve: up: %zu processes from %s (state and logs in %s)\n",
               d.plan.processes.size(), o.manifest.c_str(), d.dir.c_str());
  auto fail = [&](const std::string& message) {
    if (!message.empty()) print_error(message);
    std::fprintf(stderr, "dserve: up failed; stopping what was started\n");
    tear_down(d);
    return 1;
  };
  if (Status s = cluster::save_state(d.dir, d.state); !s.is_ok()) return fail(s.message());
  if (Status s = start_agents(d); !s.is_ok()) return fail(s.message());
  if (Status s = d.publish(); !s.is_ok()) return fail(s.message());
  if (finish_up(d, started) != 0) return fail("");
  return 0;
}

int run_down(const ClusterOptions& o) {
  Deployment d;
  d.options = o;
  d.dir = state_dir_of(o);
  auto state = cluster::load_state(d.dir);
  if (!state.is_ok()) {
    print_error(state.status().message());
    return 1;
  }
  d.state = std::move(state).value();
  d.manifest.launcher = d.state.launcher;
  if (auto plan = cluster::load_plan(d.dir); plan.is_ok()) {
    d.plan = std::move(plan).value();
    d.manifest.supervision = d.plan.supervision;
  }
  const auto started = std::chrono::steady_clock::now();
  const size_t processes = d.state.processes.size();
  const milliseconds stop_timeout(o.stop_timeout_ms);
  note_nodes(d);
  const ProcessRecord* gw = d.state.gateway();
  if (d.state.agents.empty() && d.nodes.empty()) {
    print_error("the state in " + d.dir + " names no process");
    return 1;
  }
  // A Slurm job that is gone (scancel, time limit) left nothing to drain.
  bool job_gone = false;
  if (d.state.launcher == cluster::Launcher::kSlurm && !d.state.slurm_job.empty()) {
    const auto listed = cluster::slurm_job_listed(d.state.slurm_job);
    job_gone = listed.is_ok() && !*listed;
    if (job_gone) {
      std::fprintf(stderr, "dserve: slurm job %s has already ended\n", d.state.slurm_job.c_str());
    }
  }
  if (job_gone) {
    // Nothing runs: the state only.
  } else if (runs_under_agents(d.state)) {
    // The gateway first: it refuses new requests and lets the running ones finish on the
    // workers, which must still be up for that. Then the workers: an empty plan.
    std::string left;  // processes of service agents that did not stop
    for (const bool gateway_only : {true, false}) {
      std::erase_if(d.plan.processes, [&](const cluster::PlannedProcess& p) {
        return !gateway_only || p.process.role == ProcessRole::kGateway;
      });
      Status s = d.publish();
      for (const auto& r : d.state.processes) {
        if (gateway_only != (r.process.role == ProcessRole::kGateway)) continue;
        Status gone = s.is_ok() ? d.wait_gone(r.process, stop_timeout) : s;
        // An agent up started takes what is left with it below; a service's agent does not.
        if (!gone.is_ok() && r.process.agent_by_systemd) left += " " + r.process.name;
        if (s.is_ok()) s = gone;
      }
      std::fprintf(stderr, "dserve: %s %s (%.1f s)\n", gateway_only ? "gateway" : "workers",
                   s.is_ok() ? "stopped" : ("did not stop: " + s.message()).c_str(),
                   seconds_since(started));
    }
    if (!left.empty()) {
      print_error("still running under their nodes' service agents:" + left +
                  "; the state stays in " + d.dir + ": `dserve down` tries again");
      return 1;
    }
    if (d.state.launcher == cluster::Launcher::kSlurm) {
      if (Status ended = end_slurm_job(d); !ended.is_ok()) {
        print_error(ended.message());
        return 1;
      }
    } else {
      stop_all(d.state.agents, stop_timeout);
    }
  } else {
    // A cluster without agents: its processes directly, the gateway first.
    std::vector<ProcessRecord> order;
    if (gw) order.push_back(*gw);
    for (const auto& r : d.state.processes) {
      if (r.process.role != ProcessRole::kGateway) order.push_back(r);
    }
    stop_all(order, stop_timeout);
  }
  if (Status s = cluster::remove_state(d.dir); !s.is_ok()) {
    print_error(s.message());
    return 1;
  }
  std::error_code ec;
  fs::remove(d.dir + "/plan.json", ec);
  std::printf("dserve: cluster down: %zu processes stopped in %.1f s (logs in %s/logs)\n",
              processes, seconds_since(started), d.dir.c_str());
  return 0;
}

struct AgentFlags {
  std::string state_dir;
  std::string node;
  int64_t plan_wait_ms = 120000;
  bool stay = false;
};

int run_agent(const AgentFlags& f) {
  cluster::AgentOptions opts;
  opts.state_dir = f.state_dir;
  opts.node = f.node;
  if (opts.node.empty()) {
    if (const char* slurm_node = std::getenv("SLURMD_NODENAME")) opts.node = slurm_node;
  }
  if (opts.node.empty()) {
    print_error(
        "agent: give --node (the plan's name of this node); under Slurm it is "
        "$SLURMD_NODENAME, which is not set here");
    return 2;
  }
  opts.plan_wait = milliseconds(f.plan_wait_ms);
  opts.stay = f.stay;
  return cluster::run_node_agent(opts);
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

  auto a = std::make_shared<AgentFlags>();
  CLI::App* agent = app.add_subcommand(
      "agent",
      "run and supervise this node's processes of a cluster (started by `dserve up`, or by "
      "the Slurm job it submits)");
  agent->add_option("--state-dir", a->state_dir, "the cluster's state directory (plan.json)")
      ->required();
  agent->add_option("--node", a->node, "the plan's name of this node (default: $SLURMD_NODENAME)");
  agent
      ->add_option("--plan-wait-ms", a->plan_wait_ms,
                   "how long to wait for the plan to appear before giving up")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{86400000}));
  agent->add_flag("--stay", a->stay,
                  "when the cluster ends (on_pool_lost fail-job), stop this node's processes and "
                  "wait for the next plan instead of exiting (an agent run as a service)");
  out.agent = [a] { return run_agent(*a); };
  return out;
}

}  // namespace dserve::cli
