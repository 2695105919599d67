#pragma once
// What `dserve bundle` packs besides its own text files: the running executable, every shared
// library the dynamic loader mapped for it, the plugin directories those libraries dlopen from
// (UCX transport modules, OpenSSL providers and engines) and the libraries the plugins need.
//
// "System" libraries, left to the target machine, are glibc's own (libc, libm, libmvec,
// libpthread, libdl, librt, libresolv, libutil, libanl, libnss_*, ld-linux, ...): they must
// match the target's kernel interface and each other, and every Linux machine has them. GPU
// driver libraries (libcuda, libnvidia-*) are also the target's: they must match its kernel
// driver. Everything else, libstdc++ and libgcc_s included, is bundled.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::bundle {

// One file to pack: `source` on this machine goes to `dest` (relative) inside the bundle; or,
// when `link` is set, a symbolic link at `dest` to `link` (relative to dest's directory).
struct BundleFile {
  std::string source;
  std::string dest;
  uint32_t mode = 0644;
  std::string link{};
};

// A directory of dlopen'ed modules and the environment variable that points its library at
// the bundled copy.
struct PluginDir {
  std::string what;        // "UCX transport modules"
  std::string source_dir;  // where this machine's library loads them from
  std::string dest_dir;    // "lib/ucx"
  std::string env;         // "UCX_MODULE_DIR"
};

struct BundleLibraries {
  BundleFile executable;                 // libexec/dserve
  std::vector<BundleFile> libraries;     // lib/<name the loader looks for>, then plugins
  std::vector<PluginDir> plugin_dirs;    // those found on this machine
  std::vector<std::string> from_target;  // system libraries left to the target, by name
  std::vector<std::string> warnings;     // plugins left out, and why
  std::string min_glibc;                 // highest GLIBC_2.x any packed file needs
};

// True for the libraries the bundle takes from the target (see above), by file name.
bool is_target_library(std::string_view name);

// Looks at the running process (/proc/self/exe and the loader's list of mapped objects).
Result<BundleLibraries> find_bundle_libraries();

}  // namespace dserve::bundle
