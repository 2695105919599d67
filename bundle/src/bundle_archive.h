#pragma once
// The archive `dserve bundle` writes: a gzip-compressed POSIX ustar file, written to
// "<path>.partial" and renamed to <path> by finish(), so a failed or interrupted run never
// leaves a truncated bundle under the final name. Entries carry uid/gid 0, a fixed mtime and the
// given mode, so two runs over the same files give the same archive bytes.

#include <zlib.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "dserve/core/status.h"

namespace dserve::bundle {

// Owns the open output file; not thread-safe. Destroying an unfinished writer removes the
// partial file.
class TarGzWriter {
 public:
  // Opens "<path>.partial" for writing. Fails with PERMISSION_DENIED / NOT_FOUND (saying which
  // directory) when it cannot be created. `level` is zlib's 1 (fast) .. 9 (small).
  static Result<std::unique_ptr<TarGzWriter>> open(const std::string& path, int level);
  ~TarGzWriter();
  TarGzWriter(const TarGzWriter&) = delete;
  TarGzWriter& operator=(const TarGzWriter&) = delete;

  // `name` is the path inside the archive ('/'-separated, no leading '/', at most 255 bytes).
  Status add_directory(std::string_view name);
  // Streams the regular file at `source` (symbolic links followed) into the archive; on success
  // stores its SHA-256 in `*sha256` and its size in `*size`.
  Status add_file(std::string_view name, const std::string& source, uint32_t mode,
                  std::string* sha256, uint64_t* size);
  Status add_bytes(std::string_view name, std::string_view data, uint32_t mode);
  // A symbolic link `name` -> `target` (at most 100 bytes).
  Status add_symlink(std::string_view name, std::string_view target);
  // Writes the end-of-archive blocks, closes and renames the file to its final path.
  Status finish();
  // Compressed bytes written so far (after finish(): the archive's size).
  uint64_t compressed_bytes() const;

 private:
  TarGzWriter(std::string path, gzFile file) : path_(std::move(path)), file_(file) {}
  Status write_header(std::string_view name, char type, uint64_t size, uint32_t mode,
                      std::string_view link = {});
  Status write(const void* data, size_t n);

  std::string path_;
  gzFile file_ = nullptr;
  bool finished_ = false;
  uint64_t compressed_ = 0;
};

}  // namespace dserve::bundle
