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
#include "dserve/model/sampler.h"

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
  std::string address() const { return host_ + ":" + std::to_string(port_); }
  pid_t pid() const { return pid_; }

  // Sends `sig` and waits for the process to exit.
  void kill(int sig);
  // Starts the same command again on the same port (after kill()).
  bool restart(std::chrono::milliseconds timeout = std::chrono::milliseconds(60000));
  // What the process wrote on stderr so far.
  std::string log() const;

 private:
  bool launch(std::chrono::milliseconds timeout);
  std::string role_;
  std::string host_;
  std::vector<std::string> args_;
  std::vector<std::string> wrapper_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  uint16_t grpc_port_ = 0;
  std::filesystem::path err_file_;
};

struct ClusterOptions {
  int prefill = 2;
  int decode = 2;
  std::string host = "127.0.0.1";
  std::vector<std::string> prefill_args;
  std::vector<std::string> decode_args;
  std::vector<std::string> gateway_args;
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

// What `dserve generate --max-tokens n` produces for `prompt` with `params`, as token ids,
// computed in this process with the same model library.
std::vector<actors::TokenId> reference_tokens(const std::vector<actors::TokenId>& prompt, int64_t n,
                                              const model::SamplingParams& params = {});

// A prompt of `n` tokens: BOS then ids drawn from `seed`.
std::vector<actors::TokenId> random_prompt(int64_t n, uint64_t seed);

}  // namespace dserve::testing_support
