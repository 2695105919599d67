// `dserve model verify`: checks a checkpoint directory against its checksums.sha256 (written by
// `dserve model init`), and optionally against a pinned SHA-256 of that file, with progress.

#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "model_digests.h"

namespace dserve::cli {

DigestProgress digest_progress_on_stderr() {
  return [](const std::string& file, uint64_t bytes, uint64_t done, uint64_t total) {
    std::fprintf(
        stderr, "dserve: sha256 %s (%.1f MB), %.0f%% of %.1f MB\n", file.c_str(),
        static_cast<double>(bytes) / 1e6,
        total == 0 ? 100.0 : 100.0 * static_cast<double>(done) / static_cast<double>(total),
        static_cast<double>(total) / 1e6);
  };
}

Command add_model_verify_command(CLI::App& model_app) {
  auto dir = std::make_shared<std::string>();
  auto pinned = std::make_shared<std::string>();
  CLI::App* cmd = model_app.add_subcommand(
      "verify", "check a checkpoint's files against its checksums.sha256 (sha256 per file)");
  cmd->add_option("--model", *dir, "checkpoint directory")->required();
  cmd->add_option("--sha256", *pinned,
                  "the SHA-256 checksums.sha256 must have (a cluster manifest's model.sha256)");
  return [dir, pinned] {
    auto verified = verify_model_digests(*dir, *pinned, digest_progress_on_stderr());
    if (!verified.is_ok()) {
      print_error(verified.status().message());
      return verified.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
    }
    std::fprintf(stderr, "dserve: %s\n", verified->c_str());
    return 0;
  };
}

}  // namespace dserve::cli
