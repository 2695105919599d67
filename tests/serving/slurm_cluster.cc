#include "slurm_cluster.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

namespace dserve::testing_support {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Searched after PATH: the sbin folders a non-login root PATH may lack (the daemons' home).
constexpr const char* kMorePath = ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin";

// The full path of `name` on PATH, then kMorePath; empty when absent.
std::string find_program(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(std::string(path != nullptr ? path : "") + kMorePath);
  for (std::string d; std::getline(dirs, d, ':');)
    if (!d.empty() && ::access((d + "/" + name).c_str(), X_OK) == 0) return d + "/" + name;
  return "";
}

// `s` as one sh word.
std::string sh_word(const std::string& s) {
  std::string q = "'";
  for (char c : s)
    q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The last `lines` lines of the file at `path`; empty when it is empty or absent.
std::string tail_of(const std::string& path, size_t lines) {
  std::stringstream buf;
  buf << std::ifstream(path, std::ios::binary).rdbuf();
  const std::string text = buf.str();
  size_t at = text.size() - (!text.empty() && text.back() == '\n');
  for (size_t seen = 0; at > 0 && !(text[at - 1] == '\n' && ++seen == lines);)
    --at;
  return text.substr(at);
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status));
  return "ended";
}

// `n` distinct ports free on 127.0.0.1 (each bound, and held until all are found), below the
// ephemeral range from a start that varies: no outgoing connection takes one before the daemons.
std::vector<int> free_ports(int n) {
  int low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low;
  const int first = low > 12000 ? 10000 : 1024;
  const int span = std::max(low - first, 1);
  const auto start = static_cast<uint64_t>(Clock::now().time_since_epoch().count()) ^
                     (static_cast<uint64_t>(::getpid()) << 20);
  std::vector<int> held, ports;
  for (int i = 0; i < span && static_cast<int>(ports.size()) < n; ++i) {
    const int port = first + static_cast<int>((start + static_cast<uint64_t>(i)) % span);
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    held.push_back(fd);
    if (fd >= 0 && ::bind(fd, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0)
      ports.push_back(port);
  }
  for (int fd : held)
    if (fd >= 0) ::close(fd);
  return ports;
}

std::string host_name() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

// Whether this process may unshare its UTS namespace (CAP_SYS_ADMIN in CapEff).
bool may_unshare() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("CapEff:", 0) == 0) return (std::stoull(line.substr(7), nullptr, 16) >> 21) & 1;
  return false;
}

// Slurm binds every daemon (NoCtldInAddrAny, NoInAddrAny) and srun to the address of
// gethostname(), reaches slurmctld and slurmd at the configured 127.0.0.1, and slurmd answers srun
// where its request came from: all agree only if the host name resolves to 127.0.0.1 ("vm" gave
// 127.0.1.1 here: slurmd never reached slurmctld). Hence a UTS namespace named localhost.
bool name_host_localhost(std::string* why) {
  if (host_name() == "localhost") return true;
  if (::unshare(CLONE_NEWUTS) == 0 && ::sethostname("localhost", 9) == 0) return true;
  *why = std::string("could not name this thread's host localhost: ") + std::strerror(errno);
  return false;
}

}  // namespace

std::string SlurmCluster::unavailable() {
  if (::geteuid() != 0)
    return "needs root: the fixture runs munged, slurmctld and slurmd as SlurmUser=root";
  if (host_name() != "localhost" && !may_unshare())
    return "needs CAP_SYS_ADMIN: the Slurm daemons need a UTS namespace named localhost";
  // Each program the fixture runs, and the Debian package that has it.
  std::istringstream needed(
      "munged munge mungekey munge slurmctld slurmctld slurmd slurmd sinfo slurm-client "
      "squeue slurm-client sbatch slurm-client srun slurm-client scancel slurm-client "
      "timeout coreutils");
  for (std::string program, package; needed >> program >> package;)
    if (find_program(program).empty())
      return "no " + program + " on this machine (Debian package " + package +
             "; scripts/install-deps.sh installs it)";
  return "";
}

std::unique_ptr<SlurmCluster> SlurmCluster::start(const Options& options, std::string* why) {
  std::string ignored;
  why = why != nullptr ? why : &ignored;
  *why = unavailable();
  if (!why->empty()) return nullptr;
  if (options.nodes < 1 || options.cpus_per_node < 1 || options.real_memory_mib < 1 ||
      options.partition.empty()) {
    *why = "bad options: nodes, cpus_per_node and real_memory_mib must be positive";
    return nullptr;
  }
  // Destroying `cluster` on any failure below stops whatever was started.
  std::unique_ptr<SlurmCluster> cluster(new SlurmCluster(options));
  std::string dir = (fs::temp_directory_path() / "dserve-slurm-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr) {
    *why = "mkdtemp failed under " + fs::temp_directory_path().string();
    return nullptr;
  }
  cluster->dir_ = dir;
  // munged refuses a socket in a directory that others cannot search (mkdtemp makes 0700).
  ::chmod(dir.c_str(), 0755);
  for (const char* sub : {"state", "spool", "log"})
    fs::create_directories(dir + "/" + sub);
  for (const std::string& node : cluster->node_names())
    fs::create_directories(dir + "/spool/" + node);
  const std::vector<int> ports = free_ports(2 + options.nodes);
  if (static_cast<int>(ports.size()) != 2 + options.nodes) {
    *why = "could not find " + std::to_string(2 + options.nodes) + " free ports on 127.0.0.1";
    return nullptr;
  }
  cluster->conf_path_ = dir + "/slurm.conf";
  std::ofstream conf(cluster->conf_path_);
  conf << "ClusterName=dserve\nSlurmctldHost=localhost\nSlurmctldAddr=127.0.0.1\nSlurmctldPort="
       << ports[0] << "\nSlurmdPort=" << ports[1]
       << "\nCommunicationParameters=NoCtldInAddrAny,NoInAddrAny\nSlurmUser=root\nSlurmdUser=root"
       << "\nAuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket=" << dir << "/munge.sock"
       << "\nStateSaveLocation=" << dir << "/state\nSlurmdSpoolDir=" << dir << "/spool/%n"
       << "\nSlurmctldPidFile=" << dir << "/slurmctld.pid\nSlurmdPidFile=" << dir
       << "/slurmd.%n.pid"
       << "\nSlurmctldLogFile=" << dir << "/log/slurmctld.log\nSlurmdLogFile=" << dir
       << "/log/slurmd.%n.log\nMailProg=/bin/true\nProctrackType=proctrack/linuxproc"
       << "\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none"
       << "\nAccountingStorageType=accounting_storage/none\nMpiDefault=none"
       // Only backfill schedules heterogeneous jobs; its default 30 s interval adds that much.
       << "\nSchedulerType=sched/backfill\nSchedulerParameters=bf_interval=1"
       << "\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2"
       // A request no node can ever satisfy is refused at submission, not left pending.
       << "\nEnforcePartLimits=ALL\nKillWait=2"
       // Each node reports the configured CPUs and memory, whatever this host has.
       << "\nSlurmdParameters=config_overrides\n";
  std::string node_list;
  for (int i = 1; i <= options.nodes; ++i) {
    conf << "NodeName=n" << i << " NodeHostname=localhost NodeAddr=127.0.0.1 Port=" << ports[1 + i]
         << " CPUs=" << options.cpus_per_node << " RealMemory=" << options.real_memory_mib << "\n";
    node_list += (i > 1 ? ",n" : "n") + std::to_string(i);
  }
  conf << "PartitionName=" << options.partition << " Nodes=" << node_list
       << " Default=YES MaxTime=INFINITE State=UP\n";
  if (!conf.flush()) {
    *why = "could not write " + cluster->conf_path_;
    return nullptr;
  }
  ::setenv("SLURM_CONF", cluster->conf_path_.c_str(), 1);
  // A batch job's output without --output lands here, not in the test's working directory.
  ::setenv("SBATCH_OUTPUT", (dir + "/slurm-%j.out").c_str(), 0);
  if (!name_host_localhost(why)) return nullptr;
  const std::string key = dir + "/munge.key";
  if (Result r = cluster->run("mungekey -c -k " + sh_word(key), 10); r.exit_code != 0) {
    *why = "mungekey failed: " + r.output;
    return nullptr;
  }
  const std::string socket = dir + "/munge.sock";
  cluster->daemons_.reserve(2 + static_cast<size_t>(options.nodes));
  // Each daemon's own log is log/<stem>.log, its stdout and stderr log/<stem>.out.
  auto add = [&](const std::string& name, const std::string& stem) -> Daemon& {
    return cluster->daemons_.emplace_back(
        Daemon{name, dir + "/log/" + stem + ".log", dir + "/log/" + stem + ".out"});
  };
  Daemon& munged = add("munged", "munged");
  if (!cluster->launch(munged,
                       {find_program("munged"), "-F", "--socket=" + socket, "--key-file=" + key,
                        "--log-file=" + munged.log_path, "--pid-file=" + dir + "/munged.pid",
                        "--seed-file=" + dir + "/munged.seed"},
                       why))
    return nullptr;
  // munged is ready within ~10 ms; slurmctld and slurmd need its socket at once.
  for (const auto until = Clock::now() + std::chrono::seconds(10); !fs::exists(socket);) {
    if (!running(munged) || Clock::now() > until) {
      *why = "munged " + (munged.pid < 0 ? describe(munged.status) : "made no socket in 10 s") +
             ":\n" + cluster->logs_tail();
      return nullptr;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!cluster->launch(add("slurmctld", "slurmctld"),
                       {find_program("slurmctld"), "-D", "-f", cluster->conf_path_}, why))
    return nullptr;
  for (const std::string& node : cluster->node_names())
    if (!cluster->launch(add("slurmd " + node, "slurmd." + node),
                         {find_program("slurmd"), "-D", "-N", node, "-f", cluster->conf_path_},
                         why))
      return nullptr;
  if (!cluster->wait_until_idle(why)) return nullptr;
  cluster->up_ = true;
  return cluster;
}

bool SlurmCluster::launch(Daemon& daemon, std::vector<std::string> argv, std::string* why) {
  // Everything the child needs is made before fork: only async-signal-safe calls after it.
  std::vector<char*> cargv;
  for (std::string& a : argv)
    cargv.push_back(a.data());
  cargv.push_back(nullptr);
  const int out =
      ::open(daemon.output_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  const int in = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  const pid_t pid = out >= 0 && in >= 0 ? ::fork() : -1;
  if (pid == 0) {
    // Its own session: a Ctrl-C meant for the test does not reach it half-way through a stop.
    ::setsid();
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    // Not the test's stdout/stderr: ctest waits until every holder of those has closed them.
    ::dup2(in, 0);
    ::dup2(out, 1);
    ::dup2(out, 2);
    ::close_range(3, ~0U, 0);
    ::execv(cargv[0], cargv.data());
    ::_exit(127);
  }
  if (out >= 0) ::close(out);
  if (in >= 0) ::close(in);
  if (pid < 0) {
    *why = "could not start " + daemon.name + " (" + daemon.output_path + ")";
    return false;
  }
  daemon.pid = pid;
  return true;
}

bool SlurmCluster::running(Daemon& daemon) {
  if (daemon.pid < 0) return false;
  int status = 0;
  const pid_t r = ::waitpid(daemon.pid, &status, WNOHANG);
  if (r == 0) return true;
  daemon.status = r == daemon.pid ? status : 0;
  daemon.pid = -1;
  return false;
}

void SlurmCluster::stop(const std::vector<Daemon*>& daemons, int sig, int grace_ms) {
  for (Daemon* d : daemons)
    if (running(*d)) ::kill(d->pid, sig);
  const auto until = Clock::now() + std::chrono::milliseconds(grace_ms);
  auto any_running = [&] {
    return std::count_if(daemons.begin(), daemons.end(), [](Daemon* d) { return running(*d); });
  };
  while (any_running() > 0 && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  for (Daemon* d : daemons)
    if (running(*d) && ::kill(d->pid, SIGKILL) == 0 && ::waitpid(d->pid, &d->status, 0) > 0)
      d->pid = -1;
}

bool SlurmCluster::wait_until_idle(std::string* why) {
  const std::vector<std::string> names = node_names();
  std::string said;
  for (const auto until = Clock::now() + std::chrono::seconds(30); Clock::now() < until;) {
    for (Daemon& d : daemons_)
      if (!running(d)) {
        *why = d.name + " " + describe(d.status) + " while the cluster started:\n" + logs_tail();
        return false;
      }
    const Result r = run("sinfo -h -N -p " + sh_word(options_.partition) + " -o '%N %t'", 5);
    said = r.output;
    std::set<std::string> idle;
    std::istringstream lines(r.output);
    for (std::string node, state; lines >> node >> state;)
      if (state == "idle") idle.insert(node);
    if (r.exit_code == 0 && idle == std::set<std::string>(names.begin(), names.end())) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  *why = "the nodes were not all idle after 30 s; sinfo said:\n" + said + "\n" + logs_tail();
  return false;
}

void SlurmCluster::cancel_jobs() {
  // Without munged or slurmctld every client call would only wait for its timeout.
  if (!up_ || !running(daemons_[0]) || !running(daemons_[1])) return;
  run("scancel --partition=" + sh_word(options_.partition), 10);
  // Completing jobs are still listed; KillWait=2 bounds how long they stay so.
  for (const auto until = Clock::now() + std::chrono::seconds(10);
       Clock::now() < until && !jobs().empty();)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

SlurmCluster::~SlurmCluster() {
  cancel_jobs();
  std::vector<Daemon*> slurmds;
  for (size_t i = 2; i < daemons_.size(); ++i)
    slurmds.push_back(&daemons_[i]);
  // Once munged is gone slurmd ignores SIGTERM (SLURM.md), and slurmctld did not end within 5 s
  // of it either (measured): SIGKILL at once then.
  auto signal_for = [this] {
    return !daemons_.empty() && running(daemons_[0]) ? SIGTERM : SIGKILL;
  };
  stop(slurmds, signal_for(), 5000);
  if (daemons_.size() > 1) stop({&daemons_[1]}, signal_for(), 5000);
  if (!daemons_.empty()) stop({&daemons_[0]}, SIGTERM, 5000);
  if (dir_.empty()) return;
  for (const char* name : {"SLURM_CONF", "SBATCH_OUTPUT"})
    if (const char* v = std::getenv(name); v != nullptr && std::string(v).starts_with(dir_ + "/"))
      ::unsetenv(name);
  std::error_code ignored;
  if (const char* keep = std::getenv("DSERVE_SLURM_TEST_KEEP"); keep && std::string(keep) == "1")
    std::cerr << "dserve: kept the Slurm cluster's directory " << dir_ << "\n";
  else
    fs::remove_all(dir_, ignored);
}

SlurmCluster::Result SlurmCluster::run(const std::string& command, int timeout_s) const {
  // PATH as find_program() searches it. -k: SIGKILL 2 s after the deadline's SIGTERM; timeout
  // signals its whole process group, so commands left in the background end with it.
  const std::string line = "PATH=\"$PATH\"" + std::string(kMorePath) +
                           " SLURM_CONF=" + sh_word(conf_path_) + " timeout -k 2 " +
                           std::to_string(timeout_s) + " sh -c " + sh_word(command) +
                           " </dev/null 2>&1";
  Result r;
  if (std::FILE* p = ::popen(line.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;)
      r.output.append(buf, n);
    const int status = ::pclose(p);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return r;
}

std::vector<std::string> SlurmCluster::jobs() const {
  const Result r = run("squeue -h -o %i", 10);
  std::vector<std::string> ids;
  std::istringstream in(r.exit_code == 0 ? r.output : "");
  for (std::string id; in >> id;)
    ids.push_back(id);
  return ids;
}

std::string SlurmCluster::logs_tail(size_t lines) const {
  std::string s;
  for (const Daemon& d : daemons_) {
    for (const std::string& path : {d.log_path, d.output_path}) {
      const std::string text = tail_of(path, lines);
      if (text.empty()) continue;
      s += "---- " + d.name + ": " + path + " (last " + std::to_string(lines) + " lines) ----\n" +
           text;
      if (s.back() != '\n') s += '\n';
    }
  }
  return s;
}

}  // namespace dserve::testing_support
