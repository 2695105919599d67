#pragma once
// Logger: one line per event of a dserve process, as JSON lines or as plain text, on stderr or
// appended to a file.
//
// JSON (one object per line, keys in this order, then the event's fields in the order given):
//   {"ts":"2025-01-31T12:00:00.123Z","level":"info","process":"prefill-0","event":"prefill_done",
//    "request_id":"r-17","prompt_tokens":300,...}
// `request_id` is left out when the event concerns no request (empty id). Strings are escaped
// (quotes, backslashes, control characters); a non-finite number is written as null.
// Text:
//   2025-01-31T12:00:00.123Z info prefill-0 prefill_done request_id=r-17 prompt_tokens=300
// with a string value quoted (JSON escaping) when it is empty or holds a space, '=' or '"'.
//
// Thread-safe: each line is formatted on the caller's thread and written whole under one
// mutex, then flushed, so lines of concurrent callers never interleave and a killed process
// loses at most the line being written.

#include <concepts>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <variant>

#include "dserve/core/status.h"

namespace dserve::ops {

enum class LogFormat : uint8_t { kText = 0, kJson = 1 };
// "text" or "json"; kInvalidArgument naming what was given otherwise.
Result<LogFormat> parse_log_format(std::string_view name);

enum class LogLevel : uint8_t { kInfo = 0, kWarn = 1, kError = 2 };
std::string_view log_level_name(LogLevel level);  // "info", "warn", "error"

// One value of an event's field: text, an integer, a number or a flag.
class LogValue {
 public:
  LogValue(std::string_view v) : value_(std::string(v)) {}  // NOLINT: implicit by design
  LogValue(const char* v) : value_(std::string(v)) {}       // NOLINT
  LogValue(const std::string& v) : value_(v) {}             // NOLINT
  LogValue(bool v) : value_(v) {}                           // NOLINT
  LogValue(double v) : value_(v) {}                         // NOLINT
  LogValue(float v) : value_(static_cast<double>(v)) {}     // NOLINT
  template <std::signed_integral T>
  requires(!std::same_as<T, bool>) LogValue(T v) : value_(static_cast<int64_t>(v)) {}  // NOLINT
  template <std::unsigned_integral T>
  requires(!std::same_as<T, bool>) LogValue(T v) : value_(static_cast<uint64_t>(v)) {}  // NOLINT

  const std::variant<std::string, int64_t, uint64_t, double, bool>& get() const { return value_; }

 private:
  std::variant<std::string, int64_t, uint64_t, double, bool> value_;
};

// A field of an event. `key` should be a plain identifier ([a-z0-9_]); it is escaped anyway.
struct LogField {
  std::string_view key;
  LogValue value;
};

class Logger {
 public:
  // Writes to stderr.
  Logger(LogFormat format, std::string process);
  // Appends to the file at `path` (created when missing); empty path: stderr. kInvalidArgument
  // for an empty process name; kUnavailable naming the path and the system's reason when the
  // file cannot be opened for appending.
  static Result<std::unique_ptr<Logger>> open(LogFormat format, std::string process,
                                              const std::string& path);
  ~Logger();
  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;

  // Writes one line. `request_id` empty: the event concerns no request.
  void log(LogLevel level, std::string_view event, std::string_view request_id,
           std::initializer_list<LogField> fields = {});
  void info(std::string_view event, std::string_view request_id,
            std::initializer_list<LogField> fields = {}) {
    log(LogLevel::kInfo, event, request_id, fields);
  }
  void warn(std::string_view event, std::string_view request_id,
            std::initializer_list<LogField> fields = {}) {
    log(LogLevel::kWarn, event, request_id, fields);
  }

  // The line log() would write at `unix_ms` (ms since the Unix epoch), without its newline.
  std::string format_line(int64_t unix_ms, LogLevel level, std::string_view event,
                          std::string_view request_id,
                          std::initializer_list<LogField> fields) const;

  LogFormat format() const { return format_; }
  const std::string& process() const { return process_; }

 private:
  Logger(LogFormat format, std::string process, std::FILE* file, bool owns_file);
  LogFormat format_;
  std::string process_;
  std::mutex mu_;
  std::FILE* file_;
  bool owns_file_;
};

// RFC 3339 UTC with milliseconds: "2025-01-31T12:00:00.123Z".
std::string rfc3339_ms(int64_t unix_ms);

}  // namespace dserve::ops
