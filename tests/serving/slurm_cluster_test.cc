// The Slurm test fixture itself (slurm_cluster.h): a 3-node cluster on this host runs a step on
// one node and a heterogeneous job with one component per node, refuses GPUs, cancels, and
// leaves no daemon, process or directory behind once destroyed.

#include "slurm_cluster.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

namespace dserve::testing_support {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Polls `done` every 100 ms until it holds (true) or `limit` has passed (false).
bool eventually(const std::function<bool()>& done, std::chrono::milliseconds limit) {
  for (const auto until = Clock::now() + limit;;
       std::this_thread::sleep_for(std::chrono::milliseconds(100))) {
    if (done()) return true;
    if (Clock::now() > until) return false;
  }
}

// The command line of process `pid`, arguments joined by spaces; empty when it is gone.
std::string cmdline(const std::string& pid) {
  std::ifstream f("/proc/" + pid + "/cmdline", std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  std::string line = s.str();
  for (char& c : line)
    if (c == '\0') c = ' ';
  return line;
}

// Every process whose command line names `text`: each daemon's arguments name files in the
// cluster's directory.
std::vector<std::string> processes_naming(const std::string& text) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string line = cmdline(pid);
    if (line.find(text) != std::string::npos) found.push_back(pid + ": " + line);
  }
  return found;
}

TEST(SlurmClusterTest, RunsJobsOnEveryNodeAndLeavesNothingBehind) {
  // No root or no Slurm here is a reason to skip; a daemon that fails on a machine that has
  // both is a failure.
  if (const std::string why = SlurmCluster::unavailable(); !why.empty())
    GTEST_SKIP() << "skipped: " << why;
  const bool output_was_set = std::getenv("SBATCH_OUTPUT") != nullptr;
  const auto started = Clock::now();
  std::string why;
  std::unique_ptr<SlurmCluster> cluster = SlurmCluster::start({}, &why);
  ASSERT_NE(cluster, nullptr) << why;
  const double start_s = seconds_since(started);
  const std::string dir = cluster->dir();
  const std::vector<pid_t> pids = cluster->daemon_pids();
  EXPECT_EQ(pids.size(), 5u);  // munged, slurmctld, 3 slurmd
  EXPECT_EQ(cluster->node_names(), (std::vector<std::string>{"n1", "n2", "n3"}));
  EXPECT_EQ(cluster->partition(), "debug");
  ASSERT_NE(std::getenv("SLURM_CONF"), nullptr);
  EXPECT_EQ(std::string(std::getenv("SLURM_CONF")), cluster->conf_path());
  EXPECT_TRUE(fs::exists(cluster->conf_path()));
  if (!output_was_set) {
    ASSERT_NE(std::getenv("SBATCH_OUTPUT"), nullptr);
    EXPECT_EQ(std::string(std::getenv("SBATCH_OUTPUT")), dir + "/slurm-%j.out");
  }

  SlurmCluster::Result r = cluster->run("srun -N1 -n1 hostname");
  EXPECT_EQ(r.exit_code, 0) << r.output << cluster->logs_tail();
  EXPECT_FALSE(r.output.empty());

  // The nodes have no generic resources: a GPU request is refused at submission.
  r = cluster->run("sbatch --parsable -t 1 --gres=gpu:1 --wrap=true");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Invalid generic resource"), std::string::npos) << r.output;

  r = cluster->run(
      "sbatch --parsable -t 2 -n1 : -n1 : -n1 --wrap='srun --het-group=0 sleep 30 & "
      "srun --het-group=1 sleep 30 & srun --het-group=2 sleep 30 & wait'");
  ASSERT_EQ(r.exit_code, 0) << r.output << cluster->logs_tail();
  std::string job;
  std::istringstream(r.output.substr(0, r.output.find(';'))) >> job;
  ASSERT_FALSE(job.empty()) << r.output;

  // Each component ("J+0", "J+1", "J+2") running, on a node of its own.
  std::set<std::string> nodes;
  std::string said;
  const auto submitted = Clock::now();
  const bool all_running = eventually(
      [&] {
        const SlurmCluster::Result q = cluster->run("squeue -h -o '%i %T %N'", 10);
        said = q.output;
        nodes.clear();
        int running = 0;
        std::istringstream lines(q.output);
        for (std::string id, state, node; lines >> id >> state >> node;) {
          if (id.rfind(job + "+", 0) != 0 || state != "RUNNING") continue;
          ++running;
          nodes.insert(node);
        }
        return running == 3;
      },
      std::chrono::seconds(20));
  ASSERT_TRUE(all_running) << "squeue said:\n" << said << cluster->logs_tail();
  const double het_s = seconds_since(submitted);
  EXPECT_EQ(nodes, (std::set<std::string>{"n1", "n2", "n3"})) << said;
  EXPECT_EQ(cluster->jobs().size(), 3u);

  r = cluster->run("scancel " + job);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const auto cancelled = Clock::now();
  EXPECT_TRUE(eventually([&] { return cluster->jobs().empty(); }, std::chrono::seconds(10)))
      << cluster->run("squeue").output;
  const double cancel_s = seconds_since(cancelled);
  // The batch script's output went to the cluster's directory, not the working directory.
  if (!output_was_set) {
    EXPECT_TRUE(fs::exists(dir + "/slurm-" + job + ".out"));
    EXPECT_FALSE(fs::exists("slurm-" + job + ".out"));
  }

  const auto stopping = Clock::now();
  cluster.reset();
  const double stop_s = seconds_since(stopping);

  for (pid_t pid : pids) {
    // Reaped, so gone; a pid the kernel handed out again must not be one of ours.
    if (::kill(pid, 0) == 0) {
      EXPECT_EQ(cmdline(std::to_string(pid)).find(dir), std::string::npos) << pid;
    } else {
      EXPECT_EQ(errno, ESRCH) << pid;
    }
  }
  EXPECT_EQ(processes_naming(dir), std::vector<std::string>{});
  EXPECT_EQ(std::getenv("SLURM_CONF"), nullptr);
  if (!output_was_set) {
    EXPECT_EQ(std::getenv("SBATCH_OUTPUT"), nullptr);
  }
  const char* keep = std::getenv("DSERVE_SLURM_TEST_KEEP");
  if (keep == nullptr || std::string(keep) != "1") {
    EXPECT_FALSE(fs::exists(dir)) << dir;
  }
  std::cerr << "[ info ] slurm cluster of 3 nodes: idle " << start_s << " s after start; het job "
            << "running after " << het_s << " s, gone " << cancel_s << " s after scancel; "
            << "stopped in " << stop_s << " s\n";
}

}  // namespace
}  // namespace dserve::testing_support
