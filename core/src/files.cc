#include "dserve/core/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

namespace dserve {
namespace {

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// Closes the descriptor on every path out.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

Result<std::string> read_bounded_file(const std::string& path, std::string_view what,
                                      size_t max_bytes) {
  const std::string name = std::string(what) + " '" + path + "'";
  // O_NONBLOCK: opening a FIFO with no writer must not wait; its type is refused right after.
  const Fd file{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (file.fd < 0) return not_found("cannot read " + name + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) {
    return data_loss("cannot stat " + name + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return invalid_argument(name + " is " + file_kind(st.st_mode) + "; expected a regular file");
  }
  const Status too_large =
      invalid_argument(name + " is larger than " + std::to_string(max_bytes) + " bytes, the limit");
  if (static_cast<uint64_t>(st.st_size) > max_bytes) return too_large;
  std::string text;
  text.reserve(static_cast<size_t>(st.st_size));
  std::array<char, 65536> buf;
  for (;;) {
    const ssize_t got = ::read(file.fd, buf.data(), buf.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return data_loss("cannot read " + name + ": " + std::strerror(errno));
    if (got == 0) return text;
    // The file may have grown since fstat: the bound holds for what is read, not what was said.
    if (text.size() + static_cast<size_t>(got) > max_bytes) return too_large;
    text.append(buf.data(), static_cast<size_t>(got));
  }
}

}  // namespace dserve
