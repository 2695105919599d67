#pragma once
// ServingClient: the C++ client of the gateway's gRPC service (what `dserve submit` uses).
// Thread-safe: one client serves any number of concurrent calls.

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "dserve/core/status.h"
#include "dserve/v1/serving.grpc.pb.h"

namespace dserve::api {

struct Completion {
  std::vector<int32_t> tokens;
  std::string text;
  std::string finish_reason;
  dserve::v1::Usage usage;
};

// How to reach a gateway that wants a token or speaks TLS.
struct ClientOptions {
  std::string token;  // sent as `authorization: Bearer <token>` on every call; empty: none
  // TLS (the gateway's --tls-cert) when `tls_ca` is given: the PEM file of the CA that signed
  // the gateway's certificate. With mutual TLS (the gateway's --tls-ca), `tls_cert` and
  // `tls_key` are this client's certificate and key.
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  // The name the gateway's certificate must carry, when it is not the address's host.
  std::string tls_server_name;
};

// Called for every streamed message; return false to cancel the call.
using ChunkCallback = std::function<bool(const dserve::v1::GenerateResponse&)>;

class ServingClient {
 public:
  // `address` is HOST:PORT. Waits up to `timeout` for the channel to connect (over TLS: for
  // the handshake to succeed). A credential file that cannot be read is kNotFound.
  static Result<std::unique_ptr<ServingClient>> connect(const std::string& address,
                                                        std::chrono::milliseconds timeout,
                                                        const ClientOptions& options = {});

  // Runs one Generate call to its end. The stream is checked as it arrives: tokens must be
  // contiguous from index 0 (a gap or a repeat is a kDataLoss error). `timeout` (0: none) is
  // the gRPC deadline. A callback returning false cancels: kCancelled.
  Result<Completion> generate(const dserve::v1::GenerateRequest& request,
                              const ChunkCallback& on_chunk = {},
                              std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

  // The other calls of dserve.v1.Serving and dserve.v1.Admin (serving.proto says what each
  // does); `timeout` is the gRPC deadline. gRPC failures come back as their dserve Status.
  Status cancel(const std::string& request_id,
                std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
  Result<dserve::v1::ClusterStatus> status(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
  Result<dserve::v1::ListModelsResponse> list_models(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
  Result<dserve::v1::HealthResponse> health(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
  // Admin: `timeout` bounds the gateway's wait for the worker too.
  Status add_worker(const std::string& role, const std::string& address,
                    std::chrono::milliseconds timeout);
  Result<uint32_t> remove_worker(const std::string& address, std::chrono::milliseconds timeout);

  const std::string& address() const { return address_; }

 private:
  // A call context with the deadline and the token.
  std::unique_ptr<grpc::ClientContext> context_for(std::chrono::milliseconds timeout) const;

  ServingClient(std::string address, std::shared_ptr<grpc::Channel> channel, std::string token);
  std::string address_;
  std::string token_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<dserve::v1::Serving::Stub> stub_;
  std::unique_ptr<dserve::v1::Admin::Stub> admin_stub_;
};

}  // namespace dserve::api
