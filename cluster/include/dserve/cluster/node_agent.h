#pragma once
// The node agent (`dserve agent`): one per node of a cluster, it runs that node's workers as
// its children, restarts one that dies (back-off, a restart budget), reports what each does,
// and takes every worker down with it when it is told to stop or when it dies itself.
//
// What the agents run is the cluster plan (<state dir>/plan.json), written by `dserve up` and
// `dserve scale`: every process of the cluster with its command line and node. An agent runs
// the processes of its node and follows the plan as it changes (a new process is started, one
// no longer planned is stopped). It writes its report to <state dir>/agents/<node>.json.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "dserve/cluster/manifest.h"
#include "dserve/core/status.h"

namespace dserve::cluster {

// The exit status of a gateway that ended because a pool stayed empty (supervision
// on_pool_lost: fail-job): its agent does not restart it, and ends the cluster.
inline constexpr int kPoolLostExitCode = 3;

struct PlannedProcess {
  Process process;
  std::string program;            // the dserve executable on its node
  std::vector<std::string> args;  // after the program name
  std::string log_path;           // stderr, appended to across restarts
  std::string out_path;           // stdout (the ready line), truncated at each start
};

struct ClusterPlan {
  int64_t generation = 0;  // raised by every change
  SupervisionSpec supervision;
  std::string slurm_job;  // the job id under launcher slurm, else empty
  std::vector<PlannedProcess> processes;
};

// The plan as JSON text, and back (kDataLoss for text that is not a plan).
std::string plan_to_json(const ClusterPlan& plan);
Result<ClusterPlan> plan_from_json(const std::string& text);
// <dir>/plan.json, written atomically; kNotFound when there is none.
Status save_plan(const std::string& dir, const ClusterPlan& plan);
Result<ClusterPlan> load_plan(const std::string& dir);

// What an agent says of one worker.
struct WorkerReport {
  std::string name;
  // "starting" (no ready line yet), "ready", "backoff" (dead, restarting after a delay),
  // "failed" (dead, out of restart budget, or a gateway that ended the cluster), "stopping".
  std::string state;
  pid_t pid = 0;
  uint64_t start_ticks = 0;
  int64_t restarts = 0;        // since the agent started it first
  std::string last_exit;       // "exited with status 1", "killed by signal 9"; "" before any
  double last_recovery_s = 0;  // from its last death to ready again; 0 before any restart
  int64_t ready_unix_ms = 0;   // when it last became ready
};

struct AgentReport {
  std::string node;
  pid_t pid = 0;  // the agent's
  int64_t updated_unix_ms = 0;
  int64_t plan_generation = 0;  // the plan it follows
  bool ended = false;           // the agent stopped every worker and exited
  std::string end_reason;
  std::vector<WorkerReport> workers;
};

std::string report_to_json(const AgentReport& report);
Result<AgentReport> report_from_json(const std::string& text);
// <dir>/agents/<node>.json.
std::string report_path(const std::string& dir, const std::string& node);

struct AgentOptions {
  std::string state_dir;  // holds plan.json; the report and the workers' logs go under it
  std::string node;       // the plan's name of this node
  // How long to wait for a plan to appear (a Slurm job's agents start before `up` writes it).
  std::chrono::milliseconds plan_wait{120000};
  std::chrono::milliseconds poll{100};
  // A service's agent (systemd): when the cluster ends (fail-job), stop the processes and wait
  // for the next plan instead of exiting.
  bool stay = false;
};

// Runs the agent until SIGTERM, SIGINT or SIGHUP (then it stops every worker, SIGTERM and after
// supervision.stop_timeout_ms SIGKILL, and returns 0), or until the cluster ends (a gateway
// exited with kPoolLostExitCode: returns 1, or with `stay` waits for a new plan; under Slurm the
// job is cancelled). Progress and
// every start, death and restart go to stderr as lines starting with "dserve agent: ".
int run_node_agent(const AgentOptions& options);

}  // namespace dserve::cluster
