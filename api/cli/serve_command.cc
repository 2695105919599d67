// `dserve serve --role prefill|decode`: one process of a disaggregated cluster. Loads the model,
// starts the actor runtime and the UCX transfer engine, publishes the role's actor at --listen
// and prints "dserve: serving <role> on HOST:PORT" on stdout (the bound port when --listen asks
// for port 0), then serves until SIGINT or SIGTERM.

#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "dserve/actors/actor_runtime.h"
#include "dserve/decode/decode_worker.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/model.h"
#include "dserve/model/prefix_cache.h"
#include "dserve/prefill/prefill_worker.h"

namespace dserve::cli {
namespace {

struct ServeOptions {
  std::string role;
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string transports = "tcp";
  std::string net_devices = "lo";
  int64_t max_batch = 64;
  uint64_t kv_budget_mib = 1024;
  int64_t reservation_timeout_ms = 10000;
  int64_t region_grace_ms = 30000;
  int64_t token_budget = 2048;
};

int run_serve(const ServeOptions& o) {
  // Blocked before any thread starts, so that every thread inherits the mask and sigwait below
  // is the one place that sees them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  // A peer that dies mid-transfer closes its sockets: writing to them must fail the put with
  // an error, not kill this process with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);

  const auto colon = o.listen.rfind(':');
  if (colon == std::string::npos) {
    print_error("--listen must be HOST:PORT, got '" + o.listen + "'");
    return 2;
  }
  const std::string host = o.listen.substr(0, colon);
  int port = -1;
  try {
    port = std::stoi(o.listen.substr(colon + 1));
  } catch (const std::exception&) {
  }
  if (host.empty() || port < 0 || port > 65535) {
    print_error("--listen must be HOST:PORT with a port in 0..65535, got '" + o.listen + "'");
    return 2;
  }
  const bool is_decode = o.role == "decode";

  auto config = model::load_model_config(o.model_dir);
  if (!config.is_ok()) {
    print_error(config.status().to_string());
    return 2;
  }
  auto weights = model::load_checkpoint(o.model_dir, *config);
  if (!weights.is_ok()) {
    print_error(weights.status().to_string());
    return 1;
  }
  const model::Model model(std::move(config).value(), std::move(weights).value());

  std::unique_ptr<model::PrefixCache> cache;
  if (!is_decode) {
    auto fingerprint = model::checkpoint_fingerprint(o.model_dir);
    if (!fingerprint.is_ok()) {
      print_error(fingerprint.status().to_string());
      return 1;
    }
    auto opened = model::PrefixCache::open(model, *fingerprint, kvstore::PrefixStoreOptions{});
    if (!opened.is_ok()) {
      print_error(opened.status().to_string());
      return 1;
    }
    cache = std::move(opened).value();
  }

  kvstore::TransferOptions topts;
  topts.transports = o.transports;
  topts.net_devices = o.net_devices;
  topts.name = o.role + "@" + o.listen;
  auto engine = kvstore::TransferEngine::create(topts);
  if (!engine.is_ok()) {
    print_error("transfer engine: " + engine.status().to_string());
    return 1;
  }

  actors::RuntimeConfig rcfg;
  rcfg.role = is_decode ? actors::Role::kDecode : actors::Role::kPrefill;
  rcfg.listen_host = host;
  rcfg.listen_port = static_cast<uint16_t>(port);
  auto runtime = actors::ActorRuntime::start(rcfg);
  if (!runtime.is_ok()) {
    print_error(runtime.status().to_string());
    return 1;
  }
  actors::ActorRuntime& rt = **runtime;
  Result<uint16_t> bound = internal_error("not published");
  if (is_decode) {
    decode::DecodeWorkerOptions dopts;
    dopts.max_batch = o.max_batch;
    dopts.kv_budget_bytes = o.kv_budget_mib << 20;
    dopts.reservation_timeout = std::chrono::milliseconds(o.reservation_timeout_ms);
    dopts.region_grace = std::chrono::milliseconds(o.region_grace_ms);
    bound = rt.publish(decode::spawn_decode_worker(rt.system(), model, **engine, rt.epoch(),
                                                   "decode@" + o.listen, dopts));
  } else {
    prefill::PrefillWorkerOptions popts;
    popts.scheduler.token_budget = o.token_budget;
    bound = rt.publish(prefill::spawn_prefill_worker(rt.system(), *cache, model, **engine,
                                                     rt.epoch(), "prefill@" + o.listen, popts));
  }
  if (!bound.is_ok()) {
    print_error(bound.status().to_string());
    return 1;
  }
  std::printf("dserve: serving %s on %s:%u\n", o.role.c_str(), host.c_str(),
              static_cast<unsigned>(*bound));
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop, &sig);
  std::fprintf(stderr, "dserve: %s stopping (signal %d)\n", o.role.c_str(), sig);
  runtime->reset();  // stops the actors before the engine and the model they use go away
  return 0;
}

}  // namespace

Command add_serve_command(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "run one process of a disaggregated cluster");
  cmd->add_option("--role", o->role, "prefill or decode")
      ->required()
      ->check(CLI::IsMember({"prefill", "decode"}));
  cmd->add_option("--model", o->model_dir,
                  "model directory (config.json, safetensors, tokenizer.json)")
      ->required();
  cmd->add_option("--listen", o->listen, "control address HOST:PORT (port 0: any free port)")
      ->capture_default_str();
  cmd->add_option("--ucx-transports", o->transports, "UCX transports for KV transfer (UCX_TLS)")
      ->capture_default_str();
  cmd->add_option("--ucx-net-devices", o->net_devices, "network devices for UCX over TCP")
      ->capture_default_str();
  cmd->add_option("--max-batch", o->max_batch, "decode: reservations + decoding requests")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--kv-budget-mib", o->kv_budget_mib, "decode: KV byte budget")
      ->capture_default_str();
  cmd->add_option("--reservation-timeout-ms", o->reservation_timeout_ms,
                  "decode: a reservation without hand-off is released after this")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--region-grace-ms", o->region_grace_ms,
                  "decode: how long the region of an expired or cancelled reservation stays "
                  "mapped before it is freed (longer than the prefill's transfer timeout)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--token-budget", o->token_budget, "prefill: prompt tokens per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return [o] { return run_serve(*o); };
}

}  // namespace dserve::cli
