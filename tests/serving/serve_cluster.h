#pragma once
// Real `dserve serve` processes for the serving tests: one process of a role (ServeProcess),
// and a whole cluster of them (ServeCluster: prefill and decode workers plus a gateway whose
// gRPC address a ServingClient connects to). Processes are killed (SIGKILL) on destruction.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dserve/actors/messages.h"
#include "dserve/kvstore/row_format.h"
#include "dserve/model/sampler.h"
#include "dserve/v1/serving.pb.h"

namespace dserve::actors {
class ActorRuntime;
}  // namespace dserve::actors

namespace dserve::testing_support {

class ServeProcess {
 public:
  // Starts `dserve serve --role ROLE --model MODEL --listen HOST:PORT EXTRA...`, prefixed by
  // `wrapper` (e.g. {"ip", "netns", "exec", "ns1"}) when given, and waits up to `timeout` for
  // its "dserve: serving ..." line. port 0: any free port (read back from that line).
  ServeProcess(std::string role, std::string host, uint16_t port, std::vector<std::string> extra,
               std::vector<std::string> wrapper = {},
               std::chrono::milliseconds timeout = std::chrono::milliseconds(60000));
  ~ServeProcess();
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  bool ready() const { return port_ != 0; }
  const std::string& role() const { return role_; }
  const std::string& host() const { return host_; }
  uint16_t port() const { return port_; }            // the control address's port
  uint16_t grpc_port() const { return grpc_port_; }  // gateway only
  // colocated only: the decode half's control port ("... decode HOST:PORT").
  uint16_t decode_port() const { return decode_port_; }
  // gateway with --http-listen only: the OpenAI-compatible API's port.
  uint16_t http_port() const { return http_port_; }
  // gateway with --metrics-listen only: the /metrics port.
  uint16_t metrics_port() const { return metrics_port_; }
  std::string address() const { return host_ + ":" + std::to_string(port_); }
  pid_t pid() const { return pid_; }

  // Sends `sig` and waits for the process to exit.
  void kill(int sig);
  // Starts the same command again on the same port (after kill()).
  bool restart(std::chrono::milliseconds timeout = std::chrono::milliseconds(60000));
  // What the process wrote on stderr so far.
  std::string log() const;
  // True while the process runs (it has not exited; a killed one is not alive).
  bool alive() const;

 private:
  bool launch(std::chrono::milliseconds timeout);
  std::string role_;
  std::string host_;
  std::vector<std::string> args_;
  std::vector<std::string> wrapper_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  uint16_t grpc_port_ = 0;
  uint16_t decode_port_ = 0;
  uint16_t http_port_ = 0;
  uint16_t metrics_port_ = 0;
  std::filesystem::path err_file_;
};

struct ClusterOptions {
  int prefill = 2;
  int decode = 2;
  std::string host = "127.0.0.1";
  std::vector<std::string> prefill_args;
  std::vector<std::string> decode_args;
  std::vector<std::string> gateway_args;
  // Per role, when set: the host to listen on (instead of `host`) and a command prefix (e.g.
  // {"ip", "netns", "exec", "ns1"}) to run the role's processes in another network namespace.
  std::string prefill_host;
  std::string decode_host;
  std::string gateway_host;
  std::vector<std::string> prefill_wrapper;
  std::vector<std::string> decode_wrapper;
  std::vector<std::string> gateway_wrapper;
};

class ServeCluster {
 public:
  explicit ServeCluster(ClusterOptions options);
  // True when every process started and the gateway saw a healthy worker of each role.
  bool ready() const;
  std::string grpc_address() const;
  // Every process's log, labelled, for failure messages.
  std::string logs() const;

  std::vector<std::unique_ptr<ServeProcess>> prefill;
  std::vector<std::unique_ptr<ServeProcess>> decode;
  std::unique_ptr<ServeProcess> gateway;
};

// The tiny test model's directory (tests/model/test_model.h).
std::string tiny_dir();
// The dserve binary the fixture starts: $DSERVE_TEST_BINARY (the device check's packed one),
// else this build's. $DSERVE_TEST_DEVICE, when set, is every worker's --device.
std::string dserve_binary();

struct CommandResult {
  int exit_code = -1;  // -1: it did not exit normally, or could not run
  std::string output;  // what it wrote on stdout (end the command with 2>&1 for stderr too)
};

// Runs `command` with sh and waits for it to end.
CommandResult run_command(const std::string& command);

// The whole file at `path` ("" when it cannot be read).
std::string read_file(const std::string& path);
// Whether process `pid` runs (exists and is not a zombie).
bool process_alive(pid_t pid);

// The first of `run` ports in a row on 127.0.0.1 that are all free now (for manifests, which
// name their ports: a test cannot ask for port 0), searched from a pid-dependent start below
// the kernel's ephemeral port range (10000 up to it; 20000..59999 when it leaves no room). A port
// taken in between still fails the test, but a program that holds one of them before it starts no
// longer does. Fails the test when there is none.
int free_port_run(int run);

// What `dserve generate --max-tokens n --kv-dtype D` produces for `prompt` with `params`, as
// token ids, computed in this process with the same model library.
std::vector<actors::TokenId> reference_tokens(const std::vector<actors::TokenId>& prompt, int64_t n,
                                              const model::SamplingParams& params = {},
                                              kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32);

// A prompt of `n` tokens: BOS then ids drawn from `seed`.
std::vector<actors::TokenId> random_prompt(int64_t n, uint64_t seed);

// A greedy GenerateRequest for `prompt` as token ids, at most `max_tokens` new tokens.
v1::GenerateRequest request_for(const std::vector<actors::TokenId>& prompt, uint32_t max_tokens);

// ---- concurrent load (cluster_test, netns_test) --------------------------------------------

struct LoadRequest {
  std::vector<actors::TokenId> prompt;
  uint32_t max_tokens = 1;
};

// `n` greedy requests: prompt lengths 1, 2, 127, 128, 129 and `max_prompt` first (those that
// fit in `n`), the others drawn from `seed` in 1..max_prompt; max_tokens drawn in 1..16. The
// same `seed` always gives the same requests.
std::vector<LoadRequest> load_requests(size_t n, int64_t max_prompt, uint64_t seed);

struct LoadReport {
  size_t completed = 0;  // ok and token-identical to the reference
  size_t failed = 0;
  double wall_s = 0;  // first request sent to last one finished
  double ttft_p50_ms = 0;
  double ttft_p99_ms = 0;
};

// Sends every request through one ServingClient connected to `cluster`'s gateway, each on its
// own thread, all released together, while this process computes the references
// (reference_tokens) on `reference_threads` threads, and the workers' health is probed every
// few ms. Records a gtest failure, with the message and the cluster's logs, for each request
// that failed, whose tokens or usage differ from the reference, for every worker never seen
// busy, and for a decode worker that still reports active or queued requests afterwards.
// Prints the figures on stderr ("[ info ] ...").
LoadReport run_load_and_check(const ServeCluster& cluster, const std::vector<LoadRequest>& requests,
                              int reference_threads = 1);

// ---- worker health (fault_test) ------------------------------------------------------------

// Asks worker processes (prefill or decode) for their HealthReport from this process, over CAF:
// an actor runtime of its own that publishes nothing. Connects on every call, so that a worker
// restarted on the same port answers as its new incarnation. Thread-safe; blocks.
class WorkerHealth {
 public:
  WorkerHealth();
  ~WorkerHealth();
  WorkerHealth(const WorkerHealth&) = delete;
  WorkerHealth& operator=(const WorkerHealth&) = delete;

  Result<actors::HealthReport> report(
      const ServeProcess& worker,
      std::chrono::milliseconds timeout = std::chrono::milliseconds(3000));

 private:
  std::unique_ptr<actors::ActorRuntime> rt_;
};

}  // namespace dserve::testing_support
