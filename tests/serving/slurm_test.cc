// `launcher: slurm` end to end on a one-host Slurm cluster (munged, slurmctld and three
// emulated nodes, all on 127.0.0.1: slurm_cluster.h): `dserve up` submits the job and the
// pools land on different nodes; answers match `dserve generate`; workers killed with SIGKILL
// under a steady stream are restarted by their node agents with nothing lost; `scale`; then the
// job ended by `scancel` (every process gone, the clients told why) and by `dserve down`.
// Broken Slurm settings are refused with the scheduler's reason and the manifest line.

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "dserve/api/serving_client.h"
#include "dserve/cluster/node_agent.h"
#include "request_stream.h"
#include "serve_cluster.h"
#include "slurm_cluster.h"

namespace dserve {
namespace {

namespace fs = std::filesystem;
using testing_support::SlurmCluster;

testing_support::CommandResult dserve(const std::string& args) {
  return testing_support::run_command(std::string(DSERVE_BINARY) + " " + args + " 2>&1");
}

using testing_support::read_file;

bool alive(pid_t pid) {
  return testing_support::process_alive(pid);
}

std::string manifest_text(int base_port, const std::string& partition,
                          const std::string& extra_slurm = "", const std::string& decode_extra = "",
                          const std::string& extra_supervision = "") {
  return "version: 1\n"
         "mode: disaggregated\n"
         "launcher: slurm\n"
         "slurm:\n"
         "  partition: " +
         partition +
         "\n"
         "  base_port: " +
         std::to_string(base_port) + "\n" + extra_slurm +
         "model:\n"
         "  path: " +
         testing_support::tiny_dir() +
         "\n"
         "pools:\n"
         "  prefill:\n"
         "    replicas: 1\n"
         "    devices_per_replica: 0\n"
         "  decode:\n"
         "    replicas: 1\n"
         "    devices_per_replica: 0\n"
         "    kv_budget_mib: 64\n" +
         decode_extra +
         "network:\n"
         "  ucx_transports: [tcp]\n"
         "  ucx_net_devices: [lo]\n"
         "  metrics_port_offset: 50\n"
         "supervision:\n"
         "  backoff_ms: 200\n"
         "  stop_timeout_ms: 10000\n" +
         extra_supervision +
         "timeouts:\n"
         "  ready_ms: 90000\n";
}

// The agent reports of the cluster: node -> report.
std::map<std::string, cluster::AgentReport> reports(const fs::path& state) {
  std::map<std::string, cluster::AgentReport> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(state / "agents", ec)) {
    if (e.path().extension() != ".json") continue;
    auto r = cluster::report_from_json(read_file(e.path()));
    if (r.is_ok()) out[r->node] = std::move(r).value();
  }
  return out;
}

// The pids of every agent and every process they run now.
std::vector<pid_t> all_pids(const fs::path& state) {
  std::vector<pid_t> pids;
  for (const auto& [node, r] : reports(state)) {
    pids.push_back(r.pid);
    for (const auto& w : r.workers)
      pids.push_back(w.pid);
  }
  return pids;
}

// Process name -> (node, its report).
std::map<std::string, std::pair<std::string, cluster::WorkerReport>> workers(
    const fs::path& state) {
  std::map<std::string, std::pair<std::string, cluster::WorkerReport>> out;
  for (const auto& [node, r] : reports(state)) {
    for (const auto& w : r.workers)
      out[w.name] = {node, w};
  }
  return out;
}

// Kills `name` with SIGKILL and waits until its agent has it ready again; the seconds it took.
double kill_and_wait_restart(const fs::path& state, const std::string& name) {
  const auto before = workers(state)[name].second;
  EXPECT_EQ(before.state, "ready") << name;
  EXPECT_GT(before.pid, 0) << name;
  if (before.pid <= 0) return -1;
  EXPECT_EQ(::kill(before.pid, SIGKILL), 0);
  cluster::WorkerReport after;
  for (int i = 0; i < 900; ++i) {
    after = workers(state)[name].second;
    if (after.restarts == before.restarts + 1 && after.state == "ready") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(after.state, "ready") << name << " was not restarted";
  EXPECT_EQ(after.restarts, before.restarts + 1) << name;
  EXPECT_EQ(after.last_exit, "killed by signal 9") << name;
  return after.last_recovery_s;
}

class SlurmLauncher : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    SlurmCluster::Options options;
    slurm_ = SlurmCluster::start(options, &why);
    if (!slurm_) {
      if (why.find("daemon") != std::string::npos || why.find("log") != std::string::npos)
        FAIL() << why;
      GTEST_SKIP() << why;
    }
    dir_ = fs::temp_directory_path() / ("dserve-slurm-test-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    fs::permissions(dir_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
    base_ = testing_support::free_port_run(100);
    manifest_ = (dir_ / "m.yaml").string();
    common_ = "-f " + manifest_ + " --state-dir " + (dir_ / "state").string();
  }
  void TearDown() override {
    if (!slurm_) return;
    if (HasFailure()) std::fprintf(stderr, "%s\n", slurm_->logs_tail().c_str());
    (void)dserve("down " + common_ + " --stop-timeout-ms 20000");
    slurm_.reset();
    if (!HasFailure()) fs::remove_all(dir_);
  }

  std::unique_ptr<SlurmCluster> slurm_;
  fs::path dir_;
  int base_ = 0;
  std::string manifest_, common_;
};

TEST_F(SlurmLauncher, UpServesRestartsScalesAndEndsWithTheJob) {
  std::ofstream(manifest_) << manifest_text(base_, slurm_->partition());
  const auto up = dserve("up " + common_);
  ASSERT_EQ(up.exit_code, 0) << up.output << slurm_->logs_tail();
  EXPECT_NE(up.output.find("slurm job"), std::string::npos) << up.output;
  const fs::path state = dir_ / "state";
  // One node per component: the gateway, the prefill and the decode worker on three nodes.
  auto placed = workers(state);
  ASSERT_EQ(placed.size(), 3u) << up.output;
  std::set<std::string> nodes;
  for (const auto& [name, w] : placed)
    nodes.insert(w.first);
  EXPECT_EQ(nodes.size(), 3u) << up.output;

  const std::string grpc = "127.0.0.1:" + std::to_string(base_ + 1);
  auto client = api::ServingClient::connect(grpc, std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();
  const auto prompt = testing_support::random_prompt(60, 3);
  auto got =
      (*client)->generate(testing_support::request_for(prompt, 8), {}, std::chrono::seconds(60));
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_EQ(got->tokens, testing_support::reference_tokens(prompt, 8));

  auto status = dserve("status " + common_);
  EXPECT_EQ(status.exit_code, 0) << status.output;
  EXPECT_NE(status.output.find("RUNNING"), std::string::npos) << status.output;
  EXPECT_NE(status.output.find("step "), std::string::npos) << status.output;

  {
    testing_support::RequestStream stream(grpc, 3, 6, "slurm");
    ASSERT_TRUE(stream.wait_for_completions(5));
    const double decode_s = kill_and_wait_restart(state, "decode-0");
    EXPECT_TRUE(stream.wait_for_completions(5));
    const double prefill_s = kill_and_wait_restart(state, "prefill-0");
    EXPECT_TRUE(stream.wait_for_completions(5));
    const auto grow = dserve("scale decode=2 " + common_);
    EXPECT_EQ(grow.exit_code, 0) << grow.output;
    status = dserve("status " + common_);
    EXPECT_NE(status.output.find("pool decode   2 workers, 2 healthy"), std::string::npos)
        << status.output;
    EXPECT_TRUE(stream.wait_for_completions(5));
    const auto shrink = dserve("scale decode=1 " + common_);
    EXPECT_EQ(shrink.exit_code, 0) << shrink.output;
    EXPECT_TRUE(stream.wait_for_completions(5));
    stream.stop();
    const auto tally = stream.tally();
    const std::string failures = tally.failure_lines();
    std::fprintf(stderr,
                 "[ info ] slurm: decode-0 ready again %.2f s after SIGKILL, prefill-0 %.2f s; "
                 "stream: %zu exact, %zu wrong, %zu failed, %zu duplicates\n",
                 decode_s, prefill_s, tally.exact, tally.wrong, tally.failed, tally.duplicates);
    EXPECT_EQ(tally.wrong, 0u);
    EXPECT_EQ(tally.failed, 0u) << failures;
    EXPECT_EQ(tally.duplicates, 0u);
  }

  // scancel from outside: every process of the job goes, and requests in flight or sent after
  // it end with an error that says so.
  std::vector<pid_t> pids = all_pids(state);
  const std::string job = [&] {
    const std::string text = read_file(state / "state.json");
    const auto at = text.find("\"slurm_job\": \"");
    return at == std::string::npos ? std::string()
                                   : text.substr(at + 14, text.find('"', at + 14) - at - 14);
  }();
  ASSERT_FALSE(job.empty());
  testing_support::RequestStream late(grpc, 2, 6, "late");
  ASSERT_TRUE(late.wait_for_completions(2));
  const auto cancelled_at = std::chrono::steady_clock::now();
  ASSERT_EQ(slurm_->run("scancel " + job).exit_code, 0);
  bool gone = false;
  for (int i = 0; i < 600 && !gone; ++i) {
    gone = std::none_of(pids.begin(), pids.end(), [](pid_t p) { return p > 0 && alive(p); });
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double gone_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - cancelled_at).count();
  EXPECT_TRUE(gone) << "processes of the job still run 60 s after scancel";
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  late.stop();
  const auto after = late.tally();
  ASSERT_GT(after.failed, 0u);
  for (const auto& f : after.failures) {
    EXPECT_TRUE(f.find("UNAVAILABLE") != std::string::npos ||
                f.find("CANCELLED") != std::string::npos ||
                f.find("Unavailable") != std::string::npos)
        << f;
  }
  std::fprintf(stderr,
               "[ info ] slurm: scancel: %zu processes gone in %.2f s; %zu requests after it "
               "failed, e.g. %s\n",
               pids.size(), gone_s, after.failed, after.failures.front().c_str());
  EXPECT_EQ(after.wrong, 0u);
  // Slurm lists the job until its last step has reported (KillWait, then completing).
  for (int i = 0; i < 300 && !slurm_->jobs().empty(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(slurm_->jobs().empty());
  // The cluster is gone; down says so and forgets it.
  const auto down = dserve("down " + common_);
  EXPECT_EQ(down.exit_code, 0) << down.output;
  EXPECT_NE(down.output.find("slurm job " + job + " has already ended"), std::string::npos)
      << down.output;
}

TEST_F(SlurmLauncher, DownDrainsAndEndsTheJob) {
  std::ofstream(manifest_) << manifest_text(base_, slurm_->partition());
  const auto up = dserve("up " + common_);
  ASSERT_EQ(up.exit_code, 0) << up.output << slurm_->logs_tail();
  const fs::path state = dir_ / "state";
  std::vector<pid_t> pids = all_pids(state);
  EXPECT_EQ(pids.size(), 6u);
  const auto down = dserve("down " + common_);
  EXPECT_EQ(down.exit_code, 0) << down.output;
  EXPECT_NE(down.output.find("dserve: cluster down: 3 processes stopped"), std::string::npos)
      << down.output;
  EXPECT_TRUE(slurm_->jobs().empty());
  for (pid_t p : pids)
    EXPECT_FALSE(alive(p)) << "pid " << p << " still runs after down";
  EXPECT_FALSE(fs::exists(state / "state.json"));
}

// The job's time limit expiring stops everything the way scancel does (Slurm checks limits about
// twice a minute, so the limit is lowered below the time already run).
TEST_F(SlurmLauncher, AnExpiredTimeLimitStopsEverything) {
  std::ofstream(manifest_) << manifest_text(base_, slurm_->partition(), "  time_limit: \"10\"\n");
  const auto up = dserve("up " + common_);
  ASSERT_EQ(up.exit_code, 0) << up.output << slurm_->logs_tail();
  const fs::path state = dir_ / "state";
  std::vector<pid_t> pids = all_pids(state);
  const auto ids = slurm_->run("squeue -h -o %A");
  ASSERT_EQ(ids.exit_code, 0) << ids.output;
  std::istringstream components(ids.output);
  for (std::string id; components >> id;) {
    const auto updated = slurm_->run("scontrol update JobId=" + id + " TimeLimit=00:00:01");
    ASSERT_EQ(updated.exit_code, 0) << updated.output;
  }
  const auto lowered_at = std::chrono::steady_clock::now();
  bool gone = false;
  for (int i = 0; i < 1500 && !gone; ++i) {
    gone = slurm_->jobs().empty() &&
           std::none_of(pids.begin(), pids.end(), [](pid_t p) { return p > 0 && alive(p); });
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(gone) << "the job or its processes remain 150 s after its time limit passed";
  std::fprintf(
      stderr, "[ info ] slurm: time limit: job and processes gone %.1f s after it was lowered\n",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - lowered_at).count());
  std::string reasons;
  for (const auto& [node, r] : reports(state))
    reasons += r.end_reason + ";";
  EXPECT_NE(reasons.find("signal 15"), std::string::npos) << reasons;
  const auto down = dserve("down " + common_);
  EXPECT_EQ(down.exit_code, 0) << down.output;
  EXPECT_NE(down.output.find("has already ended"), std::string::npos) << down.output;
}

// on_pool_lost: fail-job: a decode pool that stays empty (no restarts allowed) ends the job,
// so that it does not hold its nodes.
TEST_F(SlurmLauncher, APoolLostForGoodEndsTheJobUnderFailJob) {
  std::ofstream(manifest_) << manifest_text(
      base_, slurm_->partition(), "", "",
      "  max_restarts: 0\n  on_pool_lost: fail-job\n  pool_lost_ms: 1500\n");
  const auto up = dserve("up " + common_);
  ASSERT_EQ(up.exit_code, 0) << up.output << slurm_->logs_tail();
  const fs::path state = dir_ / "state";
  std::vector<pid_t> pids = all_pids(state);
  const auto decode = workers(state)["decode-0"].second;
  ASSERT_GT(decode.pid, 0);
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(decode.pid, SIGKILL), 0);
  bool ended = false;
  for (int i = 0; i < 600 && !ended; ++i) {
    ended = slurm_->jobs().empty() &&
            std::none_of(pids.begin(), pids.end(), [](pid_t p) { return p > 0 && alive(p); });
    if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double ended_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  EXPECT_TRUE(ended) << "the job or its processes remain 60 s after the decode pool was lost";
  std::string reason;
  for (const auto& [node, r] : reports(state)) {
    if (r.end_reason.find("fail-job") != std::string::npos) reason = r.end_reason;
  }
  EXPECT_NE(reason, "") << "no agent says why the cluster ended";
  std::fprintf(stderr,
               "[ info ] slurm: fail-job: job and processes gone %.2f s after the kill (%s)\n",
               ended_s, reason.c_str());
  const auto status = dserve("status " + common_);
  EXPECT_NE(status.exit_code, 0);
  EXPECT_NE(status.output.find("no longer known to Slurm"), std::string::npos) << status.output;
}

TEST_F(SlurmLauncher, BrokenSettingsAreRefusedWithTheirLineAndStartNothing) {
  struct Case {
    std::string text;
    std::string reason;  // what Slurm says
    std::string where;   // the manifest line
  };
  const std::vector<Case> cases = {
      {manifest_text(base_, "nosuch"), "invalid partition", "m.yaml:5: slurm.partition"},
      {manifest_text(base_, slurm_->partition(), "", "    gres: gpu:1\n"),
       "Invalid generic resource (gres) specification", ": pools.decode.gres"},
      {manifest_text(base_, slurm_->partition(), "  time_limit: abc\n"),
       "Invalid --time specification", ": slurm.time_limit"},
  };
  // A process that cannot start: up says which and why, and the job is ended.
  {
    std::string text = manifest_text(base_, slurm_->partition());
    const std::string model = testing_support::tiny_dir();
    text.replace(text.find(model), model.size(), (dir_ / "no-such-model").string());
    std::ofstream(manifest_) << text;
    const auto up = dserve("up " + common_ + " --ready-timeout-ms 60000");
    EXPECT_EQ(up.exit_code, 1) << up.output;
    EXPECT_NE(up.output.find("before it was ready"), std::string::npos) << up.output;
    EXPECT_NE(up.output.find("no-such-model"), std::string::npos) << up.output;
    for (int i = 0; i < 300 && !slurm_->jobs().empty(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_TRUE(slurm_->jobs().empty());
    EXPECT_FALSE(fs::exists(dir_ / "state" / "state.json"));
  }
  for (const auto& c : cases) {
    std::ofstream(manifest_) << c.text;
    const auto up = dserve("up " + common_);
    EXPECT_EQ(up.exit_code, 2) << up.output;
    EXPECT_NE(up.output.find("Slurm refused the job"), std::string::npos) << up.output;
    EXPECT_NE(up.output.find(c.reason), std::string::npos) << up.output;
    EXPECT_NE(up.output.find(c.where), std::string::npos) << up.output;
    EXPECT_TRUE(slurm_->jobs().empty());
    EXPECT_FALSE(fs::exists(dir_ / "state" / "state.json"));
  }
}

}  // namespace
}  // namespace dserve
