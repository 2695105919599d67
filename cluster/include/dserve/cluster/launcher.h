#pragma once
// What `dserve up`, `status`, `scale` and `down` share: the processes of a running cluster
// (ClusterState, kept as JSON in a state directory so that each command finds what the
// previous one started) and starting and stopping them on this machine.
//
// Processes run detached (their own session, output in the state directory's logs/), so the
// cluster outlives the command that started it. A process is identified by its pid and its
// start time (from /proc), so a recycled pid is never mistaken for it.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "dserve/cluster/manifest.h"
#include "dserve/core/status.h"

namespace dserve::cluster {

// One process the cluster runs: the manifest's Process and how it was started.
struct ProcessRecord {
  Process process;
  std::vector<std::string> args;  // after the program name ("serve", ...)
  pid_t pid = 0;
  uint64_t start_ticks = 0;  // /proc/<pid>/stat field 22 (a recycled pid differs); 0: unknown
  std::string log_path;      // stderr (the process's log lines)
  std::string out_path;      // stdout (its ready line)
  int64_t started_unix_ms = 0;
  // How its node is reached when process.ssh is set: the ssh program and options, then the
  // destination; everything below runs there through it (kill, /proc, the log files).
  std::vector<std::string> ssh_command;
};

struct ClusterState {
  std::string manifest_path;  // absolute
  Launcher launcher = Launcher::kNodes;
  std::string slurm_job;  // launcher slurm: the job id
  // The manifest's processes (pid and start time of their first run: their node agents restart
  // them; the agents' reports say what runs now).
  std::vector<ProcessRecord> processes;
  // launcher nodes: the node agents `up` started, one per node (role kNodeAgent).
  std::vector<ProcessRecord> agents;

  // The gateway's record, or nullptr.
  const ProcessRecord* gateway() const;
  // The records of one pool's role, by replica.
  std::vector<const ProcessRecord*> pool(ProcessRole role) const;
};

// The default state directory of a manifest: /var/tmp/dserve/<file stem>-<hash of its absolute
// path>, so that two manifests never share one and the same manifest always finds its own.
std::string default_state_dir(const std::string& manifest_path);

// Reads <dir>/state.json: kNotFound when the cluster is not up (no file), kDataLoss when the
// file is not what save_state wrote.
Result<ClusterState> load_state(const std::string& dir);
// Writes <dir>/state.json atomically (a temporary file renamed over it).
Status save_state(const std::string& dir, const ClusterState& state);
// Removes <dir>/state.json (the logs stay).
Status remove_state(const std::string& dir);

// True while the recorded process runs (same pid, same start time, not a zombie).
bool is_running(const ProcessRecord& record);

// True when `host` is an address of this machine (loopback, or one of its interfaces' IPv4
// addresses), so that a process placed there can be started here.
bool is_local_host(const std::string& host);

struct LaunchOptions {
  std::string program;    // the dserve executable (a process's own `program` wins)
  std::string state_dir;  // logs go to <state_dir>/logs/<name>.{log,out} (on its node)
  // For processes on nodes with `ssh`: the command that reaches them, before the destination.
  std::vector<std::string> ssh_command = {"ssh", "-o", "BatchMode=yes"};
};

// Starts `dserve <args>` for `process`, detached: here, or over ssh on its node (in its own
// session there, surviving the ssh connection). Returns at once (`dserve up` starts the node
// agents this way; their reports say when the processes they run are ready).
Result<ProcessRecord> start_process(const Process& process, std::vector<std::string> args,
                                    const LaunchOptions& options);

// Sends SIGTERM, waits up to `timeout` for the process to exit, then SIGKILL. Returns how it
// ended: "exited", "killed after N ms" or "was not running".
std::string stop_process(const ProcessRecord& record, std::chrono::milliseconds timeout);

// How a node's files are reached: here (ssh empty), or through `ssh_command ssh`.
struct NodeAccess {
  std::string ssh;
  std::vector<std::string> ssh_command;
};
NodeAccess access_of(const ProcessRecord& record);
// A small file on a node (kNotFound when it is not there), and writing one atomically.
Result<std::string> read_node_file(const NodeAccess& node, const std::string& path);
Status write_node_file(const NodeAccess& node, const std::string& path, const std::string& text);

// The last `lines` lines of a file ("" when unreadable), for error messages; of a process's
// log (on its node).
std::string tail_of(const std::string& path, size_t lines = 20);
std::string tail_of(const ProcessRecord& record, size_t lines = 20);

}  // namespace dserve::cluster
