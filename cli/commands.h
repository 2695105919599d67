#pragma once
// Subcommands of the `dserve` command line. Each registers its options on the CLI11 app and
// returns the process exit code when run: 0 on success, 1 on a runtime failure, 2 on bad input.

#include <CLI/CLI.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "dserve/model/model.h"

namespace dserve::cli {

using Command = std::function<int()>;

// `dserve model init ...`
Command add_model_init_command(CLI::App& model_app);
// `dserve model verify ...` (a checkpoint against its checksums.sha256)
Command add_model_verify_command(CLI::App& model_app);
// `dserve model trace ...` (developer tool: every forward stage as .npy)
Command add_model_trace_command(CLI::App& model_app);
// `dserve generate ...`
Command add_generate_command(CLI::App& app);
// `dserve serve --role gateway|prefill|decode ...`
Command add_serve_command(CLI::App& app);
// `dserve submit ...`
Command add_submit_command(CLI::App& app);
// `dserve bundle --out FILE.tar.gz`: the relocatable bundle for air-gapped machines.
Command add_bundle_command(CLI::App& app);

// `dserve up`, `status`, `scale`, `down`: a cluster's life from its manifest.
struct ClusterCommands {
  Command up, status, scale, down, agent;
};
ClusterCommands add_cluster_commands(CLI::App& app);

// Prints "dserve: error: <message>" to stderr.
void print_error(const std::string& message);

// The model at `dir` (config.json, then the checkpoint), or nullopt after print_error; then
// `exit_code` is 2 for a bad config and 1 for weights that cannot be loaded.
// Loads the model at `dir` with its KV kept as `kv_dtype` ("fp32" or "fp8"; what --kv-dtype
// says). On failure prints why and sets exit_code (2: bad input, 1: unreadable weights).
std::shared_ptr<const model::Model> load_model_or_print(const std::string& dir,
                                                        const std::string& kv_dtype,
                                                        int& exit_code);
// The `--kv-dtype` option of a command that computes.
void add_kv_dtype_option(CLI::App& cmd, std::string& kv_dtype);

}  // namespace dserve::cli
