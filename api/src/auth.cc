#include "dserve/api/auth.h"

#include "dserve/core/files.h"
#include "dserve/ops/log.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>

namespace dserve::api {
namespace {

constexpr size_t kMinTokenChars = 16;  // shorter ones can be guessed
constexpr size_t kMaxTokenChars = 4096;

bool visible_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c > ' ' && c < 127; });
}

std::string format_rate(double rate) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", rate);
  return buf;
}

}  // namespace

std::string_view client_role_name(ClientRole role) {
  return role == ClientRole::kAdmin ? "admin" : "client";
}

Result<std::vector<ClientToken>> parse_token_file(std::string_view text, std::string_view source) {
  std::vector<ClientToken> out;
  std::vector<size_t> lines;
  std::istringstream in{std::string(text)};
  std::string line;
  const std::string src(source);
  for (size_t number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::istringstream words(line);
    std::vector<std::string> fields;
    for (std::string w; words >> w;)
      fields.push_back(w);
    if (fields.empty() || fields[0][0] == '#') continue;
    const std::string where = src + ":" + std::to_string(number);
    if (fields.size() > 3) {
      return invalid_argument(where +
                              ": expected `TOKEN`, `NAME TOKEN` or `NAME TOKEN ROLE`, found " +
                              std::to_string(fields.size()) + " fields");
    }
    ClientToken t;
    t.token = fields.size() == 1 ? fields[0] : fields[1];
    t.name = fields.size() >= 2 ? fields[0] : "token-" + std::to_string(number);
    if (fields.size() == 3) {
      if (fields[2] == "admin") {
        t.role = ClientRole::kAdmin;
      } else if (fields[2] != "client") {
        return invalid_argument(where + ": the role is '" + fields[2].substr(0, 32) +
                                "'; expected client or admin");
      }
    }
    if (t.token.size() < kMinTokenChars || t.token.size() > kMaxTokenChars) {
      return invalid_argument(where + ": the token has " + std::to_string(t.token.size()) +
                              " characters; expected " + std::to_string(kMinTokenChars) + " to " +
                              std::to_string(kMaxTokenChars) + " (a short token can be guessed)");
    }
    if (!visible_ascii(t.token) || !visible_ascii(t.name)) {
      return invalid_argument(where + ": names and tokens must be visible ASCII characters");
    }
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].name == t.name) {
        return invalid_argument(where + ": the client name '" + t.name +
                                "' is already used on line " + std::to_string(lines[i]));
      }
      if (out[i].token == t.token) {
        return invalid_argument(where + ": the same token as line " + std::to_string(lines[i]) +
                                " (each client needs its own)");
      }
    }
    out.push_back(std::move(t));
    lines.push_back(number);
  }
  if (out.empty()) {
    return invalid_argument(src +
                            ": no token (expected one client per line, `TOKEN`, `NAME TOKEN` "
                            "or `NAME TOKEN ROLE`)");
  }
  return out;
}

Result<std::vector<ClientToken>> load_token_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return not_found("token file " + path + " cannot be read (it does not exist, or a folder on " +
                     "the way is not accessible)");
  }
  if (!S_ISREG(st.st_mode)) return invalid_argument("token file " + path + " is not a file");
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return invalid_argument("token file " + path + " has mode " + mode +
                            ": group or others may read or change it; make it private to its "
                            "owner (chmod 600)");
  }
  auto text = read_credential_file("token file", path);
  if (!text.is_ok()) return text.status();
  return parse_token_file(*text, path);
}

Result<std::string> read_credential_file(const std::string& what, const std::string& path) {
  DSERVE_ASSIGN_OR_RETURN(std::string text, read_bounded_file(path, what, kMaxCredentialFileBytes));
  if (text.empty()) return invalid_argument(what + " " + path + " is empty");
  return text;
}

bool constant_time_equal(std::string_view secret, std::string_view presented) {
  // Walks the presented bytes whatever happens; secret bytes past its end read as 0 and the
  // length difference alone makes the result false.
  unsigned diff = secret.size() == presented.size() ? 0u : 1u;
  for (size_t i = 0; i < presented.size(); ++i) {
    const auto s = static_cast<unsigned char>(i < secret.size() ? secret[i] : 0);
    diff |= s ^ static_cast<unsigned char>(presented[i]);
  }
  return diff == 0;
}

TokenBucket::TokenBucket(double rate, double burst, Clock::time_point now)
    : rate_(rate), burst_(burst), tokens_(burst), last_(now) {}

bool TokenBucket::try_take(Clock::time_point now) {
  if (now > last_) {
    tokens_ =
        std::min(burst_, tokens_ + rate_ * std::chrono::duration<double>(now - last_).count());
    last_ = now;
  }
  if (tokens_ < 1.0) return false;
  tokens_ -= 1.0;
  return true;
}

// One client's running requests, shared with its Admissions: a slot is released without the
// Authenticator's lock.
struct Admission::Slot {
  std::mutex mu;
  uint32_t running = 0;
};

struct Authenticator::ClientState {
  explicit ClientState(const ClientLimits& limits, Clock::time_point now)
      : bucket(limits.requests_per_second, std::max(1.0, limits.requests_per_second), now),
        slot(std::make_shared<Admission::Slot>()) {}
  TokenBucket bucket;  // guarded by Authenticator::mu_
  std::shared_ptr<Admission::Slot> slot;
};

Admission::Admission(Admission&& other) noexcept
    : caller_(std::move(other.caller_)), slot_(std::move(other.slot_)) {}

Admission& Admission::operator=(Admission&& other) noexcept {
  if (this != &other) {
    release();
    caller_ = std::move(other.caller_);
    slot_ = std::move(other.slot_);
  }
  return *this;
}

Admission::~Admission() {
  release();
}

void Admission::release() {
  if (!slot_) return;
  std::lock_guard lock(slot_->mu);
  --slot_->running;
  slot_.reset();
}

Authenticator::Authenticator(std::vector<ClientToken> tokens, ClientLimits limits)
    : tokens_(std::move(tokens)), limits_(limits) {}

Authenticator::~Authenticator() = default;

Result<Caller> Authenticator::authenticate(std::optional<std::string_view> authorization) const {
  auto caller = check_token(authorization);
  if (!caller.is_ok() && log_)
    log_->warn("auth_refused", "", {{"reason", caller.status().message()}});
  return caller;
}

Result<Admission> Authenticator::admit(std::optional<std::string_view> authorization,
                                       Clock::time_point now) {
  auto caller = authenticate(authorization);
  if (!caller.is_ok()) return caller.status();
  const std::string name = caller->name;
  auto admitted = check_limits(std::move(caller).value(), now);
  if (!admitted.is_ok() && log_) {
    log_->warn("limit_refused", "", {{"client", name}, {"reason", admitted.status().message()}});
  }
  return admitted;
}

Result<Caller> Authenticator::check_token(std::optional<std::string_view> authorization) const {
  if (!required()) return Caller{};
  if (!authorization) {
    return unauthenticated("no credentials: send the header `Authorization: Bearer <token>`");
  }
  constexpr std::string_view kScheme = "Bearer ";
  std::string_view value = *authorization;
  // The scheme is case-insensitive (RFC 7235).
  if (value.size() <= kScheme.size() ||
      !std::equal(kScheme.begin(), kScheme.end(), value.begin(),
                  [](char a, char b) { return std::tolower(a) == std::tolower(b); })) {
    return unauthenticated("the authorization is not `Bearer <token>`");
  }
  value.remove_prefix(kScheme.size());
  while (!value.empty() && value.front() == ' ')
    value.remove_prefix(1);
  // Every token is compared, so that the time taken does not say which one came close.
  size_t match = tokens_.size();
  for (size_t i = 0; i < tokens_.size(); ++i) {
    if (constant_time_equal(tokens_[i].token, value)) match = i;
  }
  if (match == tokens_.size()) return unauthenticated("the token is not valid");
  return Caller{tokens_[match].name, tokens_[match].role};
}

Authenticator::ClientState& Authenticator::state_of(const std::string& client,
                                                    Clock::time_point now) {
  for (auto& [name, state] : states_) {
    if (name == client) return *state;
  }
  states_.emplace_back(client, std::make_shared<ClientState>(limits_, now));
  return *states_.back().second;
}

Result<Admission> Authenticator::check_limits(Caller caller, Clock::time_point now) {
  if (limits_.requests_per_second <= 0 && limits_.max_concurrent == 0) {
    return Admission(std::move(caller), nullptr);
  }
  const std::string& client = caller.name;
  std::shared_ptr<Admission::Slot> slot;
  {
    std::lock_guard lock(mu_);
    ClientState& state = state_of(client, now);
    if (limits_.max_concurrent > 0) {
      std::lock_guard slot_lock(state.slot->mu);
      if (state.slot->running >= limits_.max_concurrent) {
        return resource_exhausted("client '" + client + "' has " +
                                  std::to_string(state.slot->running) +
                                  " requests running: the concurrency limit is " +
                                  std::to_string(limits_.max_concurrent) + " per token");
      }
    }
    if (limits_.requests_per_second > 0 && !state.bucket.try_take(now)) {
      return resource_exhausted(
          "client '" + client + "' is over the rate limit of " +
          format_rate(limits_.requests_per_second) + " requests per second per token (burst " +
          format_rate(std::max(1.0, limits_.requests_per_second)) + "); retry later");
    }
    if (limits_.max_concurrent > 0) {
      std::lock_guard slot_lock(state.slot->mu);
      ++state.slot->running;
      slot = state.slot;
    }
  }
  return Admission(std::move(caller), std::move(slot));
}

namespace {

std::optional<std::string_view> authorization_of(const grpc::ServerContext& context) {
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return std::string_view(it->second.data(), it->second.size());
}

}  // namespace

grpc::Status authorize_call(const Authenticator* auth, const grpc::ServerContext& context,
                            Caller* caller) {
  if (auth == nullptr) {
    if (caller) *caller = Caller{};
    return grpc::Status::OK;
  }
  auto client = auth->authenticate(authorization_of(context));
  if (!client.is_ok()) {
    return {grpc::StatusCode::UNAUTHENTICATED,
            client.status().message() + " (gRPC metadata `authorization: Bearer <token>`)"};
  }
  if (caller) *caller = std::move(client).value();
  return grpc::Status::OK;
}

grpc::Status authorize_admin_call(const Authenticator* auth, const grpc::ServerContext& context,
                                  std::string_view call, std::string_view detail) {
  Caller caller;
  if (grpc::Status denied = authorize_call(auth, context, &caller); !denied.ok()) return denied;
  if (ops::Logger* log = auth ? auth->logger() : nullptr) {
    log->log(caller.admin() ? ops::LogLevel::kInfo : ops::LogLevel::kWarn,
             caller.admin() ? "admin_call" : "admin_refused", "",
             {{"client", caller.name}, {"call", call}, {"detail", detail}});
  }
  if (!caller.admin()) {
    return {grpc::StatusCode::PERMISSION_DENIED,
            std::string(call) + " needs a token with role admin; client '" + caller.name +
                "' has role " + std::string(client_role_name(caller.role))};
  }
  return grpc::Status::OK;
}

grpc::Status admit_call(Authenticator* auth, const grpc::ServerContext& context,
                        Admission& admission) {
  if (auth == nullptr) return grpc::Status::OK;
  auto admitted = auth->admit(authorization_of(context));
  if (!admitted.is_ok()) {
    const Status& s = admitted.status();
    if (s.code() == StatusCode::kUnauthenticated) {
      return {grpc::StatusCode::UNAUTHENTICATED,
              s.message() + " (gRPC metadata `authorization: Bearer <token>`)"};
    }
    return {grpc::StatusCode::RESOURCE_EXHAUSTED, s.message()};
  }
  admission = std::move(admitted).value();
  return grpc::Status::OK;
}

}  // namespace dserve::api
