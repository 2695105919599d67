#pragma once
// A checkpoint's digest manifest: `checksums.sha256` in the model directory, one line per file
// in sha256sum's format ("<64 hex>  <name>"), so `sha256sum -c checksums.sha256` checks it too.
// `dserve model init` writes it; `dserve model verify` and `serve --model-sha256` check it. The
// SHA-256 of the manifest file itself is the one value that pins a whole checkpoint (a cluster
// manifest's `model.sha256`).

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "dserve/core/status.h"

namespace dserve::cli {

inline constexpr std::string_view kModelDigestsFile = "checksums.sha256";

// Called after each file is hashed: its name, its bytes, and the bytes done of the total.
using DigestProgress =
    std::function<void(const std::string& file, uint64_t bytes, uint64_t done, uint64_t total)>;

// Progress as lines on stderr ("dserve: sha256 FILE (MB), P% of MB").
DigestProgress digest_progress_on_stderr();

// Hashes every regular file of `dir` (not the digest file itself; not sub-directories) and writes
// `dir`/checksums.sha256 (through a temporary file and a rename). Returns the file's SHA-256.
Result<std::string> write_model_digests(const std::string& dir,
                                        const DigestProgress& progress = {});

// Checks `dir` against its checksums.sha256: when `pinned` is not empty the digest file's own
// SHA-256 must equal it; every file it lists must exist with that digest, and every
// checkpoint file of the directory (*.safetensors, *.json) must be listed. DataLoss naming the
// first file that differs (and how many do); NotFound without a digest file; InvalidArgument
// for a malformed line (with its number). Returns a one-line summary.
Result<std::string> verify_model_digests(const std::string& dir, std::string_view pinned,
                                         const DigestProgress& progress = {});

}  // namespace dserve::cli
