#pragma once
// The HTTP endpoint a scraper reads: GET /metrics (the registry's text exposition) and
// GET /healthz. It listens on exactly the address it is given and nowhere else.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dserve/core/status.h"
#include "dserve/ops/metrics.h"

namespace dserve::ops {

struct MetricsServerOptions {
  // The address to listen on (an IP address or a name that resolves to one); never empty, so
  // the server cannot end up on every interface by accident. "0.0.0.0" must be asked for.
  std::string host = "127.0.0.1";
  // 0: any free port; MetricsServer::port() reports the one bound.
  uint16_t port = 0;
  // Called for each GET /healthz: ok answers 200 "ok", a failure 503 with its message. Unset:
  // always ok. Must be thread-safe; it runs on the server's threads.
  std::function<Status()> health;
};

// A running metrics endpoint. Serves requests on its own threads (an accept thread and a pool of
// two) until stop() or destruction. Thread-safe: port()/host() any time, stop() from any thread
// but one of its own handlers.
class MetricsServer {
 public:
  // Binds host:port and starts serving `registry`, which must outlive the server.
  // Errors: kInvalidArgument for an empty host; kUnavailable when the address cannot be bound
  // (port in use, address not local, name not resolved), with host:port and the reason.
  static Result<std::unique_ptr<MetricsServer>> start(const MetricsRegistry& registry,
                                                      MetricsServerOptions options);
  ~MetricsServer();  // stop()s
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Closes the listening socket and waits for the serving threads; idempotent. Post: the port is
  // no longer accepting connections.
  void stop();

  const std::string& host() const;
  uint16_t port() const;

 private:
  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dserve::ops
