#pragma once
// ActorRuntime: the CAF 0.17 actor system every dserve process runs (gateway, prefill, decode,
// node agent), with the io middleman loaded so that actors talk across processes and hosts.
//
// What it guarantees:
//   - nothing listens on any address but the one configured (listen_host:listen_port); the
//     middleman opens a listening socket only when publish() is called, and publish() binds
//     exactly there;
//   - connecting to a remote actor is bounded by a timeout and checks the remote interface;
//   - every failure comes back as a Status naming the address and what failed;
//   - each start gets a fresh random epoch, so peers can tell a restarted process apart;
//   - with ControlTls set, every control connection is mutual TLS (CAF's OpenSSL module): this
//     process publishes and connects over TLS only, presents its certificate, and accepts only
//     peers presenting one the cluster CA signed; a process without such a certificate cannot
//     connect to a worker, send it a message or be added to the cluster.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/error.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/io/middleman_actor.hpp>
#include <caf/system_messages.hpp>

#include "dserve/actors/messages.h"
#include "dserve/core/status.h"

namespace dserve::actors {

// The control plane's mutual TLS: all three PEM files, or none (plain TCP: one host, or a
// network the operator trusts). Every process of a cluster may share one certificate and key:
// holding a key the CA signed is what makes a process a member (names are not checked).
struct ControlTls {
  std::string cert;  // this process's certificate chain
  std::string key;   // its private key
  std::string ca;    // the cluster CA: a peer's certificate must chain to it
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

struct RuntimeConfig {
  Role role = Role::kGateway;
  // Shown in errors and health reports; defaults to "<role>@<host>:<port>" once published.
  std::string node_name;
  // The one control address of this process. Port 0 asks the OS for a free port; publish()
  // reports which one it got.
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;
  // Lets a restarted process bind its port again while connections of its previous
  // incarnation are still in TIME_WAIT (CAF sets SO_REUSEADDR; two live listeners on one port
  // remain impossible, a test checks it).
  bool reuse_address = true;
  // Scheduler threads for actors (CAF's "sharing" policy: on 2 cores it halves round-trip
  // latency compared with work stealing).
  size_t scheduler_threads = 2;
  // Default bound for connect() and call().
  std::chrono::milliseconds connect_timeout{3000};
  std::chrono::milliseconds request_timeout{5000};
  ControlTls tls;
};

// The actor that publishes and connects for `system`: the OpenSSL module's when the system
// runs with ControlTls, the plain middleman's otherwise. Actors that connect to peers
// themselves (request(handle, timeout, connect_atom, host, port)) must use this one.
caf::io::middleman_actor control_connector(caf::actor_system& system);

// Ownership: one per process, owned by main(); outlives every actor handle it gave out.
// Thread-safety: publish() is called once, at startup, before other threads use the runtime;
// connect(), call(), own(), describe() and render() may be called from any thread that is not
// an actor's (they block).
class ActorRuntime {
 public:
  // Starts the actor system and the middleman. Fails on an invalid configuration, and with
  // ControlTls, on a missing, unreadable or mismatched certificate, key or CA (checked here:
  // CAF reads them only when the first peer connects, and then aborts on an error).
  static Result<std::unique_ptr<ActorRuntime>> start(RuntimeConfig config);

  // Closes the published port, asks every actor registered with own() to quit, then waits for
  // all actors of this system to finish (CAF's shutdown semantics).
  ~ActorRuntime();
  ActorRuntime(const ActorRuntime&) = delete;
  ActorRuntime& operator=(const ActorRuntime&) = delete;

  caf::actor_system& system() { return *system_; }
  const RuntimeConfig& config() const { return config_; }
  // Random, non-zero, fixed for this runtime's lifetime.
  Epoch epoch() const { return epoch_; }
  // Milliseconds since start(), for health reports.
  uint64_t uptime_ms() const;

  // Publishes `handle` at the configured host:port and returns the bound port (the one the OS
  // picked when the configured port is 0). At most one actor per runtime: a process has one
  // control address. The runtime keeps the actor alive and stops it on destruction.
  template <class Handle>
  Result<uint16_t> publish(const Handle& handle) {
    return publish_impl(caf::actor_cast<caf::strong_actor_ptr>(handle),
                        system_->message_types(handle));
  }
  // The port publish() bound, if it succeeded.
  std::optional<uint16_t> published_port() const { return published_port_; }

  // Connects to the actor published at host:port and checks that it implements `Handle`'s
  // interface. Fails with kUnavailable (refused, unreachable, timeout) or kInvalidArgument
  // (an actor is there but speaks another interface), naming the address. Never returns the
  // dead proxy of a peer that died: CAF's middleman caches host:port -> proxy, so a dead one is
  // detected and the connection retried until `timeout`.
  template <class Handle>
  Result<Handle> connect(const std::string& host, uint16_t port,
                         std::optional<std::chrono::milliseconds> timeout = std::nullopt) {
    auto ptr = connect_impl(host, port, timeout.value_or(config_.connect_timeout),
                            system_->message_types(caf::detail::type_list<Handle>{}));
    if (!ptr.is_ok()) return ptr.status();
    return caf::actor_cast<Handle>(std::move(ptr).value());
  }

  // Sends `msg` to `dst` and blocks for the reply of type `Reply`, at most `timeout`. For
  // callers outside the actor world (CLI, tests, health checks); never call it from inside an
  // actor (it would block a scheduler thread): actors use request() instead.
  // Fails with kUnavailable when the peer is gone or does not answer in time, naming it. A
  // peer whose process dies fails the call as soon as its connection drops, not at the timeout:
  // CAF 0.17 silently drops requests already forwarded to a lost node, so the call also
  // monitors the destination and treats its down message as the answer.
  template <class Reply, class Handle, class Msg>
  Result<Reply> call(const Handle& dst, Msg msg,
                     std::optional<std::chrono::milliseconds> timeout = std::nullopt) {
    const auto bound = timeout.value_or(config_.request_timeout);
    struct Outcome {
      std::mutex mu;
      std::condition_variable cv;
      std::optional<Result<Reply>> result;
    };
    auto out = std::make_shared<Outcome>();
    call_async<Reply>(dst, std::move(msg), bound, [out](Result<Reply> r) {
      std::lock_guard<std::mutex> lock(out->mu);
      out->result.emplace(std::move(r));
      out->cv.notify_all();
    });
    std::unique_lock<std::mutex> lock(out->mu);
    // The request's own timeout fires first; the extra second only guards against a scheduler
    // that never runs the requester (a bug), so that this call can never block forever.
    if (!out->cv.wait_for(lock, bound + std::chrono::seconds(1),
                          [&] { return out->result.has_value(); })) {
      return internal_error("request to " + describe(caf::actor_cast<caf::actor_addr>(dst)) +
                            " got no outcome at all");
    }
    return std::move(*out->result);
  }

  // call() without blocking: returns at once, and `done` runs exactly once, on an actor thread,
  // with the reply or the same failures call() reports (peer down as soon as its connection
  // drops, no reply within `timeout`). `done` must not block; it may be called before
  // call_async returns. Safe to use from any thread, actors included.
  template <class Reply, class Handle, class Msg>
  void call_async(const Handle& dst, Msg msg, std::chrono::milliseconds timeout,
                  std::function<void(Result<Reply>)> done) {
    const auto dst_addr = caf::actor_cast<caf::actor_addr>(dst);
    if (!dst) {
      done(unavailable("request to an invalid (null) actor handle"));
      return;
    }
    auto fired = std::make_shared<std::atomic<bool>>(false);
    auto finish = [this, fired, dst_addr, timeout, done = std::move(done)](
                      std::optional<Reply> reply, const caf::error& err, bool down) {
      if (fired->exchange(true)) return;
      if (reply) {
        done(std::move(*reply));
      } else {
        done(request_failed(dst_addr, err, down, timeout));
      }
    };
    system_->spawn(
        [dst, dst_addr, timeout, finish, m = std::move(msg)](caf::event_based_actor* self) mutable {
          self->set_down_handler([self, dst_addr, finish](caf::down_msg& dm) {
            if (dm.source != dst_addr) return;
            finish(std::nullopt, dm.reason, true);
            self->quit();
          });
          // CAF 0.17 silently drops requests already forwarded to a lost node: the down
          // message of the destination is the answer then.
          self->monitor(dst);
          self->request(dst, timeout, std::move(m))
              .then(
                  [self, finish](Reply& r) {
                    finish(std::move(r), caf::error{}, false);
                    self->quit();
                  },
                  [self, finish](caf::error& e) {
                    finish(std::nullopt, e, false);
                    self->quit();
                  });
        });
  }

  // Runs `on_down` once, on an actor thread, when `handle` terminates: for a remote actor, when
  // its process exits or the connection to it is lost (at once, not at a timeout). Returns the
  // watcher, which the runtime stops on destruction; send it an exit message (caf::anon_send_exit)
  // to stop watching earlier. `on_down` must not block.
  template <class Handle>
  caf::actor watch(const Handle& handle, std::function<void(std::string why)> on_down) {
    const auto addr = caf::actor_cast<caf::actor_addr>(handle);
    auto watcher = system_->spawn(
        [this, handle, addr, on_down = std::move(on_down)](caf::event_based_actor* self) mutable {
          self->set_down_handler([this, self, addr, on_down](caf::down_msg& dm) {
            if (dm.source != addr) return;
            on_down(render(dm.reason));
            self->quit();
          });
          self->monitor(handle);
          return caf::behavior{[](int32_t) {}};  // nothing to do but wait for the down message
        });
    own(watcher);
    return watcher;
  }

  // Makes the runtime stop `handle` (send it an exit message) on destruction. For actors a
  // process spawns besides the published one; without it the actor system waits for them.
  template <class Handle>
  void own(const Handle& handle) {
    std::lock_guard<std::mutex> lock(mu_);
    owned_.push_back(caf::actor_cast<caf::actor>(handle));
  }

  // "host:port" of a handle obtained from connect(), or "local actor" / "unknown peer".
  std::string describe(const caf::actor_addr& addr) const;

  // Readable text for a CAF error.
  std::string render(const caf::error& err) const;

 private:
  ActorRuntime(RuntimeConfig config, std::unique_ptr<caf::actor_system_config> cfg);

  Result<uint16_t> publish_impl(const caf::strong_actor_ptr& whom, std::set<std::string> sigs);
  Result<caf::strong_actor_ptr> connect_impl(const std::string& host, uint16_t port,
                                             std::chrono::milliseconds timeout,
                                             const std::set<std::string>& expected);
  Status request_failed(const caf::actor_addr& dst, const caf::error& err, bool peer_down,
                        std::chrono::milliseconds timeout) const;

  RuntimeConfig config_;
  Epoch epoch_;
  std::chrono::steady_clock::time_point started_;
  // Declaration order matters: the config must outlive the system.
  std::unique_ptr<caf::actor_system_config> cfg_;
  std::unique_ptr<caf::actor_system> system_;
  std::optional<uint16_t> published_port_;
  caf::actor published_;

  mutable std::mutex mu_;  // guards owned_ and peers_
  std::vector<caf::actor> owned_;
  std::map<caf::actor_addr, std::string> peers_;  // from connect(): address -> "host:port"
};

}  // namespace dserve::actors
