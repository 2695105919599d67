#include "dserve/cluster/node_agent.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "process_util.h"

namespace dserve::cluster {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

using internal::start_ticks_of;

std::atomic<int> g_stop_signal{0};

void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
}

void log_line(const std::string& node, const std::string& text) {
  std::fprintf(stderr, "dserve agent: [%s] %s\n", node.c_str(), text.c_str());
  std::fflush(stderr);
}

// Whether a process's stdout holds its "dserve: serving ..." line.
bool has_ready_line(const std::string& out_path) {
  std::ifstream in(out_path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("dserve: serving ", 0) == 0) return true;
  }
  return false;
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "ended (status " + std::to_string(status) + ")";
}

// One worker the agent runs.
struct Worker {
  PlannedProcess planned;
  WorkerReport report;
  Clock::time_point next_start{};               // backoff: when to start it again
  Clock::time_point died{};                     // its last death, for the recovery figure
  Clock::time_point stop_sent{};                // stopping: when SIGTERM went
  std::deque<Clock::time_point> restart_times;  // within the restart window
  bool was_restarted = false;
};

class Agent {
 public:
  explicit Agent(AgentOptions options) : o_(std::move(options)) {
    report_.node = o_.node;
    report_.pid = ::getpid();
  }

  int run();

 private:
  bool load_current_plan();
  void follow_plan();
  void start(Worker& w);
  void reap();
  void on_death(Worker& w, int status);
  void advance();
  void stop_all(milliseconds timeout);
  void end_cluster(const std::string& reason);
  void write_report();

  AgentOptions o_;
  ClusterPlan plan_;
  bool have_plan_ = false;
  struct PlanFileId {
    ino_t inode = 0;
    off_t size = 0;
    time_t mtime_s = 0;
    long mtime_ns = 0;
    bool operator==(const PlanFileId&) const = default;
  };
  PlanFileId plan_file_;                   // the plan.json plan_ was read from
  std::map<std::string, Worker> workers_;  // by process name
  AgentReport report_;
  std::string last_written_;
  Clock::time_point last_write_{};
  bool ending_ = false;
  bool report_failing_ = false;
  int exit_code_ = 0;
};

bool Agent::load_current_plan() {
  // The plan is replaced by a rename, never written in place: the same inode, size and
  // modification time is the plan already read, not parsed again every poll.
  struct stat st {};
  if (::stat((o_.state_dir + "/plan.json").c_str(), &st) != 0) return false;
  const PlanFileId id{st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec};
  if (have_plan_ && id == plan_file_) {
    follow_plan();
    return true;
  }
  auto plan = load_plan(o_.state_dir);
  if (!plan.is_ok()) return false;
  plan_file_ = id;
  if (!have_plan_ || plan->generation != plan_.generation) {
    plan_ = std::move(plan).value();
    have_plan_ = true;
    report_.plan_generation = plan_.generation;
  }
  follow_plan();
  return true;
}

// Starts what the plan puts on this node and is not running; stops what it no longer lists.
void Agent::follow_plan() {
  std::map<std::string, const PlannedProcess*> wanted;
  for (const PlannedProcess& p : plan_.processes) {
    if (p.process.node == o_.node) wanted[p.process.name] = &p;
  }
  for (auto& [name, w] : workers_) {
    if (wanted.count(name) || w.report.state == "stopping") continue;
    if (w.report.state == "starting" || w.report.state == "ready") {
      log_line(o_.node, name + " is no longer planned: stopping it (pid " +
                            std::to_string(w.report.pid) + ")");
      ::kill(w.report.pid, SIGTERM);
      w.stop_sent = Clock::now();
      w.report.state = "stopping";
    } else {
      w.report.state = "removed";
    }
  }
  std::erase_if(workers_, [](const auto& kv) { return kv.second.report.state == "removed"; });
  for (const auto& [name, p] : wanted) {
    auto it = workers_.find(name);
    if (it != workers_.end() && it->second.report.state != "stopping") {
      it->second.planned = *p;  // a changed command line applies at its next start
      continue;
    }
    if (it != workers_.end()) continue;  // still stopping under this name: started once gone
    Worker w;
    w.planned = *p;
    w.report.name = name;
    auto [at, fresh] = workers_.emplace(name, std::move(w));
    (void)fresh;
    start(at->second);
  }
}

void Agent::start(Worker& w) {
  const PlannedProcess& p = w.planned;
  std::error_code ec;
  fs::create_directories(fs::path(p.log_path).parent_path(), ec);
  const int err_fd = ::open(p.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  const int out_fd = ::open(p.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  std::vector<std::string> words = {p.program};
  words.insert(words.end(), p.args.begin(), p.args.end());
  std::vector<char*> argv;
  argv.reserve(words.size() + 1);
  for (auto& word : words)
    argv.push_back(word.data());
  argv.push_back(nullptr);
  const pid_t agent = ::getpid();
  const pid_t pid = (err_fd >= 0 && out_fd >= 0) ? ::fork() : -1;
  if (pid == 0) {
    // The worker dies with its agent (a SIGKILLed agent, a node's job ending).
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != agent) ::_exit(127);
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd >= 0) ::dup2(null_fd, 0);
    ::dup2(out_fd, 1);
    ::dup2(err_fd, 2);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig : {SIGTERM, SIGINT, SIGHUP})
      ::signal(sig, SIG_DFL);
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "dserve agent: cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  const std::string why = std::strerror(errno);
  if (err_fd >= 0) ::close(err_fd);
  if (out_fd >= 0) ::close(out_fd);
  if (pid < 0) {
    log_line(o_.node, "cannot start " + w.report.name + ": " + why);
    on_death(w, 127 << 8);
    return;
  }
  w.report.pid = pid;
  w.report.start_ticks = start_ticks_of(pid);
  w.report.state = "starting";
  log_line(o_.node, "started " + w.report.name + " (pid " + std::to_string(pid) + ")");
}

void Agent::on_death(Worker& w, int status) {
  w.report.last_exit = describe_exit(status);
  const bool planned_stop = w.report.state == "stopping" || ending_;
  log_line(o_.node, w.report.name + " (pid " + std::to_string(w.report.pid) + ") " +
                        w.report.last_exit + (planned_stop ? "" : ", unexpectedly"));
  w.report.pid = 0;
  w.report.start_ticks = 0;
  if (planned_stop) {
    w.report.state = "stopped";
    return;
  }
  const SupervisionSpec& s = plan_.supervision;
  if (w.planned.process.role == ProcessRole::kGateway && WIFEXITED(status) &&
      WEXITSTATUS(status) == kPoolLostExitCode) {
    w.report.state = "failed";
    end_cluster("the gateway reported a pool without healthy workers for longer than " +
                std::to_string(s.pool_lost_ms) + " ms (supervision.on_pool_lost: fail-job)");
    return;
  }
  const auto now = Clock::now();
  w.died = now;
  while (!w.restart_times.empty() &&
         now - w.restart_times.front() > milliseconds(s.restart_window_ms))
    w.restart_times.pop_front();
  if (static_cast<int64_t>(w.restart_times.size()) >= s.max_restarts) {
    w.report.state = "failed";
    log_line(o_.node, w.report.name +
                          " is not restarted: " + std::to_string(w.restart_times.size()) +
                          " restarts in the last " + std::to_string(s.restart_window_ms) +
                          " ms (supervision.max_restarts " + std::to_string(s.max_restarts) + ")");
    return;
  }
  int64_t delay = s.backoff_ms;
  for (size_t i = 0; i < w.restart_times.size() && delay < s.backoff_max_ms; ++i)
    delay *= 2;
  delay = std::min(delay, s.backoff_max_ms);
  w.next_start = now + milliseconds(delay);
  w.report.state = "backoff";
  log_line(o_.node, "restarting " + w.report.name + " in " + std::to_string(delay) + " ms");
}

void Agent::reap() {
  for (auto& [name, w] : workers_) {
    if (w.report.pid <= 0) continue;
    int status = 0;
    if (::waitpid(w.report.pid, &status, WNOHANG) == w.report.pid) on_death(w, status);
  }
  std::erase_if(workers_, [](const auto& kv) { return kv.second.report.state == "stopped"; });
}

void Agent::advance() {
  const auto now = Clock::now();
  for (auto& [name, w] : workers_) {
    if (w.report.state == "backoff" && now >= w.next_start && !ending_) {
      w.restart_times.push_back(now);
      ++w.report.restarts;
      w.was_restarted = true;
      start(w);
    } else if (w.report.state == "starting" && has_ready_line(w.planned.out_path)) {
      w.report.state = "ready";
      w.report.ready_unix_ms = std::chrono::duration_cast<milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
      if (w.was_restarted) {
        w.report.last_recovery_s = std::chrono::duration<double>(now - w.died).count();
        char text[64];
        std::snprintf(text, sizeof text, "%.2f", w.report.last_recovery_s);
        log_line(o_.node, name + " is ready again, " + text + " s after it died");
      } else {
        log_line(o_.node, name + " is ready");
      }
    } else if (w.report.state == "stopping" &&
               now - w.stop_sent > milliseconds(plan_.supervision.stop_timeout_ms)) {
      ::kill(w.report.pid, SIGKILL);
    }
  }
}

void Agent::stop_all(milliseconds timeout) {
  for (auto& [name, w] : workers_) {
    if (w.report.pid > 0) {
      ::kill(w.report.pid, SIGTERM);
      w.report.state = "stopping";
    }
  }
  write_report();
  const auto until = Clock::now() + timeout;
  auto any_left = [&] {
    return std::any_of(workers_.begin(), workers_.end(),
                       [](const auto& kv) { return kv.second.report.pid > 0; });
  };
  while (any_left() && Clock::now() < until) {
    reap();
    std::this_thread::sleep_for(milliseconds(20));
  }
  for (auto& [name, w] : workers_) {
    if (w.report.pid > 0) {
      log_line(o_.node,
               name + " did not stop in " + std::to_string(timeout.count()) + " ms: SIGKILL");
      ::kill(w.report.pid, SIGKILL);
      int status = 0;
      // Bounded: a process stuck in the kernel (a device driver) may not die at once; the
      // agent reports and exits anyway (the process is reparented and reaped by init).
      bool reaped = false;
      for (int i = 0; i < 250 && !reaped; ++i) {
        reaped = ::waitpid(w.report.pid, &status, WNOHANG) == w.report.pid;
        if (!reaped) std::this_thread::sleep_for(milliseconds(20));
      }
      if (reaped) {
        on_death(w, status);
      } else {
        log_line(o_.node, name + " (pid " + std::to_string(w.report.pid) +
                              ") did not die 5 s after SIGKILL; leaving it");
        w.report.state = "stopped";
        w.report.pid = 0;
      }
    }
  }
  reap();
}

void Agent::end_cluster(const std::string& reason) {
  if (ending_) return;
  ending_ = true;
  exit_code_ = 1;
  report_.end_reason = reason;
  log_line(o_.node, "ending the cluster: " + reason);
  if (!plan_.slurm_job.empty()) {
    const std::string cmd =
        "timeout 20 scancel " + internal::sh_quote(plan_.slurm_job) + " >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) log_line(o_.node, "scancel " + plan_.slurm_job + " failed");
  }
}

void Agent::write_report() {
  report_.workers.clear();
  for (const auto& [name, w] : workers_)
    report_.workers.push_back(w.report);
  const std::string body = report_to_json(report_);
  const auto now = Clock::now();
  if (body == last_written_ && now - last_write_ < std::chrono::seconds(2)) return;
  report_.updated_unix_ms =
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  const std::string path = report_path(o_.state_dir, o_.node);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  const std::string tmp = path + ".tmp";
  bool written = false;
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << report_to_json(report_) << "\n";
    written = static_cast<bool>(out.flush());
  }
  // A report half written (a full disk) never replaces the last good one.
  if (!written || std::rename(tmp.c_str(), path.c_str()) != 0) {
    if (!report_failing_) {
      log_line(o_.node, "cannot write " + path + ": " + std::strerror(errno) +
                            " (up, scale and down read it; retrying)");
    }
    report_failing_ = true;
    last_write_ = now;
    return;
  }
  if (report_failing_) log_line(o_.node, "writes " + path + " again");
  report_failing_ = false;
  last_written_ = body;
  last_write_ = now;
}

int Agent::run() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGHUP})
    ::sigaction(sig, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  log_line(o_.node,
           "agent (pid " + std::to_string(::getpid()) + ") follows " + o_.state_dir + "/plan.json");
  const auto waited_from = Clock::now();
  while (!load_current_plan()) {
    if (g_stop_signal.load() != 0) return 0;
    if (Clock::now() - waited_from > o_.plan_wait) {
      log_line(o_.node, "no plan in " + o_.state_dir + " after " +
                            std::to_string(o_.plan_wait.count()) + " ms; exiting");
      return 1;
    }
    std::this_thread::sleep_for(o_.poll);
  }
  for (;;) {
    while (g_stop_signal.load() == 0 && !ending_) {
      reap();
      advance();
      (void)load_current_plan();  // a plan that cannot be read keeps the last one
      write_report();
      std::this_thread::sleep_for(o_.poll);
    }
    if (g_stop_signal.load() != 0 || !o_.stay) break;
    // A service's agent outlives the cluster it ended: its processes stop, and it waits for
    // the next plan (a new `up`).
    stop_all(milliseconds(plan_.supervision.stop_timeout_ms));
    report_.ended = true;
    last_written_.clear();
    write_report();
    workers_.clear();  // all stopped; the next plan starts afresh
    const int64_t ended_generation = plan_.generation;
    log_line(o_.node, "waiting for a new plan");
    while (g_stop_signal.load() == 0) {
      auto next = load_plan(o_.state_dir);
      if (next.is_ok() && next->generation != ended_generation) break;
      write_report();
      std::this_thread::sleep_for(o_.poll);
    }
    if (g_stop_signal.load() != 0) break;
    ending_ = false;
    exit_code_ = 0;
    report_.ended = false;
    report_.end_reason.clear();
    (void)load_current_plan();
  }
  if (const int sig = g_stop_signal.load(); sig != 0 && !ending_) {
    report_.end_reason = std::string("signal ") + std::to_string(sig);
    log_line(o_.node, "stopping every worker (" + report_.end_reason + ")");
  }
  stop_all(milliseconds(plan_.supervision.stop_timeout_ms));
  report_.ended = true;
  last_written_.clear();
  write_report();
  log_line(o_.node, "agent ended");
  return exit_code_;
}

}  // namespace

int run_node_agent(const AgentOptions& options) {
  Agent agent(options);
  return agent.run();
}

}  // namespace dserve::cluster
