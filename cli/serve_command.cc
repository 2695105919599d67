// `dserve serve --role gateway|prefill|decode`: one process of a disaggregated cluster.
// prefill/decode: loads the model, starts the actor runtime and the UCX transport,
// publishes the role's actor at --listen and prints "dserve: serving <role> on HOST:PORT" on
// stdout (the bound port when --listen asks for port 0; " metrics HOST:PORT" appended with
// --metrics-listen), then serves until SIGINT or SIGTERM. Every role logs its requests' events
// (--log-format, --log-file, --process-name: serve_ops.h).
// gateway: loads only the tokenizer and config, watches the workers named by --prefill and
// --decode, publishes its token sink at --listen and the gRPC service at --grpc-listen, prints
// "dserve: serving gateway on HOST:PORT grpc HOST:PORT" once a prefill and a decode worker
// are healthy (or an error after --ready-timeout-ms), then serves.

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "commands.h"
#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/gateway.h"
#include "dserve/api/auth.h"
#include "dserve/api/openai_server.h"
#include "dserve/api/serving_service.h"
#include "dserve/cluster/manifest.h"
#include "dserve/cluster/node_agent.h"
#include "dserve/decode/decode_worker.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/engine.h"
#include "dserve/model/model.h"
#include "dserve/model/prefix_cache.h"
#include "dserve/ops/metrics.h"
#include "dserve/ops/metrics_server.h"
#include "dserve/prefill/prefill_worker.h"
#include "dserve/tokenizer/tokenizer.h"
#include "model_digests.h"
#include "serve_compute.h"
#include "serve_gateway_watch.h"
#include "serve_ops.h"

namespace dserve::cli {

static_assert(cluster::kMaxSpeculativeTokens == model::kMaxDraftTokens,
              "a manifest's speculative_tokens bound is serve's");

namespace {

struct ServeOptions {
  std::string role;
  std::string model_dir;
  std::string model_sha256;  // pinned checksums.sha256 of model_dir; empty: not checked
  std::string kv_dtype = "fp32";
  std::string listen = "127.0.0.1:0";
  std::string transports = "tcp";
  std::string net_devices = "lo";
  int64_t max_batch = 64;
  int64_t speculative_tokens = 0;
  std::string speculation = "adaptive";
  uint64_t kv_budget_mib = 1024;
  int64_t reservation_timeout_ms = 30000;
  int64_t region_grace_ms = 30000;
  int64_t transfer_timeout_ms = 10000;
  int64_t token_budget = 2048;
  int64_t step_ms = 250;
  ServeComputeFlags compute;             // prefill, decode, colocated: the engine
  uint64_t inject_corrupt_handoffs = 0;  // fault injection, tests only
  // colocated: where the decode half listens (--listen is the prefill half's)
  std::string decode_listen = "127.0.0.1:0";
  // gateway
  std::string prefill_workers;
  std::string decode_workers;
  std::string grpc_listen = "127.0.0.1:50051";
  std::string http_listen;        // empty: no OpenAI-compatible HTTP API
  std::string metrics_listen;     // empty: no /metrics
  std::string served_model_name;  // empty: the model directory's name
  int64_t ready_timeout_ms = 60000;
  int64_t request_timeout_ms = 300000;
  int64_t max_running = 256;
  int64_t max_queued = 1024;
  int64_t max_attempts = 4;
  int64_t max_prefill_losses = 2;
  int64_t max_prefill_queue_tokens = 8192;
  int64_t probe_interval_ms = 250;
  int64_t reservation_renewal_ms = 5000;
  int64_t default_max_tokens = 256;
  int64_t max_prompt_tokens = 1 << 20;
  size_t http_max_body_bytes = size_t{1} << 20;
  int64_t http_backlog = 1024;
  // gateway: client security and per-token limits
  std::string token_file;          // empty: no authentication
  actors::ControlTls control_tls;  // every role: mutual TLS between the cluster's processes
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  int64_t max_output_tokens = 32768;
  double max_requests_per_second_per_token = 0;  // 0: unlimited
  int64_t max_concurrent_per_token = 0;          // 0: unlimited
  int64_t drain_timeout_ms = 30000;
  PoolLossFlags pool_loss;
  // every role: logs; prefill, colocated: the prefix store
  ServeOpsFlags ops;
};

Result<std::pair<std::string, uint16_t>> split_listen(const std::string& flag,
                                                      const std::string& value) {
  const auto colon = value.rfind(':');
  int port = -1;
  if (colon != std::string::npos) {
    try {
      size_t used = 0;
      port = std::stoi(value.substr(colon + 1), &used);
      if (used != value.size() - colon - 1) port = -1;
    } catch (const std::exception&) {
    }
  }
  if (colon == std::string::npos || colon == 0 || port < 0 || port > 65535) {
    return invalid_argument(flag + " must be HOST:PORT with a port in 0..65535, got '" + value +
                            "'");
  }
  return std::make_pair(value.substr(0, colon), static_cast<uint16_t>(port));
}

// The gateway's client security from its flags: the Authenticator (always one, so that the
// per-token limits apply without tokens too) and the TLS files, checked before anything starts.
Result<std::shared_ptr<api::Authenticator>> client_security(const ServeOptions& o,
                                                            api::TlsFiles& tls) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return invalid_argument("--tls-cert and --tls-key come together (got only " +
                            std::string(o.tls_cert.empty() ? "--tls-key" : "--tls-cert") + ")");
  }
  if (!o.tls_ca.empty() && o.tls_cert.empty()) {
    return invalid_argument(
        "--tls-ca checks client certificates, which needs TLS on: give --tls-cert and --tls-key");
  }
  tls = api::TlsFiles{o.tls_cert, o.tls_key, o.tls_ca};
  for (const auto& [flag, path] :
       {std::pair{"--tls-cert", &o.tls_cert}, std::pair{"--tls-key", &o.tls_key},
        std::pair{"--tls-ca", &o.tls_ca}}) {
    if (path->empty()) continue;
    auto text = api::read_credential_file(flag, *path);
    if (!text.is_ok()) return text.status();
  }
  if (o.default_max_tokens > o.max_output_tokens) {
    return invalid_argument("--default-max-tokens (" + std::to_string(o.default_max_tokens) +
                            ") is above --max-output-tokens (" +
                            std::to_string(o.max_output_tokens) + ")");
  }
  std::vector<api::ClientToken> tokens;
  if (!o.token_file.empty()) {
    auto loaded = api::load_token_file(o.token_file);
    if (!loaded.is_ok()) return loaded.status().with_context("--token-file");
    tokens = std::move(loaded).value();
  }
  api::ClientLimits limits;
  limits.requests_per_second = o.max_requests_per_second_per_token;
  limits.max_concurrent = static_cast<uint32_t>(o.max_concurrent_per_token);
  return std::make_shared<api::Authenticator>(std::move(tokens), limits);
}

int run_gateway(const ServeOptions& o, const sigset_t& stop) {
  auto listen = split_listen("--listen", o.listen);
  auto grpc_listen = split_listen("--grpc-listen", o.grpc_listen);
  auto prefill = actors::parse_endpoints(o.prefill_workers);
  auto decode = actors::parse_endpoints(o.decode_workers);
  for (const Status& s :
       {listen.status(), grpc_listen.status(), prefill.status().with_context("--prefill"),
        decode.status().with_context("--decode")}) {
    if (!s.is_ok()) {
      print_error(s.message());
      return 2;
    }
  }
  if (prefill->empty() || decode->empty()) {
    print_error("a gateway needs at least one --prefill and one --decode worker address");
    return 2;
  }
  auto config = model::load_model_config(o.model_dir);
  auto tokenizer = tokenizer::Tokenizer::load(o.model_dir + "/tokenizer.json");
  api::TlsFiles tls;
  auto auth = client_security(o, tls);
  for (const Status* s : {&config.status(), &tokenizer.status(), &auth.status()}) {
    if (!s->is_ok()) {
      print_error(s == &auth.status() ? s->message() : s->to_string());
      return 2;
    }
  }
  if ((*auth)->required()) {
    std::fprintf(stderr, "dserve: gateway: clients need a token (%zu clients in %s)\n",
                 (*auth)->clients(), o.token_file.c_str());
  }

  auto logger = open_serve_logger(o.ops, "gateway");
  if (!logger.is_ok()) {
    print_error(logger.status().message());
    return 2;
  }

  actors::RuntimeConfig rcfg;
  rcfg.role = actors::Role::kGateway;
  rcfg.tls = o.control_tls;
  rcfg.listen_host = listen->first;
  rcfg.listen_port = listen->second;
  auto runtime = actors::ActorRuntime::start(rcfg);
  if (!runtime.is_ok()) {
    print_error(runtime.status().to_string());
    return 1;
  }
  actors::ActorRuntime& rt = **runtime;
  actors::GatewayOptions gopts;
  gopts.prefill_workers = std::move(prefill).value();
  gopts.decode_workers = std::move(decode).value();
  gopts.default_deadline = std::chrono::milliseconds(o.request_timeout_ms);
  gopts.max_running = static_cast<size_t>(o.max_running);
  gopts.max_queued = static_cast<size_t>(o.max_queued);
  gopts.max_attempts = static_cast<int>(o.max_attempts);
  gopts.max_prefill_losses = static_cast<int>(o.max_prefill_losses);
  gopts.max_prefill_queue_tokens = static_cast<uint64_t>(o.max_prefill_queue_tokens);
  ops::MetricsRegistry metrics;
  gopts.metrics = &metrics;
  gopts.log = logger->get();
  (*auth)->set_logger(logger->get());
  gopts.probe_interval = std::chrono::milliseconds(o.probe_interval_ms);
  gopts.reservation_renewal = std::chrono::milliseconds(o.reservation_renewal_ms);
  auto gateway = actors::Gateway::start(rt, gopts);
  if (!gateway.is_ok()) {
    print_error(gateway.status().to_string());
    return 2;
  }
  auto bound = rt.publish((*gateway)->actor());
  if (!bound.is_ok()) {
    print_error(bound.status().to_string());
    return 1;
  }
  const std::string model_name =
      !o.served_model_name.empty()
          ? o.served_model_name
          : std::filesystem::path(o.model_dir).lexically_normal().filename().string();
  api::ServingOptions sopts;
  sopts.model_name = model_name.empty() ? "dserve" : model_name;
  sopts.default_max_tokens = static_cast<uint32_t>(o.default_max_tokens);
  sopts.max_prompt_tokens = static_cast<uint32_t>(o.max_prompt_tokens);
  sopts.bos_token_id = static_cast<int32_t>(config->bos_token_id);
  sopts.max_tokens_limit = static_cast<uint32_t>(o.max_output_tokens);
  sopts.auth = *auth;
  api::ServingService service(**gateway, *tokenizer, sopts);
  api::GrpcServerOptions grpc_opts;
  grpc_opts.host = grpc_listen->first;
  grpc_opts.port = grpc_listen->second;
  grpc_opts.max_threads = static_cast<int>(o.max_running + o.max_queued + 16);
  grpc_opts.tls = tls;
  api::AdminService admin(**gateway, *auth);
  auto server = api::GrpcServer::start({&service, &admin}, grpc_opts);
  if (!server.is_ok()) {
    print_error(server.status().to_string());
    return 1;
  }
  std::unique_ptr<api::OpenAiServer> http;
  std::string http_line;
  if (!o.http_listen.empty()) {
    auto where = split_listen("--http-listen", o.http_listen);
    if (!where.is_ok()) {
      print_error(where.status().message());
      return 2;
    }
    api::OpenAiOptions hopts;
    hopts.host = where->first;
    hopts.port = where->second;
    hopts.model_name = sopts.model_name;
    hopts.default_max_tokens = static_cast<uint32_t>(o.default_max_tokens);
    hopts.max_prompt_tokens = static_cast<uint32_t>(o.max_prompt_tokens);
    hopts.bos_token_id = static_cast<int32_t>(config->bos_token_id);
    hopts.max_tokens_limit = static_cast<uint32_t>(o.max_output_tokens);
    hopts.auth = *auth;
    hopts.tls = tls;
    hopts.threads = static_cast<int>(o.max_running + o.max_queued + 16);
    hopts.max_body_bytes = o.http_max_body_bytes;
    hopts.backlog = static_cast<int>(o.http_backlog);
    auto started = api::OpenAiServer::start(**gateway, *tokenizer, hopts);
    if (!started.is_ok()) {
      print_error(started.status().message());
      return 1;
    }
    http = std::move(started).value();
    http_line = " http " + where->first + ":" + std::to_string(http->port());
  }
  std::unique_ptr<ops::MetricsServer> metrics_server;
  if (!o.metrics_listen.empty()) {
    auto where = split_listen("--metrics-listen", o.metrics_listen);
    if (!where.is_ok()) {
      print_error(where.status().message());
      return 2;
    }
    ops::MetricsServerOptions mopts;
    mopts.host = where->first;
    mopts.port = where->second;
    auto started = ops::MetricsServer::start(metrics, mopts);
    if (!started.is_ok()) {
      print_error(started.status().message());
      return 1;
    }
    metrics_server = std::move(started).value();
    http_line += " metrics " + where->first + ":" + std::to_string(metrics_server->port());
  }
  if (Status ready = (*gateway)->wait_ready(std::chrono::milliseconds(o.ready_timeout_ms));
      !ready.is_ok()) {
    print_error(ready.message());
    return 1;
  }
  std::printf("dserve: serving gateway on %s:%u grpc %s:%u%s\n", listen->first.c_str(),
              static_cast<unsigned>(*bound), grpc_listen->first.c_str(),
              static_cast<unsigned>((*server)->port()), http_line.c_str());
  std::fflush(stdout);

  const int sig = wait_for_stop_or_pool_loss(stop, **gateway, o.pool_loss);
  // Graceful: admit nothing new, let the running requests finish (up to --drain-timeout-ms),
  // then stop; a second signal stops at once.
  (*gateway)->stop_accepting();
  const auto snap = (*gateway)->snapshot();
  std::fprintf(stderr, "dserve: gateway stopping (%s): draining %zu running and %zu queued\n",
               sig ? ("signal " + std::to_string(sig)).c_str() : "a pool was lost", snap.running,
               snap.queued);
  const auto drain_until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(o.drain_timeout_ms);
  bool idle = false;
  while (!(idle = (*gateway)->wait_idle(std::chrono::milliseconds(100))) &&
         std::chrono::steady_clock::now() < drain_until) {
    timespec now{0, 0};
    if (sigtimedwait(&stop, nullptr, &now) > 0) break;  // a second signal: stop at once
  }
  if (!idle) {
    std::fprintf(stderr, "dserve: gateway: cancelling the requests still running\n");
  }
  http.reset();
  metrics_server.reset();
  server->reset();  // cancels the calls in flight: their requests are cancelled on the workers
  gateway->reset();
  runtime->reset();
  return sig == 0 ? cluster::kPoolLostExitCode : 0;
}

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
  // A pinned checkpoint is checked file by file before anything is loaded: a flipped byte in a
  // weight file would otherwise change outputs with no error.
  if (!o.model_sha256.empty()) {
    auto verified = verify_model_digests(o.model_dir, o.model_sha256, digest_progress_on_stderr());
    if (!verified.is_ok()) {
      print_error("--model-sha256: " + verified.status().message());
      return 2;
    }
    std::fprintf(stderr, "dserve: %s\n", verified->c_str());
  }
  if (o.role == "gateway") return run_gateway(o, stop);

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
  const bool colocated = o.role == "colocated";
  const bool runs_decode = o.role == "decode" || colocated;
  const bool runs_prefill = o.role == "prefill" || colocated;
  // A put still in flight when its reservation is dropped may land until the sender's transfer
  // timeout; the range stays fenced until then, so that it lands where no other request reads.
  if (runs_decode && o.region_grace_ms <= o.transfer_timeout_ms) {
    print_error("--region-grace-ms (" + std::to_string(o.region_grace_ms) +
                ") must be longer than --transfer-timeout-ms (" +
                std::to_string(o.transfer_timeout_ms) +
                ", the cluster's): a put still in flight could land in another request's region");
    return 2;
  }
  // The engine's flags; the device first: a GPU this machine cannot use is refused before
  // anything loads.
  model::EngineOptions engine_options;
  if (runs_prefill || runs_decode) {
    auto checked = engine_options_from_flags(o.compute, colocated, o.max_batch);
    if (!checked.is_ok()) {
      print_error(checked.status().message());
      return checked.status().code() == StatusCode::kUnavailable ? 1 : 2;
    }
    engine_options = *checked;
  }
  std::string decode_host = host;
  int decode_port = -1;
  if (colocated) {
    auto d = split_listen("--decode-listen", o.decode_listen);
    if (!d.is_ok()) {
      print_error(d.status().message());
      return 2;
    }
    decode_host = d->first;
    decode_port = d->second;
  }

  // The operating flags, checked before the model loads: a bad value fails at once.
  auto logger = open_serve_logger(o.ops, o.role);
  if (!logger.is_ok()) {
    print_error(logger.status().message());
    return 2;
  }
  kvstore::PrefixStoreOptions store_options;
  if (runs_prefill) {
    auto kv = prefix_store_options(o.ops);
    if (!kv.is_ok()) {
      print_error(kv.status().message());
      return 2;
    }
    store_options = std::move(kv).value();
  }
  std::optional<std::pair<std::string, uint16_t>> metrics_at;
  if (!o.metrics_listen.empty()) {
    auto where = split_listen("--metrics-listen", o.metrics_listen);
    if (!where.is_ok()) {
      print_error(where.status().message());
      return 2;
    }
    metrics_at = std::move(where).value();
  }
  ops::MetricsRegistry metrics;

  int exit_code = 0;
  const std::shared_ptr<const model::Model> model =
      load_model_or_print(o.model_dir, o.kv_dtype, exit_code);
  if (!model) return exit_code;
  // One compute engine per worker; a co-located process's two workers share one, their steps
  // mixed. On a GPU each engine holds the weights and its requests' states there; the prefill
  // worker's queue is bounded by the requests its engine holds.
  const bool on_gpu = engine_options.device.kind == model::Device::Kind::kCuda;
  constexpr int64_t kGpuPrefillRequests = 16;
  ServeComputeOptions copts;
  copts.prefill = runs_prefill;
  copts.decode = runs_decode;
  copts.colocated = colocated;
  copts.engine = engine_options;
  copts.prefill_requests = kGpuPrefillRequests;
  copts.prefill_step_tokens = o.token_budget;
  copts.max_batch = o.max_batch;
  copts.draft_tokens = runs_decode ? o.speculative_tokens : 0;
  copts.mixed.max_step_tokens = o.compute.max_step_tokens;
  copts.mixed.mix_wait = std::chrono::microseconds(o.compute.step_mix_wait_us);
  if (metrics_at && colocated) copts.mixed.on_step = mixed_step_metrics(metrics);
  auto made_compute = make_serve_compute(model, copts);
  if (!made_compute.is_ok()) {
    print_error("--device " + o.compute.device + ": " + made_compute.status().to_string());
    return 1;
  }
  ServeCompute compute = std::move(made_compute).value();
  model::Engine* prefill_compute = compute.prefill.get();
  model::Engine* decode_compute = compute.decode.get();
  std::fprintf(stderr, "dserve: computing on %s%s\n", compute.any().describe().c_str(),
               colocated ? (", decode and prefill mixed in steps of up to " +
                            std::to_string(o.compute.max_step_tokens) + " rows")
                               .c_str()
                         : "");
  // A decode worker samples only ids the tokenizer can turn into text (the embedding may have
  // padding rows past them).
  int64_t sampleable_ids = 0;
  if (runs_decode) {
    auto tokenizer = tokenizer::Tokenizer::load(o.model_dir + "/tokenizer.json");
    if (!tokenizer.is_ok()) {
      print_error(tokenizer.status().to_string());
      return 2;
    }
    sampleable_ids = tokenizer->vocab_size();
  }

  std::unique_ptr<model::PrefixCache> cache;
  if (runs_prefill) {
    auto fingerprint = model::checkpoint_fingerprint(o.model_dir);
    if (!fingerprint.is_ok()) {
      print_error(fingerprint.status().to_string());
      return 1;
    }
    auto opened = model::PrefixCache::open(*prefill_compute, *fingerprint, store_options);
    if (!opened.is_ok()) {
      print_error(opened.status().to_string());
      return 1;
    }
    cache = std::move(opened).value();
    // A corrupt store is a cache lost: moved aside, started empty, and said loudly.
    if (const std::string note = cache->store().disk_quarantined(); !note.empty())
      (*logger)->warn("kv_store_quarantined", "", {{"detail", note}});
  }

  // One transport per role, as in separate processes (a co-located process hands off through
  // its own transports, over the same UCX transports).
  auto make_transport = [&](const std::string& name) {
    kvstore::TransferOptions topts;
    topts.transports = o.transports;
    topts.net_devices = o.net_devices;
    topts.name = name;
    topts.timeout = std::chrono::milliseconds(o.transfer_timeout_ms);
    return kvstore::Transport::create_ucx(topts);
  };
  std::unique_ptr<kvstore::Transport> prefill_transport, decode_transport;
  for (auto [wanted, slot, name] :
       {std::tuple{runs_prefill, &prefill_transport, "prefill@" + o.listen},
        std::tuple{runs_decode, &decode_transport, "decode@" + o.listen}}) {
    if (!wanted) continue;
    auto transport = make_transport(name);
    if (!transport.is_ok()) {
      print_error("transport: " + transport.status().to_string());
      return 1;
    }
    *slot = std::move(transport).value();
  }

  std::unique_ptr<actors::ActorRuntime> prefill_rt, decode_rt;
  uint16_t prefill_bound = 0, decode_bound = 0;
  if (runs_decode) {
    actors::RuntimeConfig rcfg;
    rcfg.role = actors::Role::kDecode;
    rcfg.tls = o.control_tls;
    rcfg.listen_host = colocated ? decode_host : host;
    rcfg.listen_port = static_cast<uint16_t>(colocated ? decode_port : port);
    auto runtime = actors::ActorRuntime::start(rcfg);
    if (!runtime.is_ok()) {
      print_error(runtime.status().to_string());
      return 1;
    }
    decode_rt = std::move(runtime).value();
    decode::DecodeWorkerOptions dopts;
    dopts.max_batch = o.max_batch;
    dopts.sampleable_ids = sampleable_ids;
    dopts.speculative_tokens = o.speculative_tokens;
    dopts.adaptive_speculation = o.speculation == "adaptive";
    dopts.kv_budget_bytes = o.kv_budget_mib << 20;
    dopts.reservation_timeout = std::chrono::milliseconds(o.reservation_timeout_ms);
    dopts.region_grace = std::chrono::milliseconds(o.region_grace_ms);
    dopts.log = logger->get();
    dopts.metrics = metrics_at ? &metrics : nullptr;
    auto worker = decode::spawn_decode_worker(
        decode_rt->system(), *decode_compute, *decode_transport, decode_rt->epoch(),
        "decode@" + rcfg.listen_host + ":" + std::to_string(rcfg.listen_port), dopts);
    if (!worker.is_ok()) {
      print_error("decode worker: " + worker.status().to_string());
      return 1;
    }
    auto bound = decode_rt->publish(*worker);
    if (!bound.is_ok()) {
      print_error(bound.status().to_string());
      return 1;
    }
    decode_bound = *bound;
  }
  if (runs_prefill) {
    actors::RuntimeConfig rcfg;
    rcfg.role = actors::Role::kPrefill;
    rcfg.tls = o.control_tls;
    rcfg.listen_host = host;
    rcfg.listen_port = static_cast<uint16_t>(port);
    auto runtime = actors::ActorRuntime::start(rcfg);
    if (!runtime.is_ok()) {
      print_error(runtime.status().to_string());
      return 1;
    }
    prefill_rt = std::move(runtime).value();
    prefill::PrefillWorkerOptions popts;
    popts.scheduler.token_budget = o.token_budget;
    popts.scheduler.max_step_time = std::chrono::milliseconds(o.step_ms);
    if (on_gpu) popts.scheduler.max_queued = kGpuPrefillRequests;
    popts.inject_corrupt_handoffs = o.inject_corrupt_handoffs;
    popts.log = logger->get();
    popts.metrics = metrics_at ? &metrics : nullptr;
    auto bound = prefill_rt->publish(
        prefill::spawn_prefill_worker(prefill_rt->system(), *cache, *prefill_transport,
                                      prefill_rt->epoch(), "prefill@" + o.listen, popts));
    if (!bound.is_ok()) {
      print_error(bound.status().to_string());
      return 1;
    }
    prefill_bound = *bound;
  }
  std::unique_ptr<ops::MetricsServer> metrics_server;
  std::string metrics_line;
  if (metrics_at) {
    ops::MetricsServerOptions mopts;
    mopts.host = metrics_at->first;
    mopts.port = metrics_at->second;
    auto started = ops::MetricsServer::start(metrics, mopts);
    if (!started.is_ok()) {
      print_error(started.status().message());
      return 1;
    }
    metrics_server = std::move(started).value();
    metrics_line = " metrics " + mopts.host + ":" + std::to_string(metrics_server->port());
  }
  if (colocated) {
    std::printf("dserve: serving colocated on %s:%u decode %s:%u%s\n", host.c_str(),
                static_cast<unsigned>(prefill_bound), decode_host.c_str(),
                static_cast<unsigned>(decode_bound), metrics_line.c_str());
  } else {
    std::printf("dserve: serving %s on %s:%u%s\n", o.role.c_str(), host.c_str(),
                static_cast<unsigned>(runs_decode ? decode_bound : prefill_bound),
                metrics_line.c_str());
  }
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop, &sig);
  std::fprintf(stderr, "dserve: %s stopping (signal %d)\n", o.role.c_str(), sig);
  // The actors stop before the engines, the cache, the model, the metrics and the log they use
  // go away.
  metrics_server.reset();
  prefill_rt.reset();
  decode_rt.reset();
  return 0;
}

}  // namespace

Command add_serve_command(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "run one process of a disaggregated cluster");
  cmd->footer(
      "A cluster: one or more `--role prefill` and `--role decode` processes, and a `--role "
      "gateway` naming them with --prefill and --decode; clients use `dserve submit`.");
  cmd->add_option("--role", o->role,
                  "gateway, prefill, decode, or colocated (a prefill and a decode worker in one "
                  "process sharing one engine: prefill chunks ride in the decode steps)")
      ->required()
      ->check(CLI::IsMember({"gateway", "prefill", "decode", "colocated"}));
  cmd->add_option("--model", o->model_dir,
                  "model directory (config.json, safetensors, tokenizer.json)")
      ->required();
  cmd->add_option("--model-sha256", o->model_sha256,
                  "refuse to start unless the model directory matches its checksums.sha256 and "
                  "that file has this SHA-256 (dserve model init prints it)");
  add_kv_dtype_option(*cmd, o->kv_dtype);
  cmd->add_option("--listen", o->listen, "control address HOST:PORT (port 0: any free port)")
      ->capture_default_str();
  cmd->add_option("--ucx-transports", o->transports, "UCX transports for KV transfer (UCX_TLS)")
      ->capture_default_str();
  cmd->add_option("--ucx-net-devices", o->net_devices, "network devices for UCX over TCP")
      ->capture_default_str();
  cmd->add_option("--max-batch", o->max_batch, "decode: reservations + decoding requests")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--speculative-tokens", o->speculative_tokens,
                  "decode: speculative decoding with the checkpoint's MTP block, draft tokens per "
                  "request per step at most (0: off; the cpu engine only)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, model::kMaxDraftTokens));
  cmd->add_option("--speculation", o->speculation,
                  "decode: adaptive (choose each step's draft count, down to 0, from the measured "
                  "acceptance and step cost) or fixed (always --speculative-tokens)")
      ->capture_default_str()
      ->check(CLI::IsMember({"adaptive", "fixed"}));
  cmd->add_option("--kv-budget-mib", o->kv_budget_mib, "decode: KV byte budget")
      ->capture_default_str();
  cmd->add_option("--reservation-timeout-ms", o->reservation_timeout_ms,
                  "decode: a reservation without hand-off is released after this")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--transfer-timeout-ms", o->transfer_timeout_ms,
                  "prefill/decode: bound on one KV transfer (the same on every worker)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--region-grace-ms", o->region_grace_ms,
                  "decode: how long the region of an expired or cancelled reservation stays "
                  "fenced before another reservation may use it (longer than the prefill's "
                  "transfer timeout)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  add_serve_compute_flags(*cmd, o->compute);
  cmd->add_option("--token-budget", o->token_budget, "prefill: prompt tokens per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--step-ms", o->step_ms,
                  "prefill: a step ends after the 256-token slice that passes this many ms, so "
                  "that a long prompt leaves the worker answering health probes and cancels "
                  "(0: the token budget alone)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--decode-listen", o->decode_listen,
                  "colocated: the decode half's control address HOST:PORT (--listen is the "
                  "prefill half's)")
      ->capture_default_str();
  cmd->add_option("--inject-corrupt-handoffs", o->inject_corrupt_handoffs,
                  "prefill, FAULT INJECTION FOR TESTS ONLY: corrupt one byte of the first N "
                  "hand-offs in the decode worker's region after the digested put, so that the "
                  "decode worker refuses them and the gateway replays the requests")
      ->capture_default_str();
  cmd->add_option("--prefill", o->prefill_workers,
                  "gateway: prefill workers' control addresses, HOST:PORT[,HOST:PORT...]");
  cmd->add_option("--decode", o->decode_workers,
                  "gateway: decode workers' control addresses, HOST:PORT[,HOST:PORT...]");
  cmd->add_option("--grpc-listen", o->grpc_listen, "gateway: gRPC address HOST:PORT (0: any)")
      ->capture_default_str();
  cmd->add_option("--http-listen", o->http_listen,
                  "gateway: OpenAI-compatible HTTP API address HOST:PORT (/v1/completions, "
                  "/v1/chat/completions, /v1/models); off when not given");
  cmd->add_option("--http-max-body-bytes", o->http_max_body_bytes,
                  "gateway: largest HTTP request body, chunked or not (larger: 413)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 30));
  cmd->add_option("--http-backlog", o->http_backlog,
                  "gateway: listen backlog of the HTTP API (connections the kernel holds while "
                  "every HTTP thread is busy and as many connections wait; beyond it, refused)")
      ->capture_default_str()
      ->check(CLI::Range(1, 65535));
  cmd->add_option(
      "--metrics-listen", o->metrics_listen,
      "every role: Prometheus /metrics and /healthz address HOST:PORT; off when not given");
  add_serve_ops_flags(*cmd, o->ops);
  cmd->add_option("--served-model-name", o->served_model_name,
                  "gateway: the model name the HTTP API lists and expects (default: the model "
                  "directory's name)");
  cmd->add_option("--ready-timeout-ms", o->ready_timeout_ms,
                  "gateway: how long to wait for a healthy prefill and decode worker at start")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--request-timeout-ms", o->request_timeout_ms,
                  "gateway: deadline of a request that sets none")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-running", o->max_running, "gateway: requests placed at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-queued", o->max_queued,
                  "gateway: requests waiting for a slot; more are refused (RESOURCE_EXHAUSTED)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-attempts", o->max_attempts,
                  "gateway: placements per request (the first and replays after failures)")
      ->capture_default_str()
      ->check(CLI::Range(1, actors::kMaxAttemptsLimit));
  cmd->add_option("--max-prefill-losses", o->max_prefill_losses,
                  "gateway: a request whose prefill worker is lost (hung past its probes, "
                  "crashed, restarted) this many times while computing its prompt fails "
                  "(RESOURCE_EXHAUSTED) instead of being placed again")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-prefill-queue-tokens", o->max_prefill_queue_tokens,
                  "gateway: prompt tokens placed on one prefill worker and not yet prefilled; "
                  "more requests wait at the gateway")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--probe-interval-ms", o->probe_interval_ms, "gateway: worker health probes")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--reservation-renewal-ms", o->reservation_renewal_ms,
                  "gateway: while a prefill runs, its decode reservation is renewed this often "
                  "(keep it well under the decode workers' --reservation-timeout-ms)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--default-max-tokens", o->default_max_tokens,
                  "gateway: max_tokens of a request that sets none")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-prompt-tokens", o->max_prompt_tokens, "gateway: longest prompt accepted")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-output-tokens", o->max_output_tokens,
                  "gateway: largest max_tokens a request may ask for; more is refused "
                  "(INVALID_ARGUMENT, HTTP 400)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{UINT32_MAX}));
  cmd->add_option("--token-file", o->token_file,
                  "gateway: clients must send `Authorization: Bearer <token>` (HTTP) or "
                  "`authorization` metadata (gRPC) with a token from this file: one `TOKEN` or "
                  "`NAME TOKEN` per line, # comments; mode 600. Off when not given");
  cmd->add_option("--tls-cert", o->tls_cert,
                  "gateway: PEM certificate chain; the gRPC and HTTP APIs speak TLS only (with "
                  "--tls-key)");
  cmd->add_option("--tls-key", o->tls_key, "gateway: PEM private key of --tls-cert");
  cmd->add_option("--tls-ca", o->tls_ca,
                  "gateway: PEM CA; clients must present a certificate it signed (mutual TLS)");
  cmd->add_option("--control-tls-cert", o->control_tls.cert,
                  "every role: PEM certificate this process presents to the cluster's other "
                  "processes; with --control-tls-key and --control-tls-ca the control plane is "
                  "mutual TLS: only processes holding a key the CA signed can connect");
  cmd->add_option("--control-tls-key", o->control_tls.key,
                  "every role: PEM private key of --control-tls-cert");
  cmd->add_option("--control-tls-ca", o->control_tls.ca,
                  "every role: PEM CA of the cluster; a peer's certificate must chain to it");
  cmd->add_option("--max-requests-per-second-per-token", o->max_requests_per_second_per_token,
                  "gateway: generation requests per second per token (burst max(1, rate)); "
                  "more are refused (RESOURCE_EXHAUSTED, HTTP 429); 0: unlimited. Without "
                  "--token-file, all clients share one budget")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-concurrent-per-token", o->max_concurrent_per_token,
                  "gateway: generation requests running at once per token; more are refused "
                  "(RESOURCE_EXHAUSTED, HTTP 429); 0: unlimited")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{UINT32_MAX}));
  cmd->add_option("--drain-timeout-ms", o->drain_timeout_ms,
                  "gateway: on SIGTERM/SIGINT, how long running requests may take to finish "
                  "before they are cancelled (new ones are refused at once)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  add_pool_loss_flags(*cmd, o->pool_loss);
  return [o] { return run_serve(*o); };
}

}  // namespace dserve::cli
