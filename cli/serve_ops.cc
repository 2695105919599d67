#include "serve_ops.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

namespace dserve::cli {
namespace {

// MiB to bytes; kInvalidArgument for 0 or a value whose bytes overflow 64 bits.
Result<uint64_t> mib_to_bytes(const char* flag, uint64_t mib) {
  if (mib == 0 || mib > (UINT64_MAX >> 20)) {
    return invalid_argument(std::string(flag) + " must be between 1 and " +
                            std::to_string(UINT64_MAX >> 20) + " MiB, got " + std::to_string(mib));
  }
  return mib << 20;
}

// Creates `path` (and its parents) when missing and checks that this process can write there.
Status prepare_disk_dir(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(path, ec) && !fs::is_directory(path, ec)) {
    return invalid_argument("--kv-disk-path '" + path + "' exists and is not a directory");
  }
  fs::create_directories(path, ec);
  if (ec) {
    return invalid_argument("--kv-disk-path '" + path + "' cannot be created: " + ec.message());
  }
  if (::access(path.c_str(), W_OK | X_OK) != 0) {
    return invalid_argument("--kv-disk-path '" + path +
                            "' is not writable by this process: " + std::strerror(errno));
  }
  return Status::ok();
}

}  // namespace

void add_serve_ops_flags(CLI::App& serve, ServeOpsFlags& f) {
  serve
      .add_option("--log-format", f.log_format,
                  "every role: one line per event as `text` or `json` (JSON lines with ts, "
                  "level, process, event, request_id and the event's fields)")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  serve.add_option("--log-file", f.log_file,
                   "every role: append the event log to this file (default: stderr)");
  serve.add_option("--process-name", f.process_name,
                   "every role: the `process` of each log line (default: the role)");
  serve
      .add_option("--kv-device-mib", f.kv_device_mib,
                  "prefill, colocated: prefix-store pages kept on the device beyond live "
                  "requests")
      ->capture_default_str();
  serve
      .add_option("--kv-host-mib", f.kv_host_mib,
                  "prefill, colocated: prefix-store payloads kept encoded in host memory")
      ->capture_default_str();
  serve
      .add_option("--kv-host-codec", f.kv_host_codec,
                  "prefill, colocated: codec of the host tier, lossless or fp8")
      ->capture_default_str();
  serve.add_option("--kv-disk-path", f.kv_disk_path,
                   "prefill, colocated: RocksDB directory of the prefix store's disk tier "
                   "(created when missing); no disk tier when not given");
  serve
      .add_option("--kv-disk-mib", f.kv_disk_mib,
                  "prefill, colocated: payload bytes the disk tier keeps")
      ->capture_default_str();
  serve
      .add_option("--kv-disk-codec", f.kv_disk_codec,
                  "prefill, colocated: codec of the disk tier, lossless or fp8")
      ->capture_default_str();
  serve
      .add_option("--kv-write-queue-mib", f.kv_write_queue_mib,
                  "prefill, colocated: payloads queued for the disk tier's background writes; "
                  "more are dropped (not stored) rather than slowing prefill")
      ->capture_default_str();
}

Result<std::unique_ptr<ops::Logger>> open_serve_logger(const ServeOpsFlags& flags,
                                                       const std::string& role) {
  auto format = ops::parse_log_format(flags.log_format);
  if (!format.is_ok()) return format.status().with_context("--log-format");
  const std::string name = flags.process_name.empty() ? role : flags.process_name;
  auto logger = ops::Logger::open(*format, name, flags.log_file);
  if (!logger.is_ok()) return logger.status().with_context("--log-file");
  return logger;
}

Result<kvstore::PrefixStoreOptions> prefix_store_options(const ServeOpsFlags& f) {
  kvstore::PrefixStoreOptions o;
  auto device = mib_to_bytes("--kv-device-mib", f.kv_device_mib);
  if (!device.is_ok()) return device.status();
  auto host = mib_to_bytes("--kv-host-mib", f.kv_host_mib);
  if (!host.is_ok()) return host.status();
  auto disk = mib_to_bytes("--kv-disk-mib", f.kv_disk_mib);
  if (!disk.is_ok()) return disk.status();
  auto queue = mib_to_bytes("--kv-write-queue-mib", f.kv_write_queue_mib);
  if (!queue.is_ok()) return queue.status();
  auto host_codec = kvstore::parse_codec(f.kv_host_codec);
  if (!host_codec.is_ok()) {
    return invalid_argument("--kv-host-codec must be lossless or fp8, got '" + f.kv_host_codec +
                            "'");
  }
  auto disk_codec = kvstore::parse_codec(f.kv_disk_codec);
  if (!disk_codec.is_ok()) {
    return invalid_argument("--kv-disk-codec must be lossless or fp8, got '" + f.kv_disk_codec +
                            "'");
  }
  if (!f.kv_disk_path.empty()) {
    if (*queue > *disk) {
      return invalid_argument("--kv-write-queue-mib (" + std::to_string(f.kv_write_queue_mib) +
                              ") is larger than --kv-disk-mib (" + std::to_string(f.kv_disk_mib) +
                              ")");
    }
    if (Status dir = prepare_disk_dir(f.kv_disk_path); !dir.is_ok()) return dir;
  }
  o.device_capacity_bytes = *device;
  o.host_capacity_bytes = *host;
  o.host_codec = *host_codec;
  o.disk_path = f.kv_disk_path;
  o.disk_capacity_bytes = *disk;
  o.disk_codec = *disk_codec;
  o.write_queue_bytes = *queue;
  return o;
}

}  // namespace dserve::cli
