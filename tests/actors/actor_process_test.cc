// Two real processes over loopback: this test and actor_peer (started with fork+exec), which
// publishes the decode stand-in. Checks 1,000 round trips, that the peer listens on nothing
// but its control address, that a request to a SIGKILLed peer fails fast with a clear error,
// and that a restarted peer is reached through a new connection and reports a new epoch.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/decode_interface.h"
#include "fake_roles.h"

namespace dserve::actors {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// One actor_peer child process. Kills it (SIGKILL) on destruction if still running.
class PeerProcess {
 public:
  // Starts the peer with `--port port` and waits (at most 10 s) for its READY line.
  static std::unique_ptr<PeerProcess> start(uint16_t port) {
    int fds[2];
    if (pipe(fds) != 0) return nullptr;
    const std::string port_arg = std::to_string(port);
    pid_t pid = fork();
    if (pid < 0) return nullptr;
    if (pid == 0) {
      // The peer dies with the test, even if the test crashes before killing it.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      dup2(fds[1], STDOUT_FILENO);
      close(fds[0]);
      close(fds[1]);
      const char* argv[] = {DSERVE_ACTOR_PEER_PATH, "--port", port_arg.c_str(), nullptr};
      execv(argv[0], const_cast<char* const*>(argv));
      _exit(127);
    }
    close(fds[1]);
    auto peer = std::unique_ptr<PeerProcess>(new PeerProcess(pid));
    std::string line = read_line(fds[0], 10'000);
    close(fds[0]);
    unsigned p = 0;
    unsigned long long epoch = 0;
    int reported_pid = 0;
    if (std::sscanf(line.c_str(), "READY port=%u epoch=%llu pid=%d", &p, &epoch, &reported_pid) !=
            3 ||
        reported_pid != pid) {
      ADD_FAILURE() << "actor_peer did not report READY, got: '" << line << "'";
      return nullptr;
    }
    peer->port_ = static_cast<uint16_t>(p);
    peer->epoch_ = epoch;
    return peer;
  }

  ~PeerProcess() { kill_hard(); }

  void kill_hard() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  pid_t pid() const { return pid_; }
  uint16_t port() const { return port_; }
  Epoch epoch() const { return epoch_; }

 private:
  explicit PeerProcess(pid_t pid) : pid_(pid) {}

  static std::string read_line(int fd, int timeout_ms) {
    std::string line;
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (Clock::now() < deadline) {
      pollfd pfd{fd, POLLIN, 0};
      int left = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (poll(&pfd, 1, left > 0 ? left : 0) <= 0) break;
      char c = 0;
      if (read(fd, &c, 1) != 1) break;
      if (c == '\n') break;
      line.push_back(c);
    }
    return line;
  }

  pid_t pid_;
  uint16_t port_ = 0;
  Epoch epoch_ = 0;
};

// "address:port" (hex, as the kernel writes them) of every TCP socket in LISTEN state that
// process `pid` owns, read from /proc.
std::vector<std::string> listening_sockets(pid_t pid) {
  std::set<std::string> inodes;
  const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
  for (const auto& entry : std::filesystem::directory_iterator(fd_dir)) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(entry.path(), ec).string();
    if (!ec && target.rfind("socket:[", 0) == 0) inodes.insert(target.substr(8, target.size() - 9));
  }
  std::vector<std::string> out;
  for (const char* table : {"tcp", "tcp6"}) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/net/" + table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string sl, local, remote, state, queues, timer, retr, uid, timeout, inode;
      fields >> sl >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >>
          inode;
      if (state == "0A" && inodes.count(inode)) out.push_back(local);
    }
  }
  return out;
}

std::unique_ptr<ActorRuntime> start_gateway() {
  RuntimeConfig cfg;
  cfg.role = Role::kGateway;
  cfg.scheduler_threads = 1;
  auto rt = ActorRuntime::start(cfg);
  EXPECT_TRUE(rt.is_ok()) << rt.status().to_string();
  return std::move(rt).value();
}

TEST(ActorProcessTest, PeerListensOnlyOnItsControlAddress) {
  auto peer = PeerProcess::start(0);
  ASSERT_NE(peer, nullptr);
  char expected[32];
  std::snprintf(expected, sizeof(expected), "0100007F:%04X", peer->port());  // 127.0.0.1
  auto sockets = listening_sockets(peer->pid());
  ASSERT_EQ(sockets.size(), 1u);
  EXPECT_EQ(sockets[0], expected);
}

TEST(ActorProcessTest, ThousandRequestsThenKillThenRestartWithNewEpoch) {
  auto gateway = start_gateway();
  auto peer = PeerProcess::start(0);
  ASSERT_NE(peer, nullptr);
  const uint16_t port = peer->port();
  const Epoch first_epoch = peer->epoch();

  auto decode = gateway->connect<DecodeActor>("127.0.0.1", port);
  ASSERT_TRUE(decode.is_ok()) << decode.status().to_string();

  // 1,000 round trips; every 10th asks for more than the peer's 4096 tokens and is refused.
  ReservationId last_id = 0;
  auto t0 = Clock::now();
  for (uint32_t i = 0; i < 1000; ++i) {
    const bool too_big = i % 10 == 9;
    ReserveRequest req{1000 + i, too_big ? 5000u : i % 2000, 16, 0, {}};
    auto reply = gateway->call<ReserveReply>(*decode, req, 2000ms);
    ASSERT_TRUE(reply.is_ok()) << "request " << i << ": " << reply.status().to_string();
    ASSERT_EQ(reply->request_id, 1000u + i);
    ASSERT_EQ(reply->decode_epoch, first_epoch);
    if (too_big) {
      ASSERT_EQ(reply->outcome, ReserveOutcome::kRefused);
      ASSERT_FALSE(reply->reason.empty());
    } else {
      ASSERT_EQ(reply->outcome, ReserveOutcome::kGranted) << reply->reason;
      ASSERT_GT(reply->reservation_id, last_id);
      last_id = reply->reservation_id;
      ASSERT_EQ(reply->transfer_keys.size(), 16u);
    }
  }
  auto per_request_us =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count() / 1000;
  std::printf("1000 round trips to another process: %lld us per request\n",
              static_cast<long long>(per_request_us));

  // SIGKILL: the next request fails with an error naming the peer, long before its timeout
  // (the connection drop is the signal, not the clock).
  peer->kill_hard();
  auto t1 = Clock::now();
  auto dead = gateway->call<HealthReport>(*decode, HealthProbe{Role::kGateway, 0, 0}, 5000ms);
  auto waited = Clock::now() - t1;
  ASSERT_FALSE(dead.is_ok());
  EXPECT_EQ(dead.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(dead.status().message().find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << dead.status().message();
  EXPECT_LT(waited, 2000ms) << "a request to a dead peer must fail when its connection drops";
  std::printf(
      "request to the killed peer failed after %lld ms: %s\n",
      static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()),
      dead.status().message().c_str());

  // Nobody listens now: connecting fails quickly and says where.
  auto refused = gateway->connect<DecodeActor>("127.0.0.1", port, 2000ms);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("127.0.0.1:" + std::to_string(port)),
            std::string::npos);

  // Restart on the same port: a new connection reaches a new incarnation with a new epoch.
  auto restarted = PeerProcess::start(port);
  ASSERT_NE(restarted, nullptr);
  ASSERT_EQ(restarted->port(), port);
  EXPECT_NE(restarted->epoch(), first_epoch);
  auto decode2 = gateway->connect<DecodeActor>("127.0.0.1", port);
  ASSERT_TRUE(decode2.is_ok()) << decode2.status().to_string();
  auto health = gateway->call<HealthReport>(*decode2, HealthProbe{Role::kGateway, 0, 0});
  ASSERT_TRUE(health.is_ok()) << health.status().to_string();
  EXPECT_EQ(health->epoch, restarted->epoch());
  EXPECT_NE(health->epoch, first_epoch);

  // The old handle stays dead: it never silently reaches the new incarnation.
  auto stale = gateway->call<HealthReport>(*decode, HealthProbe{Role::kGateway, 0, 0}, 1000ms);
  EXPECT_FALSE(stale.is_ok());
}

TEST(ActorProcessTest, RequestInFlightFailsWhenThePeerDies) {
  auto gateway = start_gateway();
  auto peer = PeerProcess::start(0);
  ASSERT_NE(peer, nullptr);
  auto decode = gateway->connect<DecodeActor>("127.0.0.1", peer->port());
  ASSERT_TRUE(decode.is_ok()) << decode.status().to_string();
  // The peer holds this request without answering; it dies 200 ms later.
  std::thread killer([&] {
    std::this_thread::sleep_for(200ms);
    peer->kill_hard();
  });
  auto t0 = Clock::now();
  auto r = gateway->call<ReserveReply>(*decode, ReserveRequest{1, 1, testing::kHoldForever, 0, {}},
                                       10'000ms);
  auto waited = Clock::now() - t0;
  killer.join();
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("peer is down"), std::string::npos) << r.status().message();
  EXPECT_LT(waited, 2000ms) << "an in-flight request must fail when the peer's connection drops, "
                               "not at its 10 s timeout";
}

TEST(ActorProcessTest, SilentPeerTimesOutWithAClearError) {
  auto gateway = start_gateway();
  auto peer = PeerProcess::start(0);
  ASSERT_NE(peer, nullptr);
  auto decode = gateway->connect<DecodeActor>("127.0.0.1", peer->port());
  ASSERT_TRUE(decode.is_ok()) << decode.status().to_string();
  auto t0 = Clock::now();
  auto r = gateway->call<ReserveReply>(*decode, ReserveRequest{1, 1, testing::kHoldForever, 0, {}},
                                       300ms);
  auto waited = Clock::now() - t0;
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().message(), "request to 127.0.0.1:" + std::to_string(peer->port()) +
                                      " failed: no reply within 300 ms");
  EXPECT_LT(waited, 1500ms);
}

}  // namespace
}  // namespace dserve::actors
