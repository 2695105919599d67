// A cluster's life from its manifest under a steady stream of requests: `dserve up`, `status`,
// `scale decode=1 -> 3 -> 1` and `down`, each the real command on real processes. Every
// request the gateway admits must finish token-identical to the reference, each token once;
// the only other outcome allowed is a refusal once `down` has begun. Everything is counted.

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dserve/api/serving_client.h"
#include "dserve/cluster/node_agent.h"
#include "request_stream.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

namespace fs = std::filesystem;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::tiny_dir;

using testing_support::CommandResult;

// `dserve ARGS`, with its stderr.
CommandResult dserve(const std::string& args) {
  return testing_support::run_command(std::string(DSERVE_BINARY) + " " + args + " 2>&1");
}

using testing_support::read_file;

// The base of 100 free ports in a row, the same for the whole test process (the manifests
// below name their ports).
int base_port() {
  static const int base = testing_support::free_port_run(100);
  return base;
}

std::string manifest_text(int base) {
  return "version: 1\n"
         "mode: disaggregated\n"
         "model:\n"
         "  path: " +
         tiny_dir() +
         "\n"
         "nodes:\n"
         "  - name: local\n"
         "    address: 127.0.0.1\n"
         "    devices: 0\n"
         "    base_port: " +
         std::to_string(base) +
         "\n"
         "gateway:\n"
         "  node: local\n"
         "pools:\n"
         "  prefill:\n"
         "    replicas: 1\n"
         "    placement: local\n"
         "    devices_per_replica: 0\n"
         "  decode:\n"
         "    replicas: 1\n"
         "    placement: local\n"
         "    devices_per_replica: 0\n"
         "    kv_budget_mib: 64\n"
         "network:\n"
         "  ucx_transports: [tcp]\n"
         "  ucx_net_devices: [lo]\n"
         "  metrics_port_offset: 50\n"
         "timeouts:\n"
         "  ready_ms: 60000\n";
}

// What one request of the stream ended as.
struct Tally {
  std::mutex mu;
  size_t exact = 0;            // completed, token-identical to the reference
  size_t wrong = 0;            // completed with other tokens
  size_t refused_in_down = 0;  // refused (not admitted) after `down` began
  size_t failed = 0;           // anything else: lost
  std::vector<std::string> failures;
  std::set<std::string> completed_ids;
  std::vector<std::string> refused_ids;
  size_t duplicate_ids = 0;
};

TEST(Lifecycle, UpStatusScaleDownUnderSteadyStreamLosesNothing) {
  const fs::path dir =
      fs::temp_directory_path() / ("dserve-lifecycle-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string manifest = (dir / "cluster.yaml").string();
  const int base = base_port();
  std::ofstream(manifest) << manifest_text(base);
  const std::string common = "-f " + manifest + " --state-dir " + (dir / "state").string();

  const CommandResult up = dserve("up " + common);
  ASSERT_EQ(up.exit_code, 0) << up.output;
  EXPECT_NE(up.output.find("dserve: cluster up: 3 processes"), std::string::npos) << up.output;
  // base_port: the gateway's control port, then its gRPC port, then prefill-0, decode-0.
  const std::string grpc = "127.0.0.1:" + std::to_string(base + 1);
  auto client = api::ServingClient::connect(grpc, std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();

  // The stream: 3 clients sending one request after another until told to stop.
  constexpr uint32_t kMaxTokens = 6;
  std::atomic<bool> stop{false};
  std::atomic<bool> down_begun{false};
  Tally tally;
  std::vector<std::thread> clients;
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&, c] {
      for (uint64_t i = 0; !stop.load(); ++i) {
        const uint64_t seed = 1000 * static_cast<uint64_t>(c) + i;
        const auto prompt = random_prompt(static_cast<int64_t>(1 + (seed * 37) % 300), seed);
        v1::GenerateRequest req = testing_support::request_for(prompt, kMaxTokens);
        const std::string id = "life-" + std::to_string(c) + "-" + std::to_string(i);
        req.set_request_id(id);
        const bool during_down = down_begun.load();
        auto got = (*client)->generate(req, {}, std::chrono::seconds(60));
        std::lock_guard<std::mutex> lock(tally.mu);
        if (got.is_ok()) {
          if (!tally.completed_ids.insert(id).second) ++tally.duplicate_ids;
          if (got->tokens == reference_tokens(prompt, kMaxTokens)) {
            ++tally.exact;
          } else {
            ++tally.wrong;
          }
        } else if ((during_down || down_begun.load()) &&
                   (got.status().code() == StatusCode::kUnavailable ||
                    got.status().code() == StatusCode::kCancelled)) {
          // Refused at admission ("shutting down"), a call the stopping gRPC server never
          // started, or the gateway already gone. Checked below against the gateway's log: no
          // such request may have been admitted.
          ++tally.refused_in_down;
          tally.refused_ids.push_back(id);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        } else {
          ++tally.failed;
          tally.failures.push_back(id + ": " + got.status().to_string());
        }
      }
    });
  }
  auto wait_for_completions = [&](size_t more) {
    size_t start;
    {
      std::lock_guard<std::mutex> lock(tally.mu);
      start = tally.exact + tally.wrong;
    }
    for (int i = 0; i < 600; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      std::lock_guard<std::mutex> lock(tally.mu);
      if (tally.exact + tally.wrong >= start + more) return;
    }
  };
  wait_for_completions(5);

  CommandResult status = dserve("status " + common);
  EXPECT_EQ(status.exit_code, 0) << status.output;
  EXPECT_NE(status.output.find("pool decode   1 workers, 1 healthy"), std::string::npos)
      << status.output;
  EXPECT_NE(status.output.find("pool prefill  1 workers, 1 healthy"), std::string::npos)
      << status.output;
  EXPECT_NE(status.output.find("decode-0"), std::string::npos) << status.output;

  const CommandResult grow = dserve("scale decode=3 " + common);
  ASSERT_EQ(grow.exit_code, 0) << grow.output;
  EXPECT_NE(grow.output.find("dserve: pool decode has 3 workers"), std::string::npos)
      << grow.output;
  status = dserve("status " + common);
  EXPECT_EQ(status.exit_code, 0) << status.output;
  EXPECT_NE(status.output.find("pool decode   3 workers, 3 healthy"), std::string::npos)
      << status.output;
  // Traffic reaches the new workers: checked as the stream goes on, up to a minute, not after
  // a fixed number of requests (a fast decode worker finishes those before a new worker's
  // first health probe).
  std::map<std::string, uint64_t> placed;
  for (int i = 0; i < 600; ++i) {
    auto st = (*client)->status();
    ASSERT_TRUE(st.is_ok()) << st.status().to_string();
    placed.clear();
    for (const auto& w : st->workers()) {
      if (w.role() == "decode") placed[w.address()] = w.placed_total();
    }
    if (placed.size() == 3 &&
        std::all_of(placed.begin(), placed.end(), [](const auto& p) { return p.second > 0; }))
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(placed.size(), 3u);
  for (const auto& [address, n] : placed)
    EXPECT_GT(n, 0u) << "decode worker " << address << " got no request after scale";

  const CommandResult shrink = dserve("scale decode=1 " + common);
  ASSERT_EQ(shrink.exit_code, 0) << shrink.output;
  EXPECT_NE(shrink.output.find("dserve: pool decode has 1 workers"), std::string::npos)
      << shrink.output;
  status = dserve("status " + common);
  EXPECT_NE(status.output.find("pool decode   1 workers, 1 healthy"), std::string::npos)
      << status.output;
  wait_for_completions(5);

  // Counted before down: everything the gateway admitted so far.
  auto st = (*client)->status();
  ASSERT_TRUE(st.is_ok()) << st.status().to_string();
  EXPECT_EQ(st->failed(), 0u);

  down_begun = true;
  const CommandResult down = dserve("down " + common);
  EXPECT_EQ(down.exit_code, 0) << down.output;
  EXPECT_NE(down.output.find("dserve: cluster down: 3 processes stopped"), std::string::npos)
      << down.output;
  stop = true;
  for (auto& t : clients)
    t.join();

  std::string failures;
  for (const auto& f : tally.failures)
    failures += f + "\n";
  std::fprintf(stderr,
               "[ info ] lifecycle: %zu exact, %zu wrong, %zu lost, %zu refused during down, "
               "%zu duplicate ids; gateway counters before down: admitted %llu completed %llu\n",
               tally.exact, tally.wrong, tally.failed, tally.refused_in_down, tally.duplicate_ids,
               static_cast<unsigned long long>(st->admitted()),
               static_cast<unsigned long long>(st->completed()));
  EXPECT_GT(tally.exact, 40u);
  EXPECT_EQ(tally.wrong, 0u);
  EXPECT_EQ(tally.failed, 0u) << failures;
  EXPECT_EQ(tally.duplicate_ids, 0u);
  // A request refused during down was never admitted: the gateway's log (JSON lines) has no
  // "admitted" event for it.
  std::set<std::string> admitted;
  {
    std::ifstream log(dir / "state" / "logs" / "gateway.log");
    for (std::string line; std::getline(log, line);) {
      if (line.find("\"event\":\"admitted\"") == std::string::npos) continue;
      const auto at = line.find("\"request_id\":\"");
      if (at == std::string::npos) continue;
      const auto start = at + 14;
      admitted.insert(line.substr(start, line.find('"', start) - start));
    }
  }
  EXPECT_GE(admitted.size(), tally.exact) << "the gateway log lacks admitted events";
  for (const auto& id : tally.refused_ids)
    EXPECT_FALSE(admitted.count(id)) << id << " was admitted but did not complete";
  // Nothing of the cluster is left running, and `status` says it is down.
  status = dserve("status " + common);
  EXPECT_NE(status.exit_code, 0);
  EXPECT_NE(status.output.find("no cluster is up"), std::string::npos) << status.output;
  if (!HasFailure()) fs::remove_all(dir);
}

// A node with `ssh: root@127.0.0.1`: up, scale and down reach its processes through a real
// sshd started here on loopback (needs root and openssh-server; skipped, saying why, without).
TEST(Lifecycle, NodesWithSshAreStartedAndStoppedThroughSsh) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (sshd, root login)";
  if (!fs::exists("/usr/sbin/sshd")) GTEST_SKIP() << "needs /usr/sbin/sshd (openssh-server)";
  const fs::path dir = fs::temp_directory_path() / ("dserve-ssh-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int base = base_port() + 60;
  const int ssh_port = base + 30;
  const std::string d = dir.string();
  ASSERT_EQ(
      std::system(("ssh-keygen -q -t ed25519 -N '' -f " + d + "/host_key && " +
                   "ssh-keygen -q -t ed25519 -N '' -f " + d + "/id && cp " + d + "/id.pub " + d +
                   "/authorized_keys && chmod 600 " + d + "/authorized_keys && mkdir -p /run/sshd")
                      .c_str()),
      0);
  std::ofstream(dir / "sshd_config") << "Port " << ssh_port << "\nListenAddress 127.0.0.1\n"
                                     << "HostKey " << d << "/host_key\n"
                                     << "AuthorizedKeysFile " << d << "/authorized_keys\n"
                                     << "PidFile " << d << "/sshd.pid\n"
                                     << "PermitRootLogin prohibit-password\n"
                                     << "PasswordAuthentication no\n"
                                     << "KbdInteractiveAuthentication no\nUsePAM no\n"
                                     << "StrictModes no\n";
  const pid_t sshd = ::fork();
  if (sshd == 0) {
    // Its sessions must not hold this test's output open (ctest waits for it).
    const int null_fd = ::open("/dev/null", O_RDWR);
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    ::dup2(null_fd, 2);
    ::execl("/usr/sbin/sshd", "/usr/sbin/sshd", "-D", "-f", (d + "/sshd_config").c_str(), "-E",
            (d + "/sshd.log").c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  struct StopSshd {
    pid_t pid;
    std::string ssh;
    ~StopSshd() {
      if (!ssh.empty()) {
        (void)std::system((ssh + " -O exit root@127.0.0.1 >/dev/null 2>&1").c_str());
      }
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
  } stop_sshd{sshd, ""};
  const std::string ssh =
      "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o "
      "UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i " +
      d + "/id -p " + std::to_string(ssh_port) + " -o ControlPath=" + d + "/ssh-%C";
  bool reachable = false;
  for (int i = 0; i < 100 && !reachable; ++i) {
    reachable = std::system((ssh + " root@127.0.0.1 true >/dev/null 2>&1").c_str()) == 0;
    if (!reachable) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(reachable) << "sshd on 127.0.0.1:" << ssh_port << " does not let us in";
  // One connection that every command of the test goes through (ControlPath above): each ssh
  // handshake costs CPU time that a loaded 2-core machine does not have. In the background,
  // holding none of our pipes; it ends with sshd.
  ASSERT_EQ(std::system((ssh + " -o ControlMaster=yes -o ControlPersist=120 -fN root@127.0.0.1 "
                               "</dev/null >/dev/null 2>&1")
                            .c_str()),
            0);
  stop_sshd.ssh = ssh;

  std::string text = manifest_text(base);
  text.replace(text.find("    base_port:"), 0,
               "    ssh: root@127.0.0.1\n    program: " + std::string(DSERVE_BINARY) + "\n");
  const std::string manifest = d + "/cluster.yaml";
  std::ofstream(manifest) << text;
  const std::string common = "-f " + manifest + " --state-dir " + d + "/state";
  const std::string ssh_flag = " --ssh '" + ssh + "'";

  const CommandResult up = dserve("up " + common + ssh_flag);
  ASSERT_EQ(up.exit_code, 0) << up.output;
  auto client = api::ServingClient::connect("127.0.0.1:" + std::to_string(base + 1),
                                            std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();
  const auto prompt = random_prompt(40, 7);
  auto got =
      (*client)->generate(testing_support::request_for(prompt, 5), {}, std::chrono::seconds(60));
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_EQ(got->tokens, reference_tokens(prompt, 5));

  const CommandResult grow = dserve("scale decode=2 " + common + ssh_flag);
  EXPECT_EQ(grow.exit_code, 0) << grow.output;
  const CommandResult status = dserve("status " + common);
  EXPECT_NE(status.output.find("pool decode   2 workers, 2 healthy"), std::string::npos)
      << status.output;
  // Every process was started through sshd (one accepted login per ssh command at least).
  const std::string sshd_log = read_file(dir / "sshd.log");
  EXPECT_NE(sshd_log.find("Accepted publickey for root"), std::string::npos) << sshd_log;

  // Supervision by the node's agent (started over ssh): decode-0 killed with SIGKILL under a
  // steady stream is restarted, the gateway re-admits it (a new epoch), and every request the
  // stream sent completes token-identical, once.
  auto worker = [&](const std::string& name) {
    cluster::WorkerReport found;
    auto report = cluster::report_from_json(read_file(dir / "state" / "agents" / "local.json"));
    if (report.is_ok()) {
      for (const auto& w : report->workers) {
        if (w.name == name) found = w;
      }
    }
    return found;
  };
  {
    testing_support::RequestStream stream("127.0.0.1:" + std::to_string(base + 1), 2, 5, "ssh");
    EXPECT_TRUE(stream.wait_for_completions(3));
    const cluster::WorkerReport before = worker("decode-0");
    ASSERT_EQ(before.state, "ready");
    ASSERT_GT(before.pid, 0);
    ASSERT_EQ(::kill(before.pid, SIGKILL), 0);
    cluster::WorkerReport after;
    for (int i = 0; i < 600 && !(after.restarts == before.restarts + 1 && after.state == "ready");
         ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      after = worker("decode-0");
    }
    EXPECT_EQ(after.state, "ready");
    EXPECT_EQ(after.restarts, before.restarts + 1);
    EXPECT_NE(after.pid, before.pid);
    EXPECT_EQ(after.last_exit, "killed by signal 9");
    EXPECT_TRUE(stream.wait_for_completions(5));
    stream.stop();
    const auto tally = stream.tally();
    const std::string failures = tally.failure_lines();
    std::fprintf(stderr,
                 "[ info ] ssh agent: decode-0 ready again %.2f s after SIGKILL; stream: %zu "
                 "exact, %zu wrong, %zu failed, %zu duplicates\n",
                 after.last_recovery_s, tally.exact, tally.wrong, tally.failed, tally.duplicates);
    EXPECT_EQ(tally.wrong, 0u);
    EXPECT_EQ(tally.failed, 0u) << failures;
    EXPECT_EQ(tally.duplicates, 0u);
    EXPECT_GT(tally.exact, 5u);
  }

  // The processes' first pids (state.json: 4 processes and the node's agent) and the restarted
  // decode-0's: all gone after down.
  std::vector<pid_t> pids;
  {
    const std::string json = read_file(dir / "state" / "state.json");
    for (size_t at = json.find("\"pid\": "); at != std::string::npos;
         at = json.find("\"pid\": ", at + 1))
      pids.push_back(static_cast<pid_t>(std::stol(json.substr(at + 7))));
  }
  EXPECT_EQ(pids.size(), 5u);
  pids.push_back(worker("decode-0").pid);
  const CommandResult down = dserve("down " + common);
  EXPECT_EQ(down.exit_code, 0) << down.output;
  for (pid_t pid : pids) {
    // Gone, or a zombie its new parent has not reaped yet.
    EXPECT_FALSE(testing_support::process_alive(pid)) << "pid " << pid << " still runs after down";
  }
  if (!HasFailure()) fs::remove_all(dir);
}

// A node marked `agent: systemd` has an agent its service manager started (here: this test,
// as cluster/systemd/dserve-agent@.service would): up only writes the plan it follows, down
// empties it; the agent outlives both and runs the next up.
TEST(Lifecycle, AgentOfTheServiceManagerFollowsUpAndDown) {
  const fs::path dir =
      fs::temp_directory_path() / ("dserve-lifecycle-agent-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int base = base_port() + 20;
  std::string text = manifest_text(base);
  text.replace(text.find("    base_port:"), 0, "    agent: systemd\n");
  const std::string manifest = (dir / "cluster.yaml").string();
  std::ofstream(manifest) << text;
  const fs::path state = dir / "state";
  const std::string common = "-f " + manifest + " --state-dir " + state.string();

  const pid_t agent = ::fork();
  if (agent == 0) {
    const int null_fd = ::open("/dev/null", O_RDWR);
    const int log_fd = ::open((dir / "agent.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    ::dup2(log_fd, 2);
    ::execl(DSERVE_BINARY, DSERVE_BINARY, "agent", "--state-dir", state.c_str(), "--node", "local",
            "--plan-wait-ms", "600000", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ASSERT_GT(agent, 0);
  auto report = [&] {
    return cluster::report_from_json(read_file(state / "agents" / "local.json"));
  };
  for (int round = 0; round < 2; ++round) {
    const CommandResult up = dserve("up " + common);
    ASSERT_EQ(up.exit_code, 0) << up.output << read_file(dir / "agent.log");
    auto client = api::ServingClient::connect("127.0.0.1:" + std::to_string(base + 1),
                                              std::chrono::seconds(10));
    ASSERT_TRUE(client.is_ok()) << client.status().to_string();
    const auto prompt = random_prompt(30, 11 + static_cast<uint64_t>(round));
    auto got =
        (*client)->generate(testing_support::request_for(prompt, 5), {}, std::chrono::seconds(60));
    ASSERT_TRUE(got.is_ok()) << got.status().to_string();
    EXPECT_EQ(got->tokens, reference_tokens(prompt, 5));
    auto before = report();
    ASSERT_TRUE(before.is_ok()) << before.status().to_string();
    EXPECT_EQ(before->pid, agent);
    EXPECT_EQ(before->workers.size(), 3u);
    std::vector<pid_t> pids;
    for (const auto& w : before->workers)
      pids.push_back(w.pid);
    const CommandResult down = dserve("down " + common);
    EXPECT_EQ(down.exit_code, 0) << down.output;
    EXPECT_NE(down.output.find("dserve: cluster down: 3 processes stopped"), std::string::npos)
        << down.output;
    for (pid_t pid : pids) {
      EXPECT_FALSE(testing_support::process_alive(pid))
          << "pid " << pid << " still runs after down";
    }
    // The agent stays, with nothing to run.
    EXPECT_EQ(::waitpid(agent, nullptr, WNOHANG), 0) << read_file(dir / "agent.log");
    auto after = report();
    ASSERT_TRUE(after.is_ok());
    EXPECT_TRUE(after->workers.empty());
  }
  ::kill(agent, SIGTERM);
  int status = 0;
  ASSERT_EQ(::waitpid(agent, &status, 0), agent);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  if (!HasFailure()) fs::remove_all(dir);
}

// The state directory of a cluster that went down serves the next up: the old agents' reports
// (ended) and plan say nothing of the new cluster.
TEST(Lifecycle, UpAfterDownInTheSameStateDirectory) {
  const fs::path dir =
      fs::temp_directory_path() / ("dserve-lifecycle-again-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int base = base_port() + 30;
  const std::string manifest = (dir / "cluster.yaml").string();
  std::ofstream(manifest) << manifest_text(base);
  const std::string common = "-f " + manifest + " --state-dir " + (dir / "state").string();
  for (int round = 0; round < 2; ++round) {
    const CommandResult up = dserve("up " + common);
    ASSERT_EQ(up.exit_code, 0) << "round " << round << ": " << up.output;
    auto client = api::ServingClient::connect("127.0.0.1:" + std::to_string(base + 1),
                                              std::chrono::seconds(10));
    ASSERT_TRUE(client.is_ok()) << client.status().to_string();
    const auto prompt = random_prompt(20, 40 + static_cast<uint64_t>(round));
    auto got =
        (*client)->generate(testing_support::request_for(prompt, 4), {}, std::chrono::seconds(60));
    ASSERT_TRUE(got.is_ok()) << got.status().to_string();
    EXPECT_EQ(got->tokens, reference_tokens(prompt, 4));
    const CommandResult down = dserve("down " + common);
    ASSERT_EQ(down.exit_code, 0) << down.output;
  }
  if (!HasFailure()) fs::remove_all(dir);
}

TEST(Lifecycle, UpRefusesWhatItCannotRunAndStartsNothing) {
  const fs::path dir =
      fs::temp_directory_path() / ("dserve-lifecycle-bad-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string manifest = (dir / "cluster.yaml").string();
  // A model directory that does not exist: the workers fail to start; up says which and why,
  // and stops what it started.
  std::string text = manifest_text(base_port() + 50);
  text.replace(text.find(tiny_dir()), tiny_dir().size(), (dir / "no-such-model").string());
  std::ofstream(manifest) << text;
  const std::string common = "-f " + manifest + " --state-dir " + (dir / "state").string();
  const CommandResult up = dserve("up " + common + " --ready-timeout-ms 20000");
  EXPECT_EQ(up.exit_code, 1) << up.output;
  EXPECT_NE(up.output.find("before it was ready"), std::string::npos) << up.output;
  EXPECT_NE(up.output.find("no-such-model"), std::string::npos) << up.output;
  EXPECT_FALSE(fs::exists(dir / "state" / "state.json"));
  // A pool that does not exist, and a bad count.
  std::ofstream(manifest) << manifest_text(base_port() + 50);
  CommandResult scale = dserve("scale experts=2 " + common);
  EXPECT_EQ(scale.exit_code, 2) << scale.output;
  EXPECT_NE(scale.output.find("the manifest has no pool 'experts' (it has prefill, decode)"),
            std::string::npos)
      << scale.output;
  // Counts outside 1..4096 (the manifest's own cap on replicas) are refused before anything
  // is started; 99999 used to be accepted and start workers one a second.
  for (const char* count : {"0", "99999"}) {
    scale = dserve(std::string("scale decode=") + count + " " + common);
    EXPECT_EQ(scale.exit_code, 2) << scale.output;
    EXPECT_NE(scale.output.find("1 <= N <= 4096"), std::string::npos) << scale.output;
  }
  // A token file without an admin token: the commands could not manage the pools, so up refuses
  // before starting anything.
  const fs::path tokens = dir / "tokens";
  std::ofstream(tokens) << "alice alice-tok-7d1c0e9a55b3\n";
  ASSERT_EQ(::chmod(tokens.c_str(), 0600), 0);
  std::ofstream(manifest) << manifest_text(base_port() + 50)
                          << "security:\n  token_file: " << tokens.string() << "\n";
  const CommandResult no_admin = dserve("up " + common);
  EXPECT_EQ(no_admin.exit_code, 2) << no_admin.output;
  EXPECT_NE(no_admin.output.find("has no admin token"), std::string::npos) << no_admin.output;
  EXPECT_FALSE(fs::exists(dir / "state" / "state.json"));
  std::ofstream(manifest) << manifest_text(base_port() + 50);
  // A manifest that is not a regular file is refused before a byte is read: /dev/zero used to
  // be read until memory ran out, and a FIFO with no writer blocked `up` for good.
  const fs::path fifo = dir / "cluster.fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const auto& [path, kind] :
       {std::pair<std::string, std::string>{"/dev/zero", "a character device"},
        {fifo.string(), "a FIFO"}}) {
    const CommandResult refused =
        dserve("up -f " + path + " --state-dir " + (dir / "state").string());
    EXPECT_EQ(refused.exit_code, 2) << refused.output;
    EXPECT_NE(refused.output.find("manifest '" + path + "' is " + kind), std::string::npos)
        << refused.output;
  }
  const CommandResult down = dserve("down " + common);
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_NE(down.output.find("no cluster is up"), std::string::npos) << down.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace dserve
