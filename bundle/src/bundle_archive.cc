// The bundle's tar.gz writer.

#include "bundle_archive.h"

#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "dserve/core/sha256.h"

namespace dserve::bundle {
namespace {

constexpr size_t kBlock = 512;
// Entries are dated 2020-01-01 UTC: a fixed date keeps the archive reproducible.
constexpr uint64_t kMtime = 1577836800;

// Writes `value` as `width - 1` octal digits and a NUL, as ustar numeric fields are.
void put_octal(char* field, size_t width, uint64_t value) {
  field[width - 1] = '\0';
  for (size_t i = width - 1; i-- > 0;) {
    field[i] = static_cast<char>('0' + (value & 7));
    value >>= 3;
  }
}

}  // namespace

Result<std::unique_ptr<TarGzWriter>> TarGzWriter::open(const std::string& path, int level) {
  if (level < 1 || level > 9) {
    return invalid_argument("compression level must be 1..9, got " + std::to_string(level));
  }
  const std::string partial = path + ".partial";
  const std::string mode = "wb" + std::to_string(level);
  gzFile f = gzopen(partial.c_str(), mode.c_str());
  if (f == nullptr) {
    const int err = errno;
    std::filesystem::path dir = std::filesystem::path(path).parent_path();
    if (dir.empty()) dir = ".";
    std::string msg = "cannot write the bundle to '" + path + "': " + std::strerror(err);
    if (err == EACCES || err == EROFS || err == EPERM) {
      msg += " (the directory '" + dir.string() +
             "' is not writable by this user; choose another --out)";
      return permission_denied(msg);
    }
    if (err == ENOENT || err == ENOTDIR) {
      msg += " (the directory '" + dir.string() + "' does not exist; create it first)";
      return not_found(msg);
    }
    return internal_error(msg);
  }
  return std::unique_ptr<TarGzWriter>(new TarGzWriter(path, f));
}

TarGzWriter::~TarGzWriter() {
  if (finished_) return;
  if (file_ != nullptr) gzclose(file_);
  std::error_code ec;
  std::filesystem::remove(path_ + ".partial", ec);
}

Status TarGzWriter::write(const void* data, size_t n) {
  if (n == 0) return Status::ok();
  if (gzwrite(file_, data, static_cast<unsigned>(n)) != static_cast<int>(n)) {
    int zerr = 0;
    const char* what = gzerror(file_, &zerr);
    return internal_error("writing '" + path_ +
                          ".partial' failed: " + (zerr == Z_ERRNO ? std::strerror(errno) : what));
  }
  return Status::ok();
}

Status TarGzWriter::write_header(std::string_view name, char type, uint64_t size, uint32_t mode,
                                 std::string_view link) {
  if (link.size() > 100) {
    return invalid_argument("the link target '" + std::string(link) + "' is over 100 bytes");
  }
  std::array<char, kBlock> h{};
  // Names longer than 100 bytes are split at a '/' into the 155-byte prefix and the name.
  std::string_view prefix;
  std::string_view base = name;
  if (name.size() > 100) {
    const size_t cut = name.rfind('/', 155);
    if (cut == std::string_view::npos || name.size() - cut - 1 > 100) {
      return invalid_argument("the archive path '" + std::string(name) +
                              "' is too long for a tar header (255 bytes, 100 after a '/')");
    }
    prefix = name.substr(0, cut);
    base = name.substr(cut + 1);
  }
  std::memcpy(h.data(), base.data(), base.size());
  put_octal(h.data() + 100, 8, mode);
  put_octal(h.data() + 108, 8, 0);
  put_octal(h.data() + 116, 8, 0);
  put_octal(h.data() + 124, 12, size);
  put_octal(h.data() + 136, 12, kMtime);
  h[156] = type;
  std::memcpy(h.data() + 157, link.data(), link.size());
  std::memcpy(h.data() + 257, "ustar", 6);
  std::memcpy(h.data() + 263, "00", 2);
  std::memcpy(h.data() + 265, "root", 4);
  std::memcpy(h.data() + 297, "root", 4);
  std::memcpy(h.data() + 345, prefix.data(), prefix.size());
  // The checksum is computed with its own field as eight spaces.
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (char c : h)
    sum += static_cast<unsigned char>(c);
  put_octal(h.data() + 148, 7, sum);
  return write(h.data(), h.size());
}

Status TarGzWriter::add_directory(std::string_view name) {
  std::string dir(name);
  if (dir.empty() || dir.back() != '/') dir += '/';
  return write_header(dir, '5', 0, 0755);
}

Status TarGzWriter::add_bytes(std::string_view name, std::string_view data, uint32_t mode) {
  DSERVE_RETURN_IF_ERROR(write_header(name, '0', data.size(), mode));
  DSERVE_RETURN_IF_ERROR(write(data.data(), data.size()));
  const size_t pad = (kBlock - data.size() % kBlock) % kBlock;
  static const std::array<char, kBlock> kZeros{};
  return write(kZeros.data(), pad);
}

Status TarGzWriter::add_symlink(std::string_view name, std::string_view target) {
  return write_header(name, '2', 0, 0777, target);
}

Status TarGzWriter::add_file(std::string_view name, const std::string& source, uint32_t mode,
                             std::string* sha256, uint64_t* size) {
  std::ifstream in(source, std::ios::binary);
  struct stat st {};
  if (!in || ::stat(source.c_str(), &st) != 0) {
    return not_found("cannot read '" + source + "' for the bundle: " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return invalid_argument("'" + source + "' is not a regular file");
  }
  const uint64_t expected = static_cast<uint64_t>(st.st_size);
  DSERVE_RETURN_IF_ERROR(write_header(name, '0', expected, mode));
  Sha256 digest;
  std::vector<char> buf(1 << 20);
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    if (n == 0) break;
    total += n;
    if (total > expected) break;
    digest.update(buf.data(), n);
    DSERVE_RETURN_IF_ERROR(write(buf.data(), n));
  }
  if (total != expected) {
    return data_loss("'" + source + "' changed size while it was bundled (" +
                     std::to_string(expected) + " bytes when listed, " + std::to_string(total) +
                     " read)");
  }
  const size_t pad = (kBlock - expected % kBlock) % kBlock;
  static const std::array<char, kBlock> kZeros{};
  DSERVE_RETURN_IF_ERROR(write(kZeros.data(), pad));
  *sha256 = digest.hex();
  *size = expected;
  return Status::ok();
}

Status TarGzWriter::finish() {
  static const std::array<char, 2 * kBlock> kEnd{};
  DSERVE_RETURN_IF_ERROR(write(kEnd.data(), kEnd.size()));
  const int rc = gzclose(file_);
  file_ = nullptr;
  const std::string partial = path_ + ".partial";
  if (rc != Z_OK) {
    return internal_error("closing '" + partial + "' failed (zlib error " + std::to_string(rc) +
                          ")");
  }
  std::error_code ec;
  std::filesystem::rename(partial, path_, ec);
  if (ec) {
    return internal_error("renaming '" + partial + "' to '" + path_ + "' failed: " + ec.message());
  }
  compressed_ = std::filesystem::file_size(path_, ec);
  finished_ = true;
  return Status::ok();
}

uint64_t TarGzWriter::compressed_bytes() const {
  return compressed_;
}

}  // namespace dserve::bundle
