// The node agent on its own, with shell scripts as its processes: restarts with back-off until
// the budget is spent, the plan followed as it changes, a gateway that reports a lost pool
// ending the cluster, and processes that die with their agent. The agent runs in a child
// process of the test (it installs signal handlers and loops until told to stop).

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

#include "dserve/cluster/node_agent.h"

namespace dserve::cluster {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool alive(pid_t pid) {
  const std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');
  return close != std::string::npos && stat[close + 2] != 'Z' && stat[close + 2] != 'X';
}

class NodeAgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dserve-agent-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    plan_.supervision.backoff_ms = 50;
    plan_.supervision.backoff_max_ms = 200;
    plan_.supervision.stop_timeout_ms = 2000;
  }
  void TearDown() override {
    if (agent_ > 0) {
      ::kill(agent_, SIGKILL);
      ::waitpid(agent_, nullptr, 0);
    }
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // A process of node "n1" running `script` with sh; "ready" once it printed the ready line.
  void add(const std::string& name, const std::string& script,
           ProcessRole role = ProcessRole::kDecode) {
    PlannedProcess p;
    p.process.name = name;
    p.process.role = role;
    p.process.node = "n1";
    p.program = "/bin/sh";
    p.args = {"-c", script};
    p.log_path = (dir_ / "logs" / (name + ".log")).string();
    p.out_path = (dir_ / "logs" / (name + ".out")).string();
    plan_.processes.push_back(p);
  }
  void publish() {
    ++plan_.generation;
    ASSERT_TRUE(save_plan(dir_.string(), plan_).is_ok());
  }
  void start_agent() {
    agent_ = ::fork();
    ASSERT_GE(agent_, 0);
    if (agent_ == 0) {
      AgentOptions o;
      o.state_dir = dir_.string();
      o.node = "n1";
      o.plan_wait = plan_wait_;
      o.stay = stay_;
      o.poll = milliseconds(20);
      ::_exit(run_node_agent(o));
    }
  }
  Result<AgentReport> report() const {
    return report_from_json(read_file(report_path(dir_.string(), "n1")));
  }
  WorkerReport worker(const std::string& name) const {
    auto r = report();
    if (r.is_ok()) {
      for (const auto& w : r->workers) {
        if (w.name == name) return w;
      }
    }
    return {};
  }
  // Waits (10 s at most) until `done` holds.
  bool eventually(const std::function<bool()>& done) const {
    for (int i = 0; i < 500; ++i) {
      if (done()) return true;
      std::this_thread::sleep_for(milliseconds(20));
    }
    return done();
  }
  // Under fail-job: a gateway that exits with kPoolLostExitCode soon after it is ready, and
  // decode-0; the agent started. decode-0's pid once ready (0 if it never is).
  pid_t start_with_a_gateway_that_loses_a_pool() {
    plan_.supervision.on_pool_lost = "fail-job";
    add("gateway",
        "echo 'dserve: serving test'; sleep 1; exit " + std::to_string(kPoolLostExitCode),
        ProcessRole::kGateway);
    add("decode-0", "echo 'dserve: serving test'; exec sleep 600");
    publish();
    start_agent();
    if (!eventually([&] { return worker("decode-0").state == "ready"; })) return 0;
    return worker("decode-0").pid;
  }
  int stop_agent(int sig = SIGTERM) {
    ::kill(agent_, sig);
    int status = 0;
    EXPECT_EQ(::waitpid(agent_, &status, 0), agent_);
    agent_ = 0;
    return status;
  }

  fs::path dir_;
  ClusterPlan plan_;
  pid_t agent_ = 0;
  milliseconds plan_wait_{10000};
  bool stay_ = false;
};

constexpr const char* kServe = "echo 'dserve: serving test'; exec sleep 600";

TEST_F(NodeAgentTest, RestartsWithBackoffUntilTheBudgetIsSpent) {
  plan_.supervision.max_restarts = 2;
  add("crashing", "echo 'dserve: serving test'; sleep 0.1; exit 7");
  add("steady", kServe);
  publish();
  start_agent();
  ASSERT_TRUE(eventually([&] { return worker("crashing").state == "failed"; }))
      << read_file(dir_ / "logs" / "crashing.log");
  const WorkerReport w = worker("crashing");
  EXPECT_EQ(w.restarts, 2);
  EXPECT_EQ(w.last_exit, "exited with status 7");
  EXPECT_EQ(w.pid, 0);
  // The others are not touched by one process's failures.
  EXPECT_EQ(worker("steady").state, "ready");
  EXPECT_EQ(worker("steady").restarts, 0);
  const pid_t steady = worker("steady").pid;
  const int status = stop_agent();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_FALSE(alive(steady));
  auto r = report();
  ASSERT_TRUE(r.is_ok());
  EXPECT_TRUE(r->ended);
  EXPECT_EQ(r->end_reason, "signal 15");
}

TEST_F(NodeAgentTest, AKilledProcessIsRestartedAndItsRecoveryMeasured) {
  add("worker", kServe);
  publish();
  start_agent();
  ASSERT_TRUE(eventually([&] { return worker("worker").state == "ready"; }));
  const pid_t first = worker("worker").pid;
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(eventually([&] {
    const auto w = worker("worker");
    return w.state == "ready" && w.restarts == 1;
  }));
  const WorkerReport w = worker("worker");
  EXPECT_NE(w.pid, first);
  EXPECT_EQ(w.last_exit, "killed by signal 9");
  EXPECT_GE(w.last_recovery_s, 0.04);  // at least the 50 ms back-off, give or take a tick
  stop_agent();
}

TEST_F(NodeAgentTest, FollowsThePlanAsItChanges) {
  add("a", kServe);
  publish();
  start_agent();
  ASSERT_TRUE(eventually([&] { return worker("a").state == "ready"; }));
  const pid_t a = worker("a").pid;
  plan_.processes.clear();
  add("b", kServe);
  publish();
  ASSERT_TRUE(eventually([&] {
    const auto r = report();
    return r.is_ok() && r->plan_generation == plan_.generation && worker("a").name.empty() &&
           worker("b").state == "ready";
  }));
  EXPECT_FALSE(alive(a));
  // A process no longer planned is stopped, not restarted.
  EXPECT_EQ(worker("b").restarts, 0);
  stop_agent();
}

TEST_F(NodeAgentTest, AGatewayReportingALostPoolEndsTheCluster) {
  const pid_t decode = start_with_a_gateway_that_loses_a_pool();
  ASSERT_GT(decode, 0);
  int status = 0;
  ASSERT_TRUE(eventually([&] { return ::waitpid(agent_, &status, WNOHANG) == agent_; }));
  agent_ = 0;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  EXPECT_FALSE(alive(decode));
  auto r = report();
  ASSERT_TRUE(r.is_ok());
  EXPECT_TRUE(r->ended);
  EXPECT_NE(r->end_reason.find("fail-job"), std::string::npos) << r->end_reason;
}

// An agent run as a service (--stay) outlives the cluster it ended and runs the next plan.
TEST_F(NodeAgentTest, AServiceAgentWaitsForTheNextPlanAfterEndingTheCluster) {
  stay_ = true;
  const pid_t decode = start_with_a_gateway_that_loses_a_pool();
  ASSERT_GT(decode, 0);
  ASSERT_TRUE(eventually([&] {
    const auto r = report();
    return r.is_ok() && r->ended && r->workers.empty();
  }));
  EXPECT_FALSE(alive(decode));
  EXPECT_EQ(::waitpid(agent_, nullptr, WNOHANG), 0) << "the agent exited";
  plan_.processes.clear();
  add("decode-0", kServe);
  publish();
  ASSERT_TRUE(eventually([&] {
    const auto r = report();
    return r.is_ok() && !r->ended && worker("decode-0").state == "ready";
  }));
  EXPECT_NE(worker("decode-0").pid, decode);
  const int status = stop_agent();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST_F(NodeAgentTest, ProcessesDieWithTheirAgent) {
  add("worker", kServe);
  publish();
  start_agent();
  ASSERT_TRUE(eventually([&] { return worker("worker").state == "ready"; }));
  const pid_t w = worker("worker").pid;
  stop_agent(SIGKILL);
  EXPECT_TRUE(eventually([&] { return !alive(w); })) << "pid " << w << " outlived its agent";
}

TEST_F(NodeAgentTest, GivesUpWhenNoPlanAppears) {
  plan_wait_ = milliseconds(300);
  start_agent();
  int status = 0;
  // The agent exits 1 once plan_wait has passed without a plan.
  for (int i = 0; i < 750 && ::waitpid(agent_, &status, WNOHANG) != agent_; ++i)
    std::this_thread::sleep_for(milliseconds(20));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  agent_ = 0;
}

}  // namespace
}  // namespace dserve::cluster
