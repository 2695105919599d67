// The cluster test across network namespaces, so that nothing assumes one host: the gateway,
// the prefill workers and the decode workers each run in a namespace of their own, with its
// own address, and reach each other only over veth links (CAF for control, UCX over TCP on the
// veth device for the KV state). 40 concurrent greedy requests (prompts of 1 to 2,000 tokens)
// must be token-identical to `dserve generate`, as in cluster_test.
//
// Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's `ip`; skipped, saying why,
// without them.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::load_requests;
using testing_support::run_load_and_check;
using testing_support::ServeCluster;

using Ran = testing_support::CommandResult;

// `cmd` with its stderr.
Ran sh(const std::string& cmd) {
  return testing_support::run_command(cmd + " 2>&1");
}

bool pid_alive(long pid) {
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
}

// Whether this process holds `cap` (capabilities(7) number) in its effective set.
bool has_capability(int cap) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("CapEff:", 0) == 0)
      return (std::stoull(line.substr(7), nullptr, 16) >> cap) & 1u;
  }
  return false;
}

// Four network namespaces named dsv-<pid>-{a,b,c,x} and a veth leg into this process's own
// namespace; everything is deleted on destruction (deleting a namespace deletes the veth ends
// in it, and with them their peers).
//
//   this namespace: dsv<pid>r 10.213.S.1   (the test's gRPC client and health probes)
//   dsv-<pid>-a:    dsv0      10.213.S.2   (gateway)
//   dsv-<pid>-b:    dsv0      10.213.S.3   (prefill workers)
//   dsv-<pid>-c:    dsv0      10.213.S.4   (decode workers)
//   dsv-<pid>-x:    br0 with ports port-{a,b,c,r}, the other ends of the four veth pairs
//
// One bridge in a namespace of its own rather than point-to-point pairs: the three roles and
// the client sit on one LAN, as hosts do, with no routes to set up; and being outside the
// root namespace keeps the host's bridge netfilter and firewall out of the path. The client
// stays in the root namespace, with a leg on the same LAN, rather than entering namespace a:
// setns() moves only the calling thread, and gRPC opens its sockets on threads of its own.
// S is a /24 no route of this namespace uses yet, so that concurrent runs do not collide.
class NetnsTopology {
 public:
  static constexpr const char* kDevice = "dsv0";

  NetnsTopology() : pid_(std::to_string(::getpid())) {}
  NetnsTopology(const NetnsTopology&) = delete;
  NetnsTopology& operator=(const NetnsTopology&) = delete;
  ~NetnsTopology() { tear_down(); }

  // Builds the topology. Returns "" on success, and also when it cannot even try for lack of
  // privileges or tools (then `skip_reason` says why); otherwise the failing command and its
  // output. Whatever was made is deleted on destruction either way.
  std::string set_up(std::string* skip_reason) {
    if (sh("ip -V").exit_code != 0) {
      *skip_reason = "iproute2's `ip` is not installed";
      return "";
    }
    // CAP_NET_ADMIN = 12, CAP_SYS_ADMIN = 21 (capabilities(7)).
    if (::geteuid() != 0 && !(has_capability(12) && has_capability(21))) {
      *skip_reason =
          "not root and without CAP_SYS_ADMIN + CAP_NET_ADMIN: `ip netns add` needs both";
      return "";
    }
    remove_leftovers();
    const Ran first = sh("ip netns add " + ns("x"));
    if (first.exit_code != 0) {
      if (first.output.find("Operation not permitted") != std::string::npos ||
          first.output.find("Permission denied") != std::string::npos) {
        *skip_reason = "`ip netns add` is not permitted here: " + first.output;
        return "";
      }
      return "ip netns add " + ns("x") + ": " + first.output;
    }
    created_.push_back(ns("x"));
    subnet_ = free_subnet();
    if (subnet_.empty()) return "no free 10.213.S.0/24 subnet";
    std::vector<std::string> cmds{
        "ip -n " + ns("x") + " link set lo up",
        "ip -n " + ns("x") + " link add br0 type bridge",
        "ip -n " + ns("x") + " link set br0 up",
    };
    int host = 2;
    for (const char* n : {"a", "b", "c"}) {
      const std::string name = ns(n);
      const std::string port = std::string("port-") + n;
      if (Ran r = sh("ip netns add " + name); r.exit_code != 0)
        return "ip netns add " + name + ": " + r.output;
      created_.push_back(name);
      for (const std::string& c : {
               "ip -n " + name + " link set lo up",
               "ip -n " + name + " link add " + kDevice + " type veth peer name " + port +
                   " netns " + ns("x"),
               "ip -n " + ns("x") + " link set " + port + " master br0 up",
               "ip -n " + name + " addr add " + address(host) + "/24 dev " + kDevice,
               "ip -n " + name + " link set " + kDevice + " up",
           })
        cmds.push_back(c);
      ++host;
    }
    cmds.push_back("ip link add " + root_leg() + " type veth peer name port-r netns " + ns("x"));
    cmds.push_back("ip -n " + ns("x") + " link set port-r master br0 up");
    cmds.push_back("ip addr add " + address(1) + "/24 dev " + root_leg());
    cmds.push_back("ip link set " + root_leg() + " up");
    for (const std::string& c : cmds) {
      if (Ran r = sh(c); r.exit_code != 0) return c + ": " + r.output;
    }
    return "";
  }

  // The namespace of role n ("a", "b", "c", "x") and the address of host h on the LAN.
  std::string ns(const std::string& n) const { return "dsv-" + pid_ + "-" + n; }
  std::string address(int h) const { return "10.213." + subnet_ + "." + std::to_string(h); }
  std::vector<std::string> exec_in(const std::string& n) const {
    return {"ip", "netns", "exec", ns(n)};
  }

 private:
  std::string root_leg() const { return "dsv" + pid_ + "r"; }

  // Namespaces (and the processes still in them) and root legs of runs whose process is gone
  // (a crash, a SIGKILL by ctest's timeout), and any of this pid.
  void remove_leftovers() const {
    const std::regex ns_name("^(dsv-([0-9]+)-[abcx])\\b");
    std::istringstream list(sh("ip netns list").output);
    for (std::string line; std::getline(list, line);) {
      std::smatch m;
      if (!std::regex_search(line, m, ns_name)) continue;
      const long pid = std::stol(m[2]);
      if (m[2] != pid_ && pid_alive(pid)) continue;
      // Workers a killed test left running in it (its `dserve serve` children).
      std::istringstream pids(sh("ip netns pids " + m[1].str()).output);
      for (long p; pids >> p;)
        ::kill(static_cast<pid_t>(p), SIGKILL);
      sh("ip netns del " + m[1].str());
    }
    const std::regex leg("^[0-9]+: (dsv([0-9]+)r)[@:]");
    std::istringstream links(sh("ip -o link show").output);
    for (std::string line; std::getline(links, line);) {
      std::smatch m;
      if (!std::regex_search(line, m, leg)) continue;
      const long pid = std::stol(m[2]);
      if (m[2] == pid_ || !pid_alive(pid)) sh("ip link del " + m[1].str());
    }
  }

  // A third octet no route of this namespace uses, starting from one derived from the pid.
  std::string free_subnet() const {
    const std::string routes = sh("ip -4 route show").output;
    const int start = static_cast<int>(::getpid() % 250);
    for (int i = 0; i < 250; ++i) {
      const std::string s = std::to_string(1 + (start + i) % 250);
      if (routes.find("10.213." + s + ".") == std::string::npos) return s;
    }
    return "";
  }

  void tear_down() {
    // The bridge's namespace first: its veth ends take the root leg with them.
    for (auto it = created_.begin(); it != created_.end(); ++it)
      sh("ip netns del " + *it);
    created_.clear();
    sh("ip link del " + root_leg());  // only if the namespace deletion did not already
  }

  std::string pid_;
  std::string subnet_;
  std::vector<std::string> created_;
};

TEST(Netns, ClusterAcrossThreeNamespacesMatchesGenerate) {
  NetnsTopology net;
  std::string skip;
  const std::string error = net.set_up(&skip);
  if (!skip.empty()) GTEST_SKIP() << "skipped: " << skip;
  ASSERT_EQ(error, "") << "cannot build the namespaces";

  // gRPC would send a call to a non-local address through a proxy named in the environment.
  for (const char* v :
       {"grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY"})
    ::unsetenv(v);

  ClusterOptions o;
  o.prefill = 2;
  o.decode = 2;
  o.gateway_host = net.address(2);
  o.prefill_host = net.address(3);
  o.decode_host = net.address(4);
  o.gateway_wrapper = net.exec_in("a");
  o.prefill_wrapper = net.exec_in("b");
  o.decode_wrapper = net.exec_in("c");
  // UCX's tcp transport on the veth link (its default here is lo, which in a namespace of its
  // own reaches nothing else).
  o.prefill_args = {"--ucx-net-devices", NetnsTopology::kDevice};
  o.decode_args = {"--ucx-net-devices", NetnsTopology::kDevice};
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();
  EXPECT_EQ(cluster.grpc_address().rfind(net.address(2) + ":", 0), 0u) << cluster.grpc_address();

  const auto requests = load_requests(40, 2000, 7);
  const auto report = run_load_and_check(cluster, requests);
  EXPECT_EQ(report.completed, requests.size());
  EXPECT_EQ(report.failed, 0u);
}

}  // namespace
}  // namespace dserve
