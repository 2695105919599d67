#include "dserve/api/serving_service.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "job_checks.h"

namespace dserve::api {
namespace {

using SteadyClock = std::chrono::steady_clock;

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// "req-<16 hex digits of this process>-<n>": unique across gateway processes and restarts.
std::string new_request_id() {
  static const uint64_t process = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  static std::atomic<uint64_t> next{1};
  char buf[64];
  std::snprintf(buf, sizeof buf, "req-%016llx-%llu", static_cast<unsigned long long>(process),
                static_cast<unsigned long long>(next.fetch_add(1)));
  return buf;
}

}  // namespace

grpc::Status to_grpc(const Status& status) {
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  switch (status.code()) {
    case StatusCode::kOk:
      return grpc::Status::OK;
    case StatusCode::kInvalidArgument:
      code = grpc::StatusCode::INVALID_ARGUMENT;
      break;
    case StatusCode::kNotFound:
      code = grpc::StatusCode::NOT_FOUND;
      break;
    case StatusCode::kOutOfRange:
      code = grpc::StatusCode::OUT_OF_RANGE;
      break;
    case StatusCode::kDataLoss:
      code = grpc::StatusCode::DATA_LOSS;
      break;
    case StatusCode::kUnimplemented:
      code = grpc::StatusCode::UNIMPLEMENTED;
      break;
    case StatusCode::kUnavailable:
      code = grpc::StatusCode::UNAVAILABLE;
      break;
    case StatusCode::kInternal:
      code = grpc::StatusCode::INTERNAL;
      break;
    case StatusCode::kResourceExhausted:
      code = grpc::StatusCode::RESOURCE_EXHAUSTED;
      break;
    case StatusCode::kDeadlineExceeded:
      code = grpc::StatusCode::DEADLINE_EXCEEDED;
      break;
    case StatusCode::kCancelled:
      code = grpc::StatusCode::CANCELLED;
      break;
    case StatusCode::kUnauthenticated:
      code = grpc::StatusCode::UNAUTHENTICATED;
      break;
    case StatusCode::kPermissionDenied:
      code = grpc::StatusCode::PERMISSION_DENIED;
      break;
  }
  return {code, status.message()};
}

Status from_grpc(const grpc::Status& status) {
  const std::string& msg = status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::OK:
      return Status::ok();
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
      return invalid_argument(msg);
    case grpc::StatusCode::NOT_FOUND:
      return not_found(msg);
    case grpc::StatusCode::OUT_OF_RANGE:
      return out_of_range(msg);
    case grpc::StatusCode::DATA_LOSS:
      return data_loss(msg);
    case grpc::StatusCode::UNIMPLEMENTED:
      return unimplemented(msg);
    case grpc::StatusCode::UNAVAILABLE:
      return unavailable(msg);
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return resource_exhausted(msg);
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return deadline_exceeded(msg);
    case grpc::StatusCode::CANCELLED:
      return cancelled_error(msg);
    case grpc::StatusCode::UNAUTHENTICATED:
      return unauthenticated(msg);
    case grpc::StatusCode::PERMISSION_DENIED:
      return permission_denied(msg);
    default:
      return internal_error(msg);
  }
}

ServingService::ServingService(actors::Gateway& gateway, const tokenizer::Tokenizer& tokenizer,
                               ServingOptions options)
    : gateway_(gateway), tokenizer_(tokenizer), options_(std::move(options)) {}

grpc::Status ServingService::Generate(grpc::ServerContext* context,
                                      const dserve::v1::GenerateRequest* request,
                                      grpc::ServerWriter<dserve::v1::GenerateResponse>* writer) {
  const auto received = SteadyClock::now();
  // Held until the call returns: the client's concurrency slot.
  Admission admission;
  if (grpc::Status refused = admit_call(options_.auth.get(), *context, admission); !refused.ok())
    return refused;
  actors::GenerateJob job;
  job.request_id = request->request_id().empty() ? new_request_id() : request->request_id();
  job.client = admission.client();
  if (request->prompt_tokens_size() > 0) {
    const int64_t vocab = tokenizer_.vocab_size();
    for (int i = 0; i < request->prompt_tokens_size(); ++i) {
      const int32_t id = request->prompt_tokens(i);
      if (id < 0 || id >= vocab) {
        return {grpc::StatusCode::INVALID_ARGUMENT,
                "prompt_tokens[" + std::to_string(i) + "] = " + std::to_string(id) +
                    " is not a token id (the vocabulary has " + std::to_string(vocab) + ")"};
      }
      job.prompt.push_back(id);
    }
  } else {
    if (request->prompt().empty()) {
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "the request has neither `prompt` text nor `prompt_tokens`"};
    }
    // The prompt's text is text: a chat prompt's control tokens come from the template only.
    auto ids = tokenizer::encode_prompt(tokenizer_, request->prompt(), request->chat(),
                                        options_.bos_token_id);
    if (!ids.is_ok()) {
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "`prompt` cannot be tokenized: " + ids.status().message()};
    }
    job.prompt = std::move(ids).value();
  }
  if (job.prompt.size() > options_.max_prompt_tokens) {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            "the prompt has " + std::to_string(job.prompt.size()) + " tokens; the limit is " +
                std::to_string(options_.max_prompt_tokens)};
  }
  job.max_new_tokens =
      request->max_tokens() == 0 ? options_.default_max_tokens : request->max_tokens();
  if (job.max_new_tokens > options_.max_tokens_limit) {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            "max_tokens = " + std::to_string(job.max_new_tokens) + " is above the limit of " +
                std::to_string(options_.max_tokens_limit)};
  }
  job.temperature = request->temperature();
  job.top_k = request->top_k();
  job.top_p = request->top_p() == 0.0f ? 1.0f : request->top_p();
  job.seed = request->seed();
  job.presence_penalty = request->presence_penalty();
  job.frequency_penalty = request->frequency_penalty();
  job.logit_bias.assign(request->logit_bias().begin(), request->logit_bias().end());
  std::sort(job.logit_bias.begin(), job.logit_bias.end());  // a map's order is unspecified
  if (dserve::Status s = check_penalties(job, tokenizer_.vocab_size()); !s.is_ok())
    return {grpc::StatusCode::INVALID_ARGUMENT, s.message()};
  if (request->timeout_ms() > 0) {
    job.deadline_unix_ms = unix_ms_now() + request->timeout_ms();
  } else if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    job.deadline_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                               context->deadline().time_since_epoch())
                               .count();
  }

  tokenizer::StreamDecoder text(tokenizer_);
  std::atomic<bool> client_gone{false};
  ::dserve::Status text_error;
  // The id the gateway uses (the caller's, or the one it assigns when admitting the request).
  const std::string& request_id = job.request_id;
  auto on_tokens = [&](std::span<const int32_t> tokens, uint32_t first_index) {
    dserve::v1::GenerateResponse msg;
    msg.set_request_id(request_id);
    msg.set_first_index(first_index);
    std::string piece;
    for (int32_t t : tokens) {
      msg.add_tokens(t);
      auto p = text.push(t);
      if (p.is_ok()) {
        piece += *p;
      } else if (text_error.is_ok()) {
        text_error = p.status();
      }
    }
    msg.set_text(std::move(piece));
    if (!writer->Write(msg)) client_gone = true;
  };
  auto cancelled = [&] { return client_gone.load() || context->IsCancelled(); };
  const actors::GenerateOutcome out = gateway_.generate(job, on_tokens, cancelled);
  if (!out.status.is_ok()) return to_grpc(out.status);

  dserve::v1::GenerateResponse last;
  last.set_request_id(request_id);
  last.set_first_index(out.tokens);
  last.set_text(text.flush());
  last.set_finish_reason(out.finish_reason);
  dserve::v1::Usage* usage = last.mutable_usage();
  usage->set_prompt_tokens(static_cast<uint32_t>(job.prompt.size()));
  usage->set_completion_tokens(out.tokens);
  usage->set_cached_prompt_tokens(out.cached_prefix_tokens);
  usage->set_attempts(out.attempts);
  usage->set_queue_ms(out.queue_ms);
  usage->set_time_to_first_token_ms(out.ttft_ms);
  usage->set_prefill_ms(out.prefill_ms);
  usage->set_kv_transfer_bytes(out.transfer_bytes);
  usage->set_kv_transfer_ms(out.transfer_ms);
  usage->set_handoff_ms(out.handoff_ms);
  usage->set_total_ms(
      std::chrono::duration<double, std::milli>(SteadyClock::now() - received).count());
  writer->Write(last);
  return grpc::Status::OK;
}

grpc::Status ServingService::Cancel(grpc::ServerContext* context,
                                    const dserve::v1::CancelRequest* request,
                                    dserve::v1::CancelResponse*) {
  Caller caller;
  if (grpc::Status denied = authorize_call(options_.auth.get(), *context, &caller); !denied.ok())
    return denied;
  if (request->request_id().empty()) {
    return {grpc::StatusCode::INVALID_ARGUMENT, "request_id is empty"};
  }
  return to_grpc(gateway_.cancel(request->request_id(), caller.name, caller.admin()));
}

dserve::v1::ClusterStatus to_cluster_status(const actors::GatewaySnapshot& snap,
                                            const std::string& model_name) {
  dserve::v1::ClusterStatus out;
  out.set_model(model_name);
  for (const actors::Role role : {actors::Role::kPrefill, actors::Role::kDecode}) {
    for (const actors::WorkerView& w : snap.workers) {
      if (w.role != role) continue;
      dserve::v1::WorkerStatus* ws = out.add_workers();
      ws->set_role(std::string(actors::role_name(w.role)));
      ws->set_address(w.address);
      ws->set_healthy(w.healthy);
      ws->set_draining(w.draining);
      ws->set_placed(w.placed);
      ws->set_placed_total(w.placed_total);
      ws->set_active_requests(w.last_report.active_requests);
      ws->set_queued_requests(w.last_report.queued_requests);
      ws->set_queued_tokens(w.queued_tokens);
      ws->set_kv_budget_bytes(w.last_report.free_kv_bytes + w.last_report.kv_budget_bytes_in_use);
      ws->set_kv_budget_bytes_in_use(w.last_report.kv_budget_bytes_in_use);
      ws->set_kv_page_bytes_in_use(w.last_report.kv_page_bytes_in_use);
      ws->set_cached_kv_bytes(w.last_report.cached_kv_bytes);
      ws->set_restarts(w.restarts);
      ws->set_uptime_ms(w.last_report.uptime_ms);
      ws->set_last_error(w.last_error);
      const actors::HealthReport& r = w.last_report;
      ws->set_drafted_tokens(r.drafted_tokens);
      ws->set_accepted_draft_tokens(r.accepted_draft_tokens);
      if (r.verify_request_steps > 0) {
        ws->set_acceptance_length(static_cast<double>(r.verify_committed_tokens) /
                                  static_cast<double>(r.verify_request_steps));
      }
      // [bucket * ks + k]: the worker's buckets are powers of two; ks follows from the count.
      const size_t figures = r.speculation_tokens_per_second.size();
      const size_t buckets = actors::kSpeculationBuckets;
      const size_t ks = figures % buckets == 0 ? figures / buckets : 0;
      for (size_t i = 0; ks > 0 && i < figures; ++i) {
        if (r.speculation_tokens_per_second[i] <= 0.0) continue;
        const size_t bucket = i / ks;
        dserve::v1::SpeculationSpeed* speed = ws->add_speculation_speed();
        speed->set_batch_from(1u << bucket);
        speed->set_batch_to(bucket + 1 == buckets ? 0u : (2u << bucket) - 1);
        speed->set_draft_tokens(static_cast<uint32_t>(i % ks));
        speed->set_tokens_per_second(r.speculation_tokens_per_second[i]);
      }
    }
  }
  out.set_running(static_cast<uint32_t>(snap.running));
  out.set_queued(static_cast<uint32_t>(snap.queued));
  out.set_admitted(snap.counters.admitted);
  out.set_completed(snap.counters.completed);
  out.set_failed(snap.counters.failed);
  out.set_cancelled(snap.counters.cancelled);
  out.set_refused(snap.counters.refused);
  out.set_replays(snap.counters.replays);
  out.set_accepting(snap.accepting);
  return out;
}

grpc::Status ServingService::Status(grpc::ServerContext* context, const dserve::v1::StatusRequest*,
                                    dserve::v1::ClusterStatus* response) {
  if (grpc::Status denied = authorize_call(options_.auth.get(), *context); !denied.ok())
    return denied;
  *response = to_cluster_status(gateway_.snapshot(), options_.model_name);
  return grpc::Status::OK;
}

grpc::Status ServingService::ListModels(grpc::ServerContext* context,
                                        const dserve::v1::ListModelsRequest*,
                                        dserve::v1::ListModelsResponse* response) {
  if (grpc::Status denied = authorize_call(options_.auth.get(), *context); !denied.ok())
    return denied;
  dserve::v1::ModelInfo* model = response->add_models();
  model->set_id(options_.model_name);
  model->set_context_tokens(options_.max_prompt_tokens);
  return grpc::Status::OK;
}

grpc::Status ServingService::Health(grpc::ServerContext* context, const dserve::v1::HealthRequest*,
                                    dserve::v1::HealthResponse* response) {
  if (grpc::Status denied = authorize_call(options_.auth.get(), *context); !denied.ok())
    return denied;
  const actors::GatewaySnapshot snap = gateway_.snapshot();
  bool prefill = false, decode = false;
  for (const actors::WorkerView& w : snap.workers) {
    if (!w.healthy || w.draining) continue;
    (w.role == actors::Role::kPrefill ? prefill : decode) = true;
  }
  std::string detail;
  if (!snap.accepting) detail = "the gateway is shutting down";
  if (!prefill) detail += std::string(detail.empty() ? "" : "; ") + "no healthy prefill worker";
  if (!decode) detail += std::string(detail.empty() ? "" : "; ") + "no healthy decode worker";
  response->set_status(detail.empty() ? dserve::v1::HealthResponse::SERVING
                                      : dserve::v1::HealthResponse::NOT_SERVING);
  response->set_detail(detail);
  return grpc::Status::OK;
}

grpc::Status AdminService::AddWorker(grpc::ServerContext* context,
                                     const dserve::v1::AddWorkerRequest* request,
                                     dserve::v1::AddWorkerResponse*) {
  if (grpc::Status denied = authorize_admin_call(
          auth_.get(), *context, "Admin.AddWorker",
          request->role().substr(0, 16) + " " + request->address().substr(0, 256));
      !denied.ok())
    return denied;
  actors::Role role;
  if (request->role() == "prefill") {
    role = actors::Role::kPrefill;
  } else if (request->role() == "decode") {
    role = actors::Role::kDecode;
  } else {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            "role must be 'prefill' or 'decode', got '" + request->role() + "'"};
  }
  auto endpoint = actors::parse_endpoint(request->address());
  if (!endpoint.is_ok()) return to_grpc(endpoint.status().with_context("address"));
  const auto timeout =
      std::chrono::milliseconds(request->timeout_ms() == 0 ? 60000 : request->timeout_ms());
  return to_grpc(gateway_.add_worker(role, *endpoint, timeout));
}

grpc::Status AdminService::RemoveWorker(grpc::ServerContext* context,
                                        const dserve::v1::RemoveWorkerRequest* request,
                                        dserve::v1::RemoveWorkerResponse* response) {
  if (grpc::Status denied = authorize_admin_call(auth_.get(), *context, "Admin.RemoveWorker",
                                                 request->address().substr(0, 256));
      !denied.ok())
    return denied;
  const auto timeout =
      std::chrono::milliseconds(request->timeout_ms() == 0 ? 300000 : request->timeout_ms());
  auto drained = gateway_.remove_worker(request->address(), timeout);
  if (!drained.is_ok()) return to_grpc(drained.status());
  response->set_drained_requests(*drained);
  return grpc::Status::OK;
}

Result<std::unique_ptr<GrpcServer>> GrpcServer::start(const std::vector<grpc::Service*>& services,
                                                      const GrpcServerOptions& options) {
  if (options.host.empty()) return invalid_argument("gRPC server: the listen host is empty");
  const std::string where = options.host + ":" + std::to_string(options.port);
  grpc::ServerBuilder builder;
  int bound = 0;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (options.tls.enabled()) {
    grpc::SslServerCredentialsOptions ssl(
        options.tls.ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                               : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    DSERVE_ASSIGN_OR_RETURN(pair.cert_chain, read_credential_file("--tls-cert", options.tls.cert));
    DSERVE_ASSIGN_OR_RETURN(pair.private_key, read_credential_file("--tls-key", options.tls.key));
    ssl.pem_key_cert_pairs.push_back(std::move(pair));
    if (!options.tls.ca.empty()) {
      DSERVE_ASSIGN_OR_RETURN(ssl.pem_root_certs, read_credential_file("--tls-ca", options.tls.ca));
    }
    credentials = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(where, credentials, &bound);
  for (grpc::Service* service : services)
    builder.RegisterService(service);
  grpc::ResourceQuota quota("dserve-grpc");
  quota.SetMaxThreads(options.max_threads);
  builder.SetResourceQuota(quota);
  // Only the address given: no SO_REUSEPORT sharing with another process.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound == 0) {
    return unavailable("gRPC server: cannot listen on " + where +
                       " (address in use, or not an address of this host)");
  }
  return std::unique_ptr<GrpcServer>(
      new GrpcServer(std::move(server), static_cast<uint16_t>(bound)));
}

GrpcServer::~GrpcServer() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server_->Wait();
}

}  // namespace dserve::api
