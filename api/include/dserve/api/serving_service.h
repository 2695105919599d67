#pragma once
// ServingService: the gateway's gRPC face (dserve.v1.Serving, api/proto/dserve/v1/
// serving.proto). Turns a GenerateRequest into a GenerateJob (tokenizing text prompts the way
// `dserve generate` does), runs it on the Gateway and streams the tokens back with their text.
// A client that goes away cancels its request on every worker.
//
// GrpcServer: the process's gRPC server, listening only on the address it is given.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "dserve/actors/gateway.h"
#include "dserve/api/auth.h"
#include "dserve/core/status.h"
#include "dserve/tokenizer/tokenizer.h"
#include "dserve/v1/serving.grpc.pb.h"

namespace dserve::api {

struct ServingOptions {
  std::string model_name = "dserve";  // what ListModels reports
  uint32_t default_max_tokens = 256;
  uint32_t max_tokens_limit = 32768;     // a larger max_tokens is refused
  uint32_t max_prompt_tokens = 1 << 20;  // a longer prompt is refused
  int32_t bos_token_id = 0;              // prepended to text prompts
  // Checks every call's token and the per-token limits (shared with the HTTP API); null:
  // every caller is let in, without limits.
  std::shared_ptr<Authenticator> auth;
};

// gRPC status for a dserve Status (same meaning, message kept).
grpc::Status to_grpc(const Status& status);
// dserve Status for a gRPC status.
Status from_grpc(const grpc::Status& status);

class ServingService final : public dserve::v1::Serving::Service {
 public:
  // `gateway` and `tokenizer` must outlive the service.
  ServingService(actors::Gateway& gateway, const tokenizer::Tokenizer& tokenizer,
                 ServingOptions options);

  grpc::Status Generate(grpc::ServerContext* context, const dserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<dserve::v1::GenerateResponse>* writer) override;
  grpc::Status Cancel(grpc::ServerContext* context, const dserve::v1::CancelRequest* request,
                      dserve::v1::CancelResponse* response) override;
  grpc::Status Status(grpc::ServerContext* context, const dserve::v1::StatusRequest* request,
                      dserve::v1::ClusterStatus* response) override;
  grpc::Status ListModels(grpc::ServerContext* context,
                          const dserve::v1::ListModelsRequest* request,
                          dserve::v1::ListModelsResponse* response) override;
  grpc::Status Health(grpc::ServerContext* context, const dserve::v1::HealthRequest* request,
                      dserve::v1::HealthResponse* response) override;

 private:
  actors::Gateway& gateway_;
  const tokenizer::Tokenizer& tokenizer_;
  ServingOptions options_;
};

// The Admin service: pool changes while traffic flows (`dserve up`, `dserve scale`).
class AdminService final : public dserve::v1::Admin::Service {
 public:
  // `auth` checks every call's token (null: no check); `gateway` must outlive the service.
  explicit AdminService(actors::Gateway& gateway, std::shared_ptr<Authenticator> auth = nullptr)
      : gateway_(gateway), auth_(std::move(auth)) {}

  grpc::Status AddWorker(grpc::ServerContext* context, const dserve::v1::AddWorkerRequest* request,
                         dserve::v1::AddWorkerResponse* response) override;
  grpc::Status RemoveWorker(grpc::ServerContext* context,
                            const dserve::v1::RemoveWorkerRequest* request,
                            dserve::v1::RemoveWorkerResponse* response) override;

 private:
  actors::Gateway& gateway_;
  std::shared_ptr<Authenticator> auth_;
};

// The ClusterStatus message for a gateway snapshot.
dserve::v1::ClusterStatus to_cluster_status(const actors::GatewaySnapshot& snapshot,
                                            const std::string& model_name);

struct GrpcServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: any free port (see GrpcServer::port())
  // Threads serving calls at most (each streaming call holds one while it runs); calls beyond
  // it are refused with RESOURCE_EXHAUSTED.
  int max_threads = 1300;
  // TLS (cert and key given): the listener speaks TLS only; with `ca`, clients must present a
  // certificate signed by it (mutual TLS).
  TlsFiles tls;
};

class GrpcServer {
 public:
  // Listens on options.host:options.port and serves `services` (which must outlive the
  // server).
  static Result<std::unique_ptr<GrpcServer>> start(const std::vector<grpc::Service*>& services,
                                                   const GrpcServerOptions& options);
  ~GrpcServer();  // stops accepting, cancels the calls in flight, waits for them
  uint16_t port() const { return port_; }

 private:
  GrpcServer(std::unique_ptr<grpc::Server> server, uint16_t port)
      : server_(std::move(server)), port_(port) {}
  std::unique_ptr<grpc::Server> server_;
  uint16_t port_;
};

}  // namespace dserve::api
