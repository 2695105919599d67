#include "dserve/ops/log.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <type_traits>
#include <variant>

namespace dserve::ops {
namespace {

void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

void append_number(std::string& out, double v) {
  if (!std::isfinite(v)) {
    out += "null";
    return;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  // Shortest form that reads back the same value, for the common short cases.
  for (int precision = 1; precision < 17; ++precision) {
    char shorter[32];
    std::snprintf(shorter, sizeof(shorter), "%.*g", precision, v);
    if (std::strtod(shorter, nullptr) == v) {
      out += shorter;
      return;
    }
  }
  out += buf;
}

// A value as JSON, or (text format, `quote_if_needed`) bare when it reads unambiguously.
void append_value(std::string& out, const LogValue& value, bool text) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          const bool bare =
              text && !v.empty() && v.find_first_of(" =\"\\\t\n\r") == std::string::npos;
          if (bare) {
            out += v;
          } else {
            append_json_string(out, v);
          }
        } else if constexpr (std::is_same_v<T, bool>) {
          out += v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          append_number(out, v);
        } else {
          out += std::to_string(v);
        }
      },
      value.get());
}

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<LogFormat> parse_log_format(std::string_view name) {
  if (name == "text") return LogFormat::kText;
  if (name == "json") return LogFormat::kJson;
  return invalid_argument("log format must be 'text' or 'json', got '" + std::string(name) + "'");
}

std::string_view log_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

std::string rfc3339_ms(int64_t unix_ms) {
  const int64_t secs = unix_ms >= 0 ? unix_ms / 1000 : (unix_ms - 999) / 1000;
  const int ms = static_cast<int>(unix_ms - secs * 1000);
  const std::time_t t = static_cast<std::time_t>(secs);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[96];  // room for any int fields, so that nothing is cut
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  return buf;
}

Logger::Logger(LogFormat format, std::string process)
    : Logger(format, std::move(process), stderr, false) {}

Logger::Logger(LogFormat format, std::string process, std::FILE* file, bool owns_file)
    : format_(format), process_(std::move(process)), file_(file), owns_file_(owns_file) {}

Result<std::unique_ptr<Logger>> Logger::open(LogFormat format, std::string process,
                                             const std::string& path) {
  if (process.empty()) return invalid_argument("the log's process name is empty");
  if (path.empty()) return std::make_unique<Logger>(format, std::move(process));
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    return unavailable("cannot open log file '" + path +
                       "' for appending: " + std::strerror(errno));
  }
  return std::unique_ptr<Logger>(new Logger(format, std::move(process), f, true));
}

Logger::~Logger() {
  if (owns_file_) std::fclose(file_);
}

std::string Logger::format_line(int64_t unix_ms, LogLevel level, std::string_view event,
                                std::string_view request_id,
                                std::initializer_list<LogField> fields) const {
  std::string line;
  line.reserve(160);
  if (format_ == LogFormat::kJson) {
    line += "{\"ts\":\"" + rfc3339_ms(unix_ms) + "\",\"level\":\"";
    line += log_level_name(level);
    line += "\",\"process\":";
    append_json_string(line, process_);
    line += ",\"event\":";
    append_json_string(line, event);
    if (!request_id.empty()) {
      line += ",\"request_id\":";
      append_json_string(line, request_id);
    }
    for (const LogField& f : fields) {
      line.push_back(',');
      append_json_string(line, f.key);
      line.push_back(':');
      append_value(line, f.value, false);
    }
    line.push_back('}');
    return line;
  }
  line += rfc3339_ms(unix_ms);
  line.push_back(' ');
  line += log_level_name(level);
  line.push_back(' ');
  line += process_;
  line.push_back(' ');
  line += event;
  if (!request_id.empty()) {
    line += " request_id=";
    append_value(line, LogValue(request_id), true);
  }
  for (const LogField& f : fields) {
    line.push_back(' ');
    line += f.key;
    line.push_back('=');
    append_value(line, f.value, true);
  }
  return line;
}

void Logger::log(LogLevel level, std::string_view event, std::string_view request_id,
                 std::initializer_list<LogField> fields) {
  std::string line = format_line(unix_ms_now(), level, event, request_id, fields);
  line.push_back('\n');
  std::lock_guard<std::mutex> lock(mu_);
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

}  // namespace dserve::ops
