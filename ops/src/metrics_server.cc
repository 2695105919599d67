// MetricsServer on cpp-httplib: one accept thread, a pool of two handler threads.

#include "dserve/ops/metrics_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace dserve::ops {

struct MetricsServer::Impl {
  httplib::Server http;
  std::string host;
  uint16_t port = 0;
  std::thread accept_thread;
};

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsServer::~MetricsServer() {
  stop();
}

Result<std::unique_ptr<MetricsServer>> MetricsServer::start(const MetricsRegistry& registry,
                                                            MetricsServerOptions options) {
  if (options.host.empty()) {
    return invalid_argument(
        "metrics server: no host given (name the address to listen on, e.g. 127.0.0.1)");
  }
  auto impl = std::make_unique<Impl>();
  impl->host = options.host;
  httplib::Server& http = impl->http;
  // A scrape every few seconds needs no more than two handler threads.
  http.new_task_queue = [] { return new httplib::ThreadPool(2); };
  // httplib's default socket options add SO_REUSEPORT, which would let a second server bind a
  // port already in use and silently share it; keep only SO_REUSEADDR (restart over TIME_WAIT).
  http.set_socket_options([](int sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  http.set_read_timeout(5, 0);
  http.set_write_timeout(5, 0);
  http.Get("/metrics", [&registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry.text_exposition(), std::string(kTextExpositionContentType));
  });
  http.Get("/healthz",
           [health = std::move(options.health)](const httplib::Request&, httplib::Response& res) {
             const Status s = health ? health() : Status::ok();
             if (s.is_ok()) {
               res.set_content("ok\n", "text/plain; charset=utf-8");
             } else {
               res.status = 503;
               res.set_content(s.to_string() + "\n", "text/plain; charset=utf-8");
             }
           });

  // httplib reports a failed bind as false/-1 only; the errno of the failing socket call is
  // still set when it returns (a resolver failure leaves it 0).
  errno = 0;
  int bound = -1;
  if (options.port == 0) {
    bound = http.bind_to_any_port(options.host);
  } else if (http.bind_to_port(options.host, options.port)) {
    bound = options.port;
  }
  if (bound <= 0) {
    const int err = errno;
    return unavailable(
        "metrics server cannot listen on " + options.host + ":" + std::to_string(options.port) +
        ": " + (err != 0 ? std::strerror(err) : "the host does not resolve to a local address"));
  }
  impl->port = static_cast<uint16_t>(bound);

  httplib::Server* served = &http;
  impl->accept_thread = std::thread([served] { served->listen_after_bind(); });
  // httplib's stop() does nothing until the accept loop has marked itself running, so wait for
  // that here: afterwards stop() always ends the loop. The socket already listens, so nothing a
  // client sends meanwhile is lost.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!http.is_running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  auto server = std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
  if (!server->impl_->http.is_running()) {
    server->stop();
    return internal_error("metrics server on " + options.host + ":" + std::to_string(bound) +
                          " did not start serving within 10 s");
  }
  return server;
}

void MetricsServer::stop() {
  if (!impl_->accept_thread.joinable()) return;
  impl_->http.stop();
  impl_->accept_thread.join();
}

const std::string& MetricsServer::host() const {
  return impl_->host;
}

uint16_t MetricsServer::port() const {
  return impl_->port;
}

}  // namespace dserve::ops
