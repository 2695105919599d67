#pragma once
// Status and Result<T>: the error contract of every dserve API. A failure a caller can act on
// (bad input, missing file, peer gone) is returned as a value carrying a code and a message a
// person can read; it never crosses a module boundary as an exception.

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "dserve/core/check.h"

namespace dserve {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // the caller's input is malformed (file, flag, prompt, token id)
  kNotFound,           // a named thing (file, tensor, key) does not exist
  kOutOfRange,         // a value is outside what is supported (id past the vocabulary)
  kDataLoss,           // stored or received bytes are truncated or corrupt
  kUnimplemented,      // a valid request this build cannot serve
  kUnavailable,        // a resource is temporarily missing (device, peer)
  kInternal,           // an unexpected failure of a dependency
  kResourceExhausted,  // a limit is reached (batch, queue, capacity): retry later or elsewhere
  kDeadlineExceeded,   // the caller's deadline passed before the work was done
  kCancelled,          // the caller (or its client) asked to stop
  kUnauthenticated,    // the caller presented no valid credentials (token)
  kPermissionDenied,   // the caller is known but may not do this
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }
  bool is_ok() const { return code_ == StatusCode::kOk; }
  explicit operator bool() const { return is_ok(); }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: <message>", or "OK".
  std::string to_string() const;

  // Prepends context ("while loading X: ") to the message; no-op on ok.
  Status with_context(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string msg) {
  return {StatusCode::kInvalidArgument, std::move(msg)};
}
inline Status not_found(std::string msg) {
  return {StatusCode::kNotFound, std::move(msg)};
}
inline Status out_of_range(std::string msg) {
  return {StatusCode::kOutOfRange, std::move(msg)};
}
inline Status data_loss(std::string msg) {
  return {StatusCode::kDataLoss, std::move(msg)};
}
inline Status unimplemented(std::string msg) {
  return {StatusCode::kUnimplemented, std::move(msg)};
}
inline Status unavailable(std::string msg) {
  return {StatusCode::kUnavailable, std::move(msg)};
}
inline Status resource_exhausted(std::string msg) {
  return {StatusCode::kResourceExhausted, std::move(msg)};
}
inline Status deadline_exceeded(std::string msg) {
  return {StatusCode::kDeadlineExceeded, std::move(msg)};
}
inline Status cancelled_error(std::string msg) {
  return {StatusCode::kCancelled, std::move(msg)};
}
inline Status internal_error(std::string msg) {
  return {StatusCode::kInternal, std::move(msg)};
}
inline Status unauthenticated(std::string msg) {
  return {StatusCode::kUnauthenticated, std::move(msg)};
}
inline Status permission_denied(std::string msg) {
  return {StatusCode::kPermissionDenied, std::move(msg)};
}

// A value or the Status that explains its absence. Accessing the value of a failed Result is
// a programmer error and aborts.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    DSERVE_CHECK_MSG(!std::get<Status>(v_).is_ok(), "a Result cannot hold an ok Status");
  }

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  const Status& status() const {
    static const Status kOk;
    return is_ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & {
    DSERVE_CHECK_MSG(is_ok(), status().to_string());
    return std::get<T>(v_);
  }
  const T& value() const& {
    DSERVE_CHECK_MSG(is_ok(), status().to_string());
    return std::get<T>(v_);
  }
  T&& value() && {
    DSERVE_CHECK_MSG(is_ok(), status().to_string());
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace dserve

// Early-return helpers for functions that return Status or Result<U>.
#define DSERVE_CONCAT_INNER(a, b) a##b
#define DSERVE_CONCAT(a, b) DSERVE_CONCAT_INNER(a, b)

#define DSERVE_RETURN_IF_ERROR(expr)                    \
  do {                                                  \
    ::dserve::Status dserve_status_ = (expr);           \
    if (!dserve_status_.is_ok()) return dserve_status_; \
  } while (false)

#define DSERVE_ASSIGN_OR_RETURN(lhs, expr) \
  DSERVE_ASSIGN_OR_RETURN_IMPL(DSERVE_CONCAT(dserve_result_, __LINE__), lhs, expr)
// NOLINTBEGIN(bugprone-macro-parentheses): tmp is a name being declared and lhs a declaration
// or an assignable expression (`auto x`, `const T& y`, `z`); neither may be parenthesized.
#define DSERVE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.is_ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
// NOLINTEND(bugprone-macro-parentheses)
