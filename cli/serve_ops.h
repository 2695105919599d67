#pragma once
// The `dserve serve` flags for operating a process, shared by every role: structured logs
// (--log-format, --log-file, --process-name) and, for roles with a prefill worker, the prefix
// store's tiers (--kv-*). Parsed here into typed options, validated before anything starts.

#include <CLI/CLI.hpp>

#include <cstdint>
#include <memory>
#include <string>

#include "dserve/core/status.h"
#include "dserve/kvstore/prefix_store.h"
#include "dserve/ops/log.h"

namespace dserve::cli {

struct ServeOpsFlags {
  std::string log_format = "text";  // text or json
  std::string log_file;             // empty: stderr
  std::string process_name;         // empty: the role
  // Prefix store (prefill, colocated); the defaults are kvstore::PrefixStoreOptions'.
  uint64_t kv_device_mib = 1024;
  uint64_t kv_host_mib = 4096;
  std::string kv_host_codec = "lossless";
  std::string kv_disk_path;  // empty: no disk tier
  uint64_t kv_disk_mib = 16384;
  std::string kv_disk_codec = "lossless";
  uint64_t kv_write_queue_mib = 256;
};

// Registers the flags above on `serve`.
void add_serve_ops_flags(CLI::App& serve, ServeOpsFlags& flags);

// The process's logger: named --process-name, or `role` when none is given. kInvalidArgument
// for a bad --log-format; kUnavailable when --log-file cannot be opened for appending.
Result<std::unique_ptr<ops::Logger>> open_serve_logger(const ServeOpsFlags& flags,
                                                       const std::string& role);

// The prefix store's options from the --kv-* flags. kInvalidArgument naming the flag for a
// size of 0 or too large, an unknown codec, a write queue larger than the disk tier, or a
// --kv-disk-path that is not a directory that can be created and written.
Result<kvstore::PrefixStoreOptions> prefix_store_options(const ServeOpsFlags& flags);

}  // namespace dserve::cli
