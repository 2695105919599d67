#pragma once
// A Slurm cluster on this host for tests (SlurmCluster): munged, slurmctld and one slurmd per
// emulated node, every one on 127.0.0.1, from Debian 12's packages (slurmctld slurmd
// slurm-client munge). The measured configuration and its pitfalls: shared/design/SLURM.md.

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dserve::testing_support {

// munged, slurmctld and `nodes` slurmd daemons (n1..nN, one `slurmd -N nX` each), every one on
// 127.0.0.1, on ports found free at start, in one fresh directory under the temporary
// directory. The cluster owns the daemons (children of this process, in the foreground, their
// output in files of that directory) and stops them when destroyed. The daemons get SIGKILL if
// the thread that started them ends first (PR_SET_PDEATHSIG): a crashed test leaves no daemon,
// only the directory. Slurm binds its daemons and srun to the address of the host's name, so
// start() moves the calling thread into a UTS namespace of its own whose host name is
// "localhost" (the machine keeps its name), for good: that thread's later children (srun,
// sbatch, dserve) bind to 127.0.0.1 too, while srun run from another thread would not be reached.
// Not thread-safe: use it on the thread that started it.
class SlurmCluster {
 public:
  struct Options {
    int nodes = 3;                    // n1..nN, each its own slurmd with its own port
    int cpus_per_node = 2;            // CPUs= of each node, whatever this host has
    int64_t real_memory_mib = 4000;   // RealMemory= of each node
    std::string partition = "debug";  // the one partition (Default=YES, every node)
  };

  // Why this machine cannot run a cluster (not root; no CAP_SYS_ADMIN for the UTS namespace; a
  // program missing, with the Debian package that has it), or empty when it can. start() fails
  // with this reason first.
  static std::string unavailable();

  // Starts munged, then slurmctld and the slurmd daemons, and waits (up to 30 s) until `sinfo`
  // shows every node idle. Sets SLURM_CONF for this process (setenv), so that child processes
  // (sbatch, squeue, dserve) find the cluster, and SBATCH_OUTPUT=<dir>/slurm-%j.out unless set,
  // so that batch jobs do not write into the test's working directory. nullptr with *why set
  // when this machine cannot (unavailable()), or when a daemon fails to start or the nodes do
  // not come up (*why then holds the end of the logs); nothing is left running then.
  static std::unique_ptr<SlurmCluster> start(const Options& options, std::string* why);

  // Cancels every job (bounded, 10 s), stops the slurmd daemons, then slurmctld (SIGTERM, and
  // SIGKILL after 5 s; SIGKILL at once when munged is gone, as they then ignore SIGTERM), then
  // munged, reaps them all, and removes the directory unless DSERVE_SLURM_TEST_KEEP=1 (then it
  // says on stderr where the directory is). Unsets SLURM_CONF and SBATCH_OUTPUT when they still
  // name this cluster's files.
  ~SlurmCluster();
  SlurmCluster(const SlurmCluster&) = delete;
  SlurmCluster& operator=(const SlurmCluster&) = delete;

  const std::string& dir() const { return dir_; }
  const std::string& conf_path() const { return conf_path_; }  // the slurm.conf
  const std::string& partition() const { return options_.partition; }
  std::vector<std::string> node_names() const {  // n1..nN
    std::vector<std::string> names;
    for (int i = 1; i <= options_.nodes; ++i)
      names.push_back("n" + std::to_string(i));
    return names;
  }

  // The pids of munged, slurmctld and the slurmd daemons not yet reaped (for tests that check
  // that nothing is left behind).
  std::vector<pid_t> daemon_pids() const {
    std::vector<pid_t> pids;
    for (const Daemon& d : daemons_)
      if (d.pid > 0) pids.push_back(d.pid);
    return pids;
  }

  // Runs `command` with sh, SLURM_CONF set to this cluster's, stdin from /dev/null, under
  // `timeout <timeout_s>` (exit code 124 when it ran out); stdout and stderr together.
  // exit_code is -1 when the command did not exit normally or could not run.
  struct Result {
    int exit_code = -1;
    std::string output;
  };
  Result run(const std::string& command, int timeout_s = 20) const;

  // The ids of every job in squeue (pending, running or completing), as printed by
  // `squeue -h -o %i` (a heterogeneous job's components as "J+0", "J+1", ...).
  std::vector<std::string> jobs() const;

  // The last `lines` lines of each daemon's log and of its stdout/stderr, labelled, for
  // failure messages.
  std::string logs_tail(size_t lines = 30) const;

 private:
  // One daemon: its pid until reaped, its log files, and how it ended.
  struct Daemon {
    std::string name;         // "munged", "slurmctld", "slurmd n1"
    std::string log_path;     // the log the daemon writes itself
    std::string output_path;  // its stdout and stderr
    pid_t pid = -1;           // -1 once reaped
    int status = 0;           // waitpid's status once reaped
  };

  explicit SlurmCluster(Options options) : options_(std::move(options)) {}
  bool launch(Daemon& daemon, std::vector<std::string> argv, std::string* why);
  static bool running(Daemon& daemon);  // reaps it when it has ended
  static void stop(const std::vector<Daemon*>& daemons, int sig, int grace_ms);
  bool wait_until_idle(std::string* why);
  void cancel_jobs();

  Options options_;
  std::string dir_;
  std::string conf_path_;
  std::vector<Daemon> daemons_;  // munged, slurmctld, then slurmd n1..nN
  bool up_ = false;              // every node was idle once
};

}  // namespace dserve::testing_support
