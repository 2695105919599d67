// launcher slurm for `dserve up`, `status`, `scale` and `down`: the job, its allocation and
// where each process runs on it (cluster/slurm_job.h has the Slurm commands).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <thread>

#include "cluster_common.h"
#include "commands.h"
#include "dserve/cluster/slurm_job.h"

namespace dserve::cli {
namespace {

using cluster::Process;
using cluster::ProcessRole;
using cluster::SlurmComponent;
using std::chrono::milliseconds;

// The nodes of the component that hosts `role`.
const std::vector<std::string>* component_nodes(const std::vector<SlurmComponent>& components,
                                                ProcessRole role) {
  for (const auto& c : components) {
    if (c.role == role) return &c.nodes;
  }
  return nullptr;
}

// Node name -> its NodeAddr, asked once per node.
Result<std::string> address_of(std::map<std::string, std::string>& cache, const std::string& node) {
  if (auto it = cache.find(node); it != cache.end()) return it->second;
  DSERVE_ASSIGN_OR_RETURN(std::string address, cluster::slurm_node_address(node));
  cache[node] = address;
  return address;
}

// Waits until every component runs on its nodes.
Result<std::vector<SlurmComponent>> wait_allocated(const Deployment& d, milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  const size_t expected = cluster::slurm_component_roles(d.manifest).size();
  std::string last;
  for (;;) {
    DSERVE_ASSIGN_OR_RETURN(auto components,
                            cluster::slurm_job_components(d.manifest, d.state.slurm_job));
    if (components.empty()) {
      return unavailable("slurm job " + d.state.slurm_job + " ended before it ran; see " + d.dir +
                         "/logs/job-" + d.state.slurm_job + ".out");
    }
    const bool running =
        components.size() == expected &&
        std::all_of(components.begin(), components.end(), [](const SlurmComponent& c) {
          return c.state == "RUNNING" && !c.nodes.empty();
        });
    if (running) return components;
    last.clear();
    for (const auto& c : components)
      last += " " + c.id + " " + c.state + (c.reason == "None" ? "" : " (" + c.reason + ")");
    if (std::chrono::steady_clock::now() >= until) {
      return unavailable("slurm job " + d.state.slurm_job + " did not start in " +
                         std::to_string(timeout.count()) + " ms:" + last);
    }
    std::this_thread::sleep_for(milliseconds(200));
  }
}

}  // namespace

int run_up_slurm(Deployment& d) {
  const auto started = std::chrono::steady_clock::now();
  const milliseconds ready(d.options.ready_timeout_ms > 0 ? d.options.ready_timeout_ms
                                                          : d.manifest.timeouts.ready_ms);
  const std::string program =
      d.manifest.slurm.program.empty() ? self_program() : d.manifest.slurm.program;
  auto job = cluster::submit_slurm_job(d.manifest, d.dir, program);
  if (!job.is_ok()) {
    print_error(d.options.manifest + ": " + job.status().message());
    return job.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  d.state.slurm_job = *job;
  std::fprintf(stderr,
               "dserve: up: slurm job %s submitted (%zu components; state and logs in %s)\n",
               job->c_str(), cluster::slurm_component_roles(d.manifest).size(), d.dir.c_str());
  auto fail = [&](const std::string& message) {
    if (!message.empty()) print_error(message);
    std::fprintf(stderr, "dserve: up failed; ending slurm job %s\n", d.state.slurm_job.c_str());
    tear_down(d);
    return 1;
  };
  if (Status s = cluster::save_state(d.dir, d.state); !s.is_ok()) return fail(s.message());
  auto components = wait_allocated(d, ready);
  if (!components.is_ok()) return fail(components.status().message());
  // Each process onto its component's nodes (replica i on node i, cycling), at that node's
  // address; devices counted per node from 0 (indices into the GPUs Slurm gave the node).
  std::map<std::string, std::string> addresses;
  std::map<std::string, int64_t> devices_used;
  for (Process& p : d.manifest.processes) {
    const auto* nodes = component_nodes(*components, p.role);
    if (!nodes || nodes->empty()) return fail("slurm job has no nodes for " + p.name);
    p.node = (*nodes)[static_cast<size_t>(p.replica) % nodes->size()];
    auto address = address_of(addresses, p.node);
    if (!address.is_ok()) return fail(address.status().message());
    p.host = *address;
    const int64_t count = static_cast<int64_t>(p.devices.size());
    p.devices.clear();
    for (int64_t i = 0; i < count; ++i)
      p.devices.push_back(devices_used[p.node]++);
  }
  for (const Process& p : d.manifest.processes) {
    if (Status s = add_to_plan(d, p); !s.is_ok()) return fail(s.message());
    std::fprintf(stderr, "dserve: up: %-12s on node %s (%s)\n", p.name.c_str(), p.node.c_str(),
                 p.host.c_str());
  }
  if (Status s = cluster::save_state(d.dir, d.state); !s.is_ok()) return fail(s.message());
  if (Status s = d.publish(); !s.is_ok()) return fail(s.message());
  if (finish_up(d, started) != 0) return fail("");
  return 0;
}

Status end_slurm_job(const Deployment& d) {
  if (d.state.slurm_job.empty()) return Status::ok();
  // scancel sends SIGTERM to every step (the agents stop their workers), SIGKILL after the
  // cluster's KillWait.
  return cluster::cancel_slurm_job(d.state.slurm_job,
                                   milliseconds(std::max<int64_t>(d.options.stop_timeout_ms, 1)));
}

void print_slurm_status(const Deployment& d) {
  auto components = cluster::slurm_job_components(d.manifest, d.state.slurm_job);
  if (!components.is_ok()) {
    std::printf("slurm job %s: %s\n", d.state.slurm_job.c_str(),
                components.status().message().c_str());
    return;
  }
  if (components->empty()) {
    std::printf("slurm job %s: no longer known to Slurm (ended)\n", d.state.slurm_job.c_str());
    return;
  }
  std::printf("slurm job %s\n", d.state.slurm_job.c_str());
  for (const auto& c : *components) {
    std::string nodes;
    for (const auto& n : c.nodes)
      nodes += (nodes.empty() ? "" : ",") + n;
    std::printf("  component %-8s %-10s %s%s\n", c.id.c_str(),
                std::string(cluster::process_role_name(c.role)).c_str(), c.state.c_str(),
                nodes.empty() ? "" : (" on " + nodes).c_str());
  }
  auto steps = cluster::slurm_job_steps(d.state.slurm_job);
  if (!steps.is_ok()) return;
  for (const auto& s : *steps)
    std::printf("  step %-10s %-8s on %s\n", s.id.c_str(), s.name.c_str(), s.nodes.c_str());
}

Result<Process> slurm_extra_replica(const Deployment& d, const cluster::Pool& pool,
                                    int64_t replica) {
  DSERVE_ASSIGN_OR_RETURN(auto components,
                          cluster::slurm_job_components(d.manifest, d.state.slurm_job));
  const auto* nodes = component_nodes(components, pool.role);
  if (!nodes || nodes->empty()) {
    return unavailable("slurm job " + d.state.slurm_job + " has no running nodes for pool " +
                       std::string(cluster::process_role_name(pool.role)));
  }
  Process p = new_replica(pool.role, replica);
  p.node = (*nodes)[static_cast<size_t>(replica) % nodes->size()];
  DSERVE_ASSIGN_OR_RETURN(p.host, cluster::slurm_node_address(p.node));
  // Devices unique per node; ports unique across the job (nodes may share an address).
  int64_t devices_used = 0;
  for (const auto& r : d.state.processes) {
    if (r.process.node == p.node) devices_used += static_cast<int64_t>(r.process.devices.size());
  }
  for (int64_t i = 0; i < pool.devices_per_replica; ++i)
    p.devices.push_back(devices_used + i);
  const std::set<int64_t> ports = ports_in_use(d.state.processes);
  DSERVE_RETURN_IF_ERROR(assign_free_ports(
      p, ports.empty() ? d.manifest.slurm.base_port : *ports.begin(),
      d.manifest.network.metrics_port_offset, [&](int64_t port) { return !ports.count(port); }));
  return p;
}

}  // namespace dserve::cli
