#include "dserve/actors/actor_runtime.h"

#include <algorithm>
#include <iterator>
#include <random>
#include <thread>

#include <caf/after.hpp>
#include <caf/atom.hpp>
#include <caf/exit_reason.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/middleman_actor.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/sec.hpp>
#include <caf/send.hpp>

#include "control_tls_check.h"

namespace dserve::actors {
namespace {

Epoch fresh_epoch() {
  // Two 32-bit draws from the OS entropy source: restarts within the same second (same pid
  // even, in a container) still get different epochs.
  std::random_device rd;
  Epoch e = 0;
  while (e == 0)
    e = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return e;
}

std::string address(const std::string& host, uint16_t port) {
  return host + ":" + std::to_string(port);
}

std::string join(const std::set<std::string>& xs) {
  std::string out;
  for (const auto& x : xs) {
    if (!out.empty()) out += ", ";
    out += x;
  }
  return out;
}

// True if `actor` has already terminated (for a proxy: its connection is gone).
bool is_dead(caf::scoped_actor& self, const caf::strong_actor_ptr& actor) {
  bool dead = false;
  self->monitor(actor);
  self->receive([&](caf::down_msg& dm) { dead = dm.source == actor; },
                caf::after(std::chrono::milliseconds(0)) >> [] {});
  self->demonitor(caf::actor_cast<caf::actor_addr>(actor));
  return dead;
}

}  // namespace

caf::io::middleman_actor control_connector(caf::actor_system& system) {
  return system.has_openssl_manager() ? system.openssl_manager().actor_handle()
                                      : system.middleman().actor_handle();
}

Result<std::unique_ptr<ActorRuntime>> ActorRuntime::start(RuntimeConfig config) {
  if (config.listen_host.empty()) {
    return invalid_argument(
        "actor runtime: listen_host is empty (give an address, e.g. 127.0.0.1)");
  }
  if (config.scheduler_threads == 0)
    return invalid_argument("actor runtime: scheduler_threads must be at least 1");
  if (config.connect_timeout.count() <= 0 || config.request_timeout.count() <= 0)
    return invalid_argument("actor runtime: connect_timeout and request_timeout must be positive");

  auto cfg = std::make_unique<caf::actor_system_config>();
  // CAF 0.17 keys have no "caf." prefix; scheduler.policy is an atom there, not a string.
  cfg->set("scheduler.policy", caf::atom("sharing"));
  cfg->set("scheduler.max-threads", config.scheduler_threads);
  // Deserialize in the multiplexer thread: control messages are small, and no extra threads.
  cfg->set("middleman.workers", size_t{0});
  cfg->load<caf::io::middleman>();
  if (config.tls.enabled()) {
    if (Status ok = check_control_tls(config.tls); !ok.is_ok()) return ok;
    cfg->set("openssl.certificate", config.tls.cert);
    cfg->set("openssl.key", config.tls.key);
    cfg->set("openssl.cafile", config.tls.ca);
    cfg->load<caf::openssl::manager>();
  }
  register_message_types(*cfg);
  return std::unique_ptr<ActorRuntime>(new ActorRuntime(std::move(config), std::move(cfg)));
}

ActorRuntime::ActorRuntime(RuntimeConfig config, std::unique_ptr<caf::actor_system_config> cfg)
    : config_(std::move(config)),
      epoch_(fresh_epoch()),
      started_(std::chrono::steady_clock::now()),
      cfg_(std::move(cfg)),
      system_(std::make_unique<caf::actor_system>(*cfg_)) {}

ActorRuntime::~ActorRuntime() {
  if (published_port_) {
    caf::anon_send(control_connector(*system_), caf::close_atom::value, *published_port_);
  }
  std::vector<caf::actor> to_stop;
  {
    std::lock_guard<std::mutex> lock(mu_);
    to_stop.swap(owned_);
    peers_.clear();
  }
  if (published_) to_stop.push_back(published_);
  for (auto& a : to_stop)
    caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  to_stop.clear();
  published_ = nullptr;
  // The actor_system destructor waits for every actor, then stops the middleman.
  system_.reset();
}

uint64_t ActorRuntime::uptime_ms() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::steady_clock::now() - started_)
                                   .count());
}

Result<uint16_t> ActorRuntime::publish_impl(const caf::strong_actor_ptr& whom,
                                            std::set<std::string> sigs) {
  const std::string where = address(config_.listen_host, config_.listen_port);
  if (!whom) return invalid_argument("cannot publish a null actor handle at " + where);
  if (published_port_) {
    return invalid_argument("this process already published an actor at " +
                            address(config_.listen_host, *published_port_) +
                            "; a process has one control address");
  }
  caf::scoped_actor self{*system_};
  std::optional<uint16_t> port;
  caf::error err;
  self->request(control_connector(*system_), config_.request_timeout, caf::publish_atom::value,
                config_.listen_port, whom, std::move(sigs), config_.listen_host,
                config_.reuse_address)
      .receive([&](uint16_t p) { port = p; }, [&](caf::error& e) { err = e; });
  if (!port) {
    return unavailable("cannot publish the " + std::string(role_name(config_.role)) + " actor at " +
                       where + ": " + render(err));
  }
  published_port_ = *port;
  published_ = caf::actor_cast<caf::actor>(whom);
  if (config_.node_name.empty()) {
    config_.node_name =
        std::string(role_name(config_.role)) + "@" + address(config_.listen_host, *port);
  }
  return *port;
}

Result<caf::strong_actor_ptr> ActorRuntime::connect_impl(const std::string& host, uint16_t port,
                                                         std::chrono::milliseconds timeout,
                                                         const std::set<std::string>& expected) {
  const std::string where = address(host, port);
  if (host.empty() || port == 0)
    return invalid_argument("cannot connect to '" + where + "': host and port are required");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  caf::scoped_actor self{*system_};
  caf::strong_actor_ptr ptr;
  std::set<std::string> remote_sigs;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) left = std::chrono::milliseconds(1);
    caf::error err;
    bool replied = false;
    // The middleman actor instead of middleman().remote_actor(): the latter blocks without a
    // bound; a request carries our timeout.
    self->request(control_connector(*system_), left, caf::connect_atom::value, host, port)
        .receive(
            [&](caf::node_id&, caf::strong_actor_ptr& p, std::set<std::string>& sigs) {
              replied = true;
              ptr = std::move(p);
              remote_sigs = std::move(sigs);
            },
            [&](caf::error& e) { err = e; });
    if (!replied) {
      return unavailable("cannot connect to " + where + ": " +
                         (err == caf::sec::request_timeout
                              ? "no answer within " + std::to_string(timeout.count()) + " ms"
                              : render(err)));
    }
    // CAF 0.17's middleman caches host:port -> proxy and answers from that cache until it has
    // processed the proxy's death: right after a peer died we may get its dead proxy back.
    // Monitoring a dead actor delivers its down message at once; then ask again.
    if (!ptr || !is_dead(self, ptr)) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      return unavailable("cannot connect to " + where +
                         ": the actor there is gone (its process exited) and nothing new "
                         "answered within " +
                         std::to_string(timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!ptr) return unavailable("cannot connect to " + where + ": no actor is published there");
  // A dynamically typed handle (caf::actor) expects nothing; a typed one needs every signature
  // it declares to be offered by the remote actor.
  std::set<std::string> missing;
  std::set_difference(expected.begin(), expected.end(), remote_sigs.begin(), remote_sigs.end(),
                      std::inserter(missing, missing.end()));
  if (!expected.empty() && !missing.empty()) {
    return invalid_argument("the actor at " + where +
                            " does not implement the expected interface; missing: " +
                            join(missing) + "; it offers: " + join(remote_sigs));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers_[caf::actor_cast<caf::actor_addr>(ptr)] = where;
  }
  return ptr;
}

std::string ActorRuntime::describe(const caf::actor_addr& addr) const {
  if (!addr) return "null actor";
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(addr);
    if (it != peers_.end()) return it->second;
  }
  if (addr.node() == system_->node()) return "local actor " + std::to_string(addr.id());
  return "remote actor " + std::to_string(addr.id()) + " on node " + to_string(addr.node());
}

std::string ActorRuntime::render(const caf::error& err) const {
  if (!err) return "no error";
  if (err.category() == caf::atom("system")) {
    switch (static_cast<caf::sec>(err.code())) {
      case caf::sec::request_receiver_down:
        return "the peer is down (its process exited or the connection was lost)";
      case caf::sec::cannot_connect_to_node:
        return "connection refused or host unreachable (" + system_->render(err) + ")";
      case caf::sec::unexpected_message:
        return "the peer does not handle this message (are the message types registered on "
               "both sides?)";
      case caf::sec::no_actor_published_at_port:
        return "no actor is published at that port";
      default:
        break;
    }
  }
  if (err.category() == caf::atom("exit") &&
      static_cast<caf::exit_reason>(err.code()) == caf::exit_reason::remote_link_unreachable) {
    return "the connection to its process was lost";
  }
  return system_->render(err);
}

Status ActorRuntime::request_failed(const caf::actor_addr& dst, const caf::error& err,
                                    bool peer_down, std::chrono::milliseconds timeout) const {
  std::string why;
  if (peer_down) {
    why = "the peer is down: " + render(err);
  } else if (err == caf::sec::request_timeout) {
    why = "no reply within " + std::to_string(timeout.count()) + " ms";
  } else {
    why = render(err);
  }
  return unavailable("request to " + describe(dst) + " failed: " + why);
}

}  // namespace dserve::actors
