#include "dserve/api/serving_client.h"

#include "dserve/api/auth.h"
#include "dserve/api/serving_service.h"

namespace dserve::api {

Result<std::unique_ptr<ServingClient>> ServingClient::connect(const std::string& address,
                                                              std::chrono::milliseconds timeout,
                                                              const ClientOptions& options) {
  if (address.find(':') == std::string::npos)
    return invalid_argument("gateway address '" + address + "' is not HOST:PORT");
  if (options.tls_ca.empty() && !(options.tls_cert.empty() && options.tls_key.empty()))
    return invalid_argument("a client certificate is only sent over TLS: give the CA too");
  if (options.tls_cert.empty() != options.tls_key.empty())
    return invalid_argument("the client certificate and its key come together");
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments args;
  if (!options.tls_ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    DSERVE_ASSIGN_OR_RETURN(ssl.pem_root_certs, read_credential_file("TLS CA", options.tls_ca));
    if (!options.tls_cert.empty()) {
      DSERVE_ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                              read_credential_file("TLS certificate", options.tls_cert));
      DSERVE_ASSIGN_OR_RETURN(ssl.pem_private_key,
                              read_credential_file("TLS key", options.tls_key));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  }
  auto channel = grpc::CreateCustomChannel(address, credentials, args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + timeout)) {
    return unavailable("cannot connect to the gateway at " + address + " within " +
                       std::to_string(timeout.count()) + " ms" +
                       (options.tls_ca.empty()
                            ? std::string(" (in plain text: a gateway with TLS refuses that)")
                            : std::string(" (over TLS: the gateway must speak TLS with a "
                                          "certificate signed by the CA, for this host name)")));
  }
  return std::unique_ptr<ServingClient>(
      new ServingClient(address, std::move(channel), options.token));
}

ServingClient::ServingClient(std::string address, std::shared_ptr<grpc::Channel> channel,
                             std::string token)
    : address_(std::move(address)),
      token_(std::move(token)),
      channel_(std::move(channel)),
      stub_(dserve::v1::Serving::NewStub(channel_)),
      admin_stub_(dserve::v1::Admin::NewStub(channel_)) {}

Result<Completion> ServingClient::generate(const dserve::v1::GenerateRequest& request,
                                           const ChunkCallback& on_chunk,
                                           std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  if (timeout.count() > 0) context.set_deadline(std::chrono::system_clock::now() + timeout);
  if (!token_.empty()) context.AddMetadata("authorization", "Bearer " + token_);
  auto reader = stub_->Generate(&context, request);
  Completion out;
  dserve::v1::GenerateResponse msg;
  bool cancelled = false;
  Status stream_error;
  while (reader->Read(&msg)) {
    if (msg.first_index() != out.tokens.size() && stream_error.is_ok()) {
      stream_error = data_loss("the stream jumped from token " + std::to_string(out.tokens.size()) +
                               " to " + std::to_string(msg.first_index()));
    }
    out.tokens.insert(out.tokens.end(), msg.tokens().begin(), msg.tokens().end());
    out.text += msg.text();
    if (!msg.finish_reason().empty()) {
      out.finish_reason = msg.finish_reason();
      out.usage = msg.usage();
    }
    if (on_chunk && !cancelled && !on_chunk(msg)) {
      cancelled = true;
      context.TryCancel();
    }
  }
  const grpc::Status st = reader->Finish();
  if (cancelled) return cancelled_error("cancelled by the caller");
  if (!stream_error.is_ok()) return stream_error;
  if (!st.ok()) return from_grpc(st).with_context("gateway " + address_);
  if (out.finish_reason.empty())
    return data_loss("the stream from " + address_ + " ended without a finish reason");
  return out;
}

std::unique_ptr<grpc::ClientContext> ServingClient::context_for(
    std::chrono::milliseconds timeout) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (timeout.count() > 0) context->set_deadline(std::chrono::system_clock::now() + timeout);
  if (!token_.empty()) context->AddMetadata("authorization", "Bearer " + token_);
  return context;
}

Status ServingClient::cancel(const std::string& request_id, std::chrono::milliseconds timeout) {
  dserve::v1::CancelRequest request;
  request.set_request_id(request_id);
  dserve::v1::CancelResponse response;
  auto context = context_for(timeout);
  return from_grpc(stub_->Cancel(context.get(), request, &response));
}

namespace {

// One unary call: `call(context, &response)`; a failure carries the gateway's address.
template <class Response, class Call>
Result<Response> unary(const std::string& address, grpc::ClientContext* context, Call call) {
  Response response;
  const grpc::Status st = call(context, &response);
  if (!st.ok()) return from_grpc(st).with_context("gateway " + address);
  return response;
}

}  // namespace

Result<dserve::v1::ClusterStatus> ServingClient::status(std::chrono::milliseconds timeout) {
  auto context = context_for(timeout);
  return unary<dserve::v1::ClusterStatus>(address_, context.get(), [&](auto* c, auto* r) {
    return stub_->Status(c, dserve::v1::StatusRequest{}, r);
  });
}

Result<dserve::v1::ListModelsResponse> ServingClient::list_models(
    std::chrono::milliseconds timeout) {
  auto context = context_for(timeout);
  return unary<dserve::v1::ListModelsResponse>(address_, context.get(), [&](auto* c, auto* r) {
    return stub_->ListModels(c, dserve::v1::ListModelsRequest{}, r);
  });
}

Result<dserve::v1::HealthResponse> ServingClient::health(std::chrono::milliseconds timeout) {
  auto context = context_for(timeout);
  return unary<dserve::v1::HealthResponse>(address_, context.get(), [&](auto* c, auto* r) {
    return stub_->Health(c, dserve::v1::HealthRequest{}, r);
  });
}

Status ServingClient::add_worker(const std::string& role, const std::string& address,
                                 std::chrono::milliseconds timeout) {
  dserve::v1::AddWorkerRequest request;
  request.set_role(role);
  request.set_address(address);
  request.set_timeout_ms(static_cast<uint32_t>(timeout.count()));
  dserve::v1::AddWorkerResponse response;
  // The gateway waits up to `timeout`; the call gets a little longer to answer.
  auto context = context_for(timeout + std::chrono::seconds(5));
  return from_grpc(admin_stub_->AddWorker(context.get(), request, &response));
}

Result<uint32_t> ServingClient::remove_worker(const std::string& address,
                                              std::chrono::milliseconds timeout) {
  dserve::v1::RemoveWorkerRequest request;
  request.set_address(address);
  request.set_timeout_ms(static_cast<uint32_t>(timeout.count()));
  dserve::v1::RemoveWorkerResponse response;
  auto context = context_for(timeout + std::chrono::seconds(5));
  const grpc::Status st = admin_stub_->RemoveWorker(context.get(), request, &response);
  if (!st.ok()) return from_grpc(st);
  return response.drained_requests();
}

}  // namespace dserve::api
