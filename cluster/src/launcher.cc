#include "dserve/cluster/launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "process_json.h"
#include "process_util.h"

namespace dserve::cluster {

namespace internal {

// Field 22 of a /proc/<pid>/stat line (start time in clock ticks) and field 3 (the state
// letter); 0 for an empty or malformed line.
uint64_t parse_stat(const std::string& line, char* state) {
  // The command name (field 2) is in parentheses and may hold spaces: fields follow the last ')'.
  const auto close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  uint64_t ticks = 0;
  for (int i = 3; i <= 22 && rest >> field; ++i) {
    if (i == 3 && state) *state = field.empty() ? '?' : field[0];
    if (i == 22) ticks = std::strtoull(field.c_str(), nullptr, 10);
  }
  return ticks;
}

// The same for a local process; 0 when it does not exist.
uint64_t start_ticks_of(pid_t pid, char* state) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return 0;
  return parse_stat(line, state);
}

// `s` as one word for sh.
std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s)
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace internal

namespace {

using internal::parse_stat;
using internal::sh_quote;
using internal::start_ticks_of;

namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Runs `script` (sh) on the node of `record` through its ssh command; its stdout and stderr.
// kUnavailable, with what it printed, when ssh or the script fails.
Result<std::string> run_remote(const std::vector<std::string>& ssh_command,
                               const std::string& destination, const std::string& script) {
  // Bounded in time (a node that stops answering must not hang up, scale or down) and in
  // what is kept of its output.
  constexpr int kTimeoutS = 120;
  constexpr size_t kMaxOutput = size_t{16} << 20;
  std::string cmd = "timeout " + std::to_string(kTimeoutS) + " ";
  for (const auto& word : ssh_command)
    cmd += sh_quote(word) + " ";
  cmd += sh_quote(destination) + " " + sh_quote(script) + " 2>&1";
  std::string out;
  std::FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return internal_error("cannot run ssh: " + std::string(std::strerror(errno)));
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) {
    if (out.size() < kMaxOutput) out.append(buf, n);
  }
  const int status = ::pclose(p);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    const std::string what = script.size() > 200 ? script.substr(0, 200) + "..." : script;
    return unavailable("on " + destination + " over ssh: `" + what + "` " +
                       (code == 124 ? "got no answer in " + std::to_string(kTimeoutS) + " s"
                                    : "failed (status " + std::to_string(code) + ")") +
                       ": " + out.substr(0, 4096));
  }
  return out;
}

bool is_remote(const ProcessRecord& r) {
  return !r.process.ssh.empty();
}

Result<std::string> on_node(const ProcessRecord& r, const std::string& script) {
  return run_remote(r.ssh_command, r.process.ssh, script);
}

json to_json(const ProcessRecord& r) {
  json j = internal::process_to_json(r.process);
  j["ssh_command"] = r.ssh_command;
  j["args"] = r.args;
  j["pid"] = r.pid;
  j["start_ticks"] = r.start_ticks;
  j["log"] = r.log_path;
  j["out"] = r.out_path;
  j["started_unix_ms"] = r.started_unix_ms;
  return j;
}

ProcessRecord from_json(const json& j) {
  ProcessRecord r;
  r.process = internal::process_from_json(j);
  r.ssh_command = j.at("ssh_command").get<std::vector<std::string>>();
  r.args = j.at("args").get<std::vector<std::string>>();
  r.pid = j.at("pid").get<pid_t>();
  r.start_ticks = j.at("start_ticks").get<uint64_t>();
  r.log_path = j.at("log").get<std::string>();
  r.out_path = j.at("out").get<std::string>();
  r.started_unix_ms = j.at("started_unix_ms").get<int64_t>();
  return r;
}

}  // namespace

const ProcessRecord* ClusterState::gateway() const {
  for (const auto& r : processes) {
    if (r.process.role == ProcessRole::kGateway) return &r;
  }
  return nullptr;
}

std::vector<const ProcessRecord*> ClusterState::pool(ProcessRole role) const {
  std::vector<const ProcessRecord*> out;
  for (const auto& r : processes) {
    if (r.process.role == role) out.push_back(&r);
  }
  std::sort(out.begin(), out.end(), [](const ProcessRecord* a, const ProcessRecord* b) {
    return a->process.replica < b->process.replica;
  });
  return out;
}

std::string default_state_dir(const std::string& manifest_path) {
  std::error_code ec;
  fs::path abs = fs::weakly_canonical(fs::absolute(manifest_path, ec), ec);
  if (abs.empty()) abs = manifest_path;
  // FNV-1a of the absolute path: stable across runs and machines.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : abs.string()) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return (fs::path("/var/tmp/dserve") / (abs.stem().string() + "-" + std::string(hex, 8))).string();
}

Result<ClusterState> load_state(const std::string& dir) {
  const std::string path = dir + "/state.json";
  std::ifstream in(path);
  if (!in) return not_found("no cluster is up from " + dir + " (no " + path + ")");
  try {
    const json j = json::parse(in);
    ClusterState s;
    s.manifest_path = j.at("manifest").get<std::string>();
    s.launcher = j.value("launcher", "nodes") == "slurm" ? Launcher::kSlurm : Launcher::kNodes;
    s.slurm_job = j.value("slurm_job", "");
    for (const json& p : j.at("processes"))
      s.processes.push_back(from_json(p));
    for (const json& p : j.value("agents", json::array()))
      s.agents.push_back(from_json(p));
    return s;
  } catch (const std::exception& e) {
    return data_loss(path + " is not a dserve cluster state file: " + e.what());
  }
}

Status save_state(const std::string& dir, const ClusterState& state) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return invalid_argument("cannot create the state directory " + dir + ": " + ec.message());
  json j;
  j["manifest"] = state.manifest_path;
  j["launcher"] = std::string(launcher_name(state.launcher));
  j["slurm_job"] = state.slurm_job;
  j["processes"] = json::array();
  for (const auto& r : state.processes)
    j["processes"].push_back(to_json(r));
  j["agents"] = json::array();
  for (const auto& r : state.agents)
    j["agents"].push_back(to_json(r));
  const std::string path = dir + "/state.json";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump(2) << "\n";
    if (!out.flush()) return internal_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return internal_error("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
  }
  return Status::ok();
}

Status remove_state(const std::string& dir) {
  std::error_code ec;
  fs::remove(dir + "/state.json", ec);
  if (ec) return internal_error("cannot remove " + dir + "/state.json: " + ec.message());
  return Status::ok();
}

bool is_running(const ProcessRecord& record) {
  if (record.pid <= 0) return false;
  if (is_remote(record)) {
    auto stat =
        on_node(record, "cat /proc/" + std::to_string(record.pid) + "/stat 2>/dev/null; true");
    // Unreachable: say it runs, so that nothing is forgotten while it may still run.
    if (!stat.is_ok()) return true;
    char state = '?';
    const uint64_t ticks = parse_stat(*stat, &state);
    return ticks != 0 && ticks == record.start_ticks && state != 'Z' && state != 'X';
  }
  // Without /proc (a chroot that does not mount it) the start time cannot be read: the pid
  // alone decides, so that a process that runs is never taken for gone.
  if (record.start_ticks == 0 || !fs::exists("/proc/self/stat")) {
    return kill(record.pid, 0) == 0 || errno == EPERM;
  }
  char state = '?';
  const uint64_t ticks = start_ticks_of(record.pid, &state);
  return ticks != 0 && ticks == record.start_ticks && state != 'Z' && state != 'X';
}

bool is_local_host(const std::string& host) {
  if (host == "localhost") return true;
  in_addr addr{};
  if (inet_pton(AF_INET, host.c_str(), &addr) != 1) {
    // A host name: this machine's own name counts.
    char name[256] = {};
    return gethostname(name, sizeof name - 1) == 0 && host == name;
  }
  if ((ntohl(addr.s_addr) >> 24) == 127) return true;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return false;
  bool found = false;
  for (ifaddrs* a = list; a && !found; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET) continue;
    found = reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr.s_addr == addr.s_addr;
  }
  freeifaddrs(list);
  return found;
}

namespace {

// The record of a process about to start: its command and its log files (on its node).
ProcessRecord new_record(const Process& process, std::vector<std::string> args,
                         const LaunchOptions& options) {
  const fs::path logs = fs::path(options.state_dir) / "logs";
  ProcessRecord r;
  r.process = process;
  r.args = std::move(args);
  if (!process.ssh.empty()) r.ssh_command = options.ssh_command;
  r.log_path = (logs / (process.name + ".log")).string();
  r.out_path = (logs / (process.name + ".out")).string();
  return r;
}

Result<ProcessRecord> start_remote(ProcessRecord r, const LaunchOptions& options) {
  const Process& process = r.process;
  const fs::path logs = fs::path(r.log_path).parent_path();
  std::string command = sh_quote(process.program.empty() ? options.program : process.program);
  for (const auto& a : r.args)
    command += " " + sh_quote(a);
  // setsid: its own session, so it outlives the ssh connection; $! is its pid (a background
  // job of a shell without job control is no group leader, so setsid does not fork).
  const std::string script = "mkdir -p " + sh_quote(logs.string()) + " && cd / && { setsid " +
                             command + " >" + sh_quote(r.out_path) + " 2>>" + sh_quote(r.log_path) +
                             " </dev/null & } && echo \"dserve-pid $!\" && cat /proc/$!/stat";
  auto out = on_node(r, script);
  if (!out.is_ok()) return out.status().with_context("starting " + process.name);
  const auto at = out->find("dserve-pid ");
  if (at == std::string::npos) {
    return unavailable("starting " + process.name + " on " + process.ssh +
                       ": no pid in the answer: " + *out);
  }
  r.pid = static_cast<pid_t>(std::strtol(out->c_str() + at + 11, nullptr, 10));
  const auto eol = out->find('\n', at);
  r.start_ticks = eol == std::string::npos ? 0 : parse_stat(out->substr(eol + 1));
  r.started_unix_ms = unix_ms_now();
  return r;
}

}  // namespace

Result<ProcessRecord> start_process(const Process& process, std::vector<std::string> args,
                                    const LaunchOptions& options) {
  ProcessRecord r = new_record(process, std::move(args), options);
  if (!process.ssh.empty()) return start_remote(std::move(r), options);
  const fs::path logs = fs::path(r.log_path).parent_path();
  std::error_code ec;
  fs::create_directories(logs, ec);
  if (ec) return invalid_argument("cannot create " + logs.string() + ": " + ec.message());
  const int err_fd = ::open(r.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  const int out_fd = ::open(r.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (err_fd < 0 || out_fd < 0) {
    if (err_fd >= 0) ::close(err_fd);
    if (out_fd >= 0) ::close(out_fd);
    return invalid_argument("cannot open the log files in " + logs.string() + ": " +
                            std::strerror(errno));
  }
  std::vector<std::string> argv_store;
  argv_store.push_back(process.program.empty() ? options.program : process.program);
  argv_store.insert(argv_store.end(), r.args.begin(), r.args.end());
  std::vector<char*> argv;
  argv.reserve(argv_store.size() + 1);
  for (auto& a : argv_store)
    argv.push_back(a.data());
  argv.push_back(nullptr);

  const pid_t pid = fork();
  if (pid < 0) {
    ::close(err_fd);
    ::close(out_fd);
    return internal_error(std::string("fork failed: ") + std::strerror(errno));
  }
  if (pid == 0) {
    // The child: its own session (no signal from the terminal that ran `dserve up`), stdin
    // from /dev/null, stdout and stderr to the logs.
    setsid();
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "dserve: cannot run %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  ::close(err_fd);
  ::close(out_fd);
  r.pid = pid;
  r.started_unix_ms = unix_ms_now();
  // /proc/<pid>/stat exists as soon as fork returns.
  r.start_ticks = start_ticks_of(pid);
  return r;
}

std::string stop_process(const ProcessRecord& record, std::chrono::milliseconds timeout) {
  if (!is_running(record)) {
    if (!is_remote(record)) waitpid(record.pid, nullptr, WNOHANG);
    return "was not running";
  }
  auto signal = [&](int sig) {
    if (is_remote(record)) {
      (void)on_node(record, "kill -" + std::to_string(sig) + " " + std::to_string(record.pid) +
                                " 2>/dev/null; true");
    } else {
      kill(record.pid, sig);
    }
  };
  signal(SIGTERM);
  const auto started = std::chrono::steady_clock::now();
  const auto until = started + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (!is_remote(record)) waitpid(record.pid, nullptr, WNOHANG);  // when it is our child
    if (!is_running(record)) return "exited";
    std::this_thread::sleep_for(std::chrono::milliseconds(is_remote(record) ? 200 : 20));
  }
  signal(SIGKILL);
  for (int i = 0; i < 250 && is_running(record); ++i) {
    if (!is_remote(record)) waitpid(record.pid, nullptr, WNOHANG);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return "killed after " + std::to_string(timeout.count()) + " ms";
}

NodeAccess access_of(const ProcessRecord& record) {
  return {record.process.ssh, record.ssh_command};
}

Result<std::string> read_node_file(const NodeAccess& node, const std::string& path) {
  constexpr uintmax_t kMaxBytes = uintmax_t{16} << 20;  // plans and reports are small
  if (node.ssh.empty()) {
    std::error_code ec;
    const uintmax_t size = fs::file_size(path, ec);
    if (ec) return not_found("no " + path);
    if (size > kMaxBytes) return data_loss(path + " is larger than 16 MiB");
    std::ifstream in(path);
    if (!in) return not_found("no " + path);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }
  auto out = run_remote(node.ssh_command, node.ssh,
                        "head -c " + std::to_string(kMaxBytes) + " " + sh_quote(path) +
                            " 2>/dev/null || echo dserve-no-such-file");
  if (!out.is_ok()) return out.status();
  if (out->rfind("dserve-no-such-file", 0) == 0) return not_found("no " + path + " on " + node.ssh);
  return out;
}

Status write_node_file(const NodeAccess& node, const std::string& path, const std::string& text) {
  const fs::path dir = fs::path(path).parent_path();
  if (node.ssh.empty()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << text;
      if (!out.flush()) return internal_error("cannot write " + tmp);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      return internal_error("cannot rename " + tmp + ": " + std::strerror(errno));
    }
    return Status::ok();
  }
  // In pieces: one command line (an argument of sh -c, then of ssh) holds at most 128 KiB.
  constexpr size_t kPiece = size_t{64} << 10;
  const std::string tmp = sh_quote(path + ".tmp");
  for (size_t at = 0; at == 0 || at < text.size(); at += kPiece) {
    std::string script = at == 0 ? "mkdir -p " + sh_quote(dir.string()) + " && " : "";
    script += "printf '%s' " + sh_quote(text.substr(at, kPiece)) + (at == 0 ? " >" : " >>") + tmp;
    if (at + kPiece >= text.size()) script += " && mv " + tmp + " " + sh_quote(path);
    auto out = run_remote(node.ssh_command, node.ssh, script);
    if (!out.is_ok()) return out.status().with_context("writing " + path);
  }
  return Status::ok();
}

std::string tail_of(const ProcessRecord& record, size_t lines) {
  if (!is_remote(record)) return tail_of(record.log_path, lines);
  auto out = on_node(record, "tail -n " + std::to_string(lines) + " " + sh_quote(record.log_path) +
                                 " 2>/dev/null; true");
  if (!out.is_ok()) return "  (cannot read it: " + out.status().message() + ")\n";
  std::string indented;
  std::istringstream in(*out);
  for (std::string line; std::getline(in, line);)
    indented += "  " + line + "\n";
  return indented;
}

std::string tail_of(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    last.push_back(line);
    if (last.size() > lines) last.pop_front();
  }
  std::string out;
  for (const auto& l : last)
    out += "  " + l + "\n";
  return out;
}

}  // namespace dserve::cluster
