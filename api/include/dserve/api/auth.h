#pragma once
// Who may use the gateway's client APIs, and how much: bearer tokens from a token file, a
// request rate and a concurrency limit per token, and the TLS files of the listeners. One
// Authenticator serves the gRPC and the HTTP API together, so a client's limits count its
// requests on both.
//
// Token file (--token-file): one client per line, `TOKEN`, `NAME TOKEN` or `NAME TOKEN ROLE`;
// blank lines and lines starting with `#` are ignored. NAME is what logs and limit messages call
// the client (the token itself never appears in a message); a token without a name is called
// "token-<line>". ROLE is `client` (the default) or `admin`. Tokens are 16 to 4096 visible ASCII
// characters; names and tokens are unique. The file must not be readable or writable by group
// or others (chmod 600).
//
// Roles: a client generates, and sees and cancels only its own requests; an admin may also
// change the pools (Admin.AddWorker/RemoveWorker: `dserve up`, `scale`, `down`) and cancel any
// request. Every Admin call, and every refusal, is logged with the caller's name. Without a
// token file nobody is told apart: every caller is "anonymous", an admin.

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "dserve/core/status.h"

namespace dserve::ops {
class Logger;
}  // namespace dserve::ops

namespace dserve::api {

enum class ClientRole { kClient, kAdmin };
std::string_view client_role_name(ClientRole role);  // "client", "admin"

// One client's credential.
struct ClientToken {
  std::string name;  // how logs and messages name the client
  std::string token;
  ClientRole role = ClientRole::kClient;
};

// Who made a call, as its token says.
struct Caller {
  std::string name = "anonymous";
  ClientRole role = ClientRole::kAdmin;  // without a token file everyone is an admin
  bool admin() const { return role == ClientRole::kAdmin; }
};

// The clients in a token file's `text`; `source` names the file in the messages. Invalid
// (with the line) on a malformed line, a short token, an unknown role, a repeated name or
// token, or no token.
Result<std::vector<ClientToken>> parse_token_file(std::string_view text, std::string_view source);

// Reads and parses the token file at `path`; also refused when it cannot be read or when group
// or others have any permission on it.
Result<std::vector<ClientToken>> load_token_file(const std::string& path);

// a == b, in a time that depends on b's length only (b: what the client sent), never on where
// the two differ.
bool constant_time_equal(std::string_view secret, std::string_view presented);

// A token bucket: `rate` per second refill, at most `burst` held, full at construction. Not
// thread-safe (the Authenticator locks around it).
class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;
  TokenBucket(double rate, double burst, Clock::time_point now);
  // Takes one token if there is one.
  bool try_take(Clock::time_point now);

 private:
  double rate_;
  double burst_;
  double tokens_;
  Clock::time_point last_;
};

// Per-token limits; 0 is unlimited.
struct ClientLimits {
  double requests_per_second = 0;  // token bucket with burst max(1, rate)
  uint32_t max_concurrent = 0;     // requests running at once
};

// A request let in by Authenticator::admit: holds its client's concurrency slot until it is
// destroyed. Move-only.
class Admission {
 public:
  Admission() = default;
  Admission(Admission&& other) noexcept;
  Admission& operator=(Admission&& other) noexcept;
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;
  ~Admission();

  const std::string& client() const { return caller_.name; }  // "anonymous" when auth is off
  const Caller& caller() const { return caller_; }

  struct Slot;

 private:
  friend class Authenticator;
  Admission(Caller caller, std::shared_ptr<Slot> slot)
      : caller_(std::move(caller)), slot_(std::move(slot)) {}
  void release();
  Caller caller_;
  std::shared_ptr<Slot> slot_;  // null: no concurrency limit to release
};

// Checks `Authorization: Bearer <token>` values against the token file's clients and applies
// the per-token limits. Thread-safe. Without tokens, authentication is off and every caller is
// one client, "anonymous": the limits then bound all callers together.
class Authenticator {
 public:
  using Clock = TokenBucket::Clock;
  Authenticator(std::vector<ClientToken> tokens, ClientLimits limits);
  ~Authenticator();

  // Refusals (no or a wrong token: "auth_refused"; a spent limit: "limit_refused", with the
  // client's name) go to `log` (never the token itself); null: not logged. Set before serving.
  void set_logger(ops::Logger* log) { log_ = log; }

  ops::Logger* logger() const { return log_; }
  bool required() const { return !tokens_.empty(); }
  const ClientLimits& limits() const { return limits_; }
  size_t clients() const { return tokens_.size(); }

  // The client (name and role) of an Authorization value (nullopt: none sent);
  // kUnauthenticated, saying what is wrong, when no token matches. Every token is compared, in
  // constant time.
  Result<Caller> authenticate(std::optional<std::string_view> authorization) const;

  // authenticate(), then one request of the client's rate and a concurrency slot:
  // kResourceExhausted naming the limit and its value when either is spent.
  Result<Admission> admit(std::optional<std::string_view> authorization,
                          Clock::time_point now = Clock::now());

 private:
  Result<Caller> check_token(std::optional<std::string_view> authorization) const;
  Result<Admission> check_limits(Caller caller, Clock::time_point now);
  ops::Logger* log_ = nullptr;
  struct ClientState;
  // The client's state, made (its bucket full at `now`) on its first request.
  ClientState& state_of(const std::string& client, Clock::time_point now);

  std::vector<ClientToken> tokens_;
  ClientLimits limits_;
  std::mutex mu_;  // guards states_ and the buckets
  std::vector<std::pair<std::string, std::shared_ptr<ClientState>>> states_;  // by client
};

// For the gRPC handlers, called first in each: the call's `authorization` metadata checked by
// `auth` (null: everyone is let in, as an admin). UNAUTHENTICATED with a readable message
// otherwise. `caller`, when given, receives who called.
grpc::Status authorize_call(const Authenticator* auth, const grpc::ServerContext& context,
                            Caller* caller = nullptr);
// The same for an Admin call (`call`: "Admin.AddWorker"), which needs the admin role:
// PERMISSION_DENIED otherwise. Both outcomes are logged ("admin_call" / "admin_refused") with
// the caller's name, the call and `detail` (what it asked for).
grpc::Status authorize_admin_call(const Authenticator* auth, const grpc::ServerContext& context,
                                  std::string_view call, std::string_view detail);
// The same, then admission (rate and concurrency): RESOURCE_EXHAUSTED when a limit is spent.
// `admission` receives the slot to hold while the call runs.
grpc::Status admit_call(Authenticator* auth, const grpc::ServerContext& context,
                        Admission& admission);

// TLS of a listener or a client: PEM files. No cert: plain text.
struct TlsFiles {
  std::string cert;  // certificate chain
  std::string key;   // its private key
  std::string ca;    // server: clients must present a certificate signed by it (mutual TLS);
                     // client: the CA that signed the server's certificate
  bool enabled() const { return !cert.empty(); }
};

// Token files, certificates and keys are small; a larger one is refused before it is read.
inline constexpr size_t kMaxCredentialFileBytes = size_t{1} << 20;

// The text of a credential file; `what` ("--tls-cert") names it in the message. It must be a
// regular, non-empty file of at most kMaxCredentialFileBytes.
Result<std::string> read_credential_file(const std::string& what, const std::string& path);

}  // namespace dserve::api
