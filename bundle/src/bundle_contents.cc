// Finding the executable's libraries with the dynamic loader's own view of this process.
//
// The loaded-object list (dl_iterate_phdr) is exact: it is what ld.so resolved for this very
// binary, with this machine's search path, so no second resolver can disagree with it. Each
// object's path is the directory the loader searched joined with the name a DT_NEEDED entry
// asked for, so its file name is the name to give the bundled copy. Plugins are not loaded
// yet when `dserve bundle` runs; for each, `ld.so --list` (the loader this process runs under)
// names the libraries it would pull in.

#include "bundle_contents.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace dserve::bundle {
namespace {

namespace fs = std::filesystem;

struct Loaded {
  std::string name;  // file name the loader looked for
  std::string path;  // where it found it
};

int collect_loaded(struct dl_phdr_info* info, size_t /*size*/, void* data) {
  auto* out = static_cast<std::vector<Loaded>*>(data);
  // The executable itself has an empty name; the vDSO has no file.
  if (info->dlpi_name == nullptr || info->dlpi_name[0] != '/') return 0;
  const std::string path = info->dlpi_name;
  out->push_back({fs::path(path).filename().string(), path});
  return 0;
}

bool starts_with(std::string_view s, std::string_view p) {
  return s.substr(0, p.size()) == p;
}

uint32_t file_mode(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0644;
  return (st.st_mode & 0111) != 0 ? 0755 : 0644;
}

// The plugin directories OpenSSL's libcrypto was built to load from, as it reports them
// ("MODULESDIR: \"/usr/lib/...\""); empty when libcrypto is not loaded.
std::string openssl_dir(int which, const char* env) {
  if (const char* e = std::getenv(env); e != nullptr && e[0] != '\0') return e;
  using VersionFn = const char* (*)(int);
  auto fn = reinterpret_cast<VersionFn>(dlsym(RTLD_DEFAULT, "OpenSSL_version"));
  if (fn == nullptr) return {};
  const std::string s = fn(which);
  const size_t a = s.find('"');
  const size_t b = s.rfind('"');
  if (a == std::string::npos || b <= a) return {};
  return s.substr(a + 1, b - a - 1);
}

// Runs `loader --list file` and returns name -> path for every library it resolves; names it
// cannot resolve map to "".
Result<std::map<std::string, std::string>> loader_list(const std::string& loader,
                                                       const std::string& file) {
  for (const std::string& s : {loader, file}) {
    if (s.find('\'') != std::string::npos) {
      return invalid_argument("path with a quote cannot be listed: " + s);
    }
  }
  const std::string cmd = "'" + loader + "' --list '" + file + "' 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return internal_error("cannot run " + cmd);
  std::string text;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0)
    text.append(buf.data(), n);
  const int rc = ::pclose(p);
  std::map<std::string, std::string> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    // "\tlibfoo.so.1 => /usr/lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" or "... => not found"
    const size_t arrow = line.find(" => ");
    if (arrow == std::string::npos) continue;
    std::string name = line.substr(0, arrow);
    name.erase(0, name.find_first_not_of(" \t"));
    std::string rest = line.substr(arrow + 4);
    if (starts_with(rest, "not found")) {
      out[name] = "";
    } else {
      out[name] = rest.substr(0, rest.find(" ("));
    }
  }
  if (rc != 0 && out.empty()) {
    return internal_error(cmd + " failed: " + text);
  }
  return out;
}

// The highest "GLIBC_2.N[.M]" version name in a file: the oldest glibc it can run on. The
// names sit in the dynamic string table, which the scan reads as plain bytes.
std::string max_glibc_in(const std::string& path, std::string current) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  std::string bytes(static_cast<size_t>(std::max<std::streamoff>(in.tellg(), 0)), '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const std::string key = "GLIBC_2.";
  auto parse = [](const std::string& v) {
    std::vector<int> parts;
    std::istringstream s(v);
    std::string part;
    while (std::getline(s, part, '.'))
      parts.push_back(std::atoi(part.c_str()));
    return parts;
  };
  for (size_t at = bytes.find(key); at != std::string::npos; at = bytes.find(key, at + 1)) {
    size_t end = at + key.size();
    while (end < bytes.size() &&
           (std::isdigit(static_cast<unsigned char>(bytes[end])) != 0 || bytes[end] == '.')) {
      ++end;
    }
    if (end < bytes.size() && bytes[end] != '\0') continue;
    std::string v = bytes.substr(at + 6, end - at - 6);
    while (!v.empty() && v.back() == '.')
      v.pop_back();
    if (v.size() <= 2) continue;
    if (current.empty() || parse(v) > parse(current)) current = v;
  }
  return current;
}

}  // namespace

bool is_target_library(std::string_view name) {
  static constexpr std::array<std::string_view, 18> kGlibc = {
      "ld-linux",        "libc.so",
      "libm.so",         "libmvec.so",
      "libpthread.so",   "libdl.so",
      "librt.so",        "libresolv.so",
      "libutil.so",      "libanl.so",
      "libnss_",         "libBrokenLocale.so",
      "libthread_db.so", "libc_malloc_debug.so",
      "libmemusage.so",  "libpcprofile.so",
      "libcuda.so",      "libnvidia-"};
  return std::any_of(kGlibc.begin(), kGlibc.end(),
                     [&](std::string_view p) { return starts_with(name, p); });
}

Result<BundleLibraries> find_bundle_libraries() {
  BundleLibraries out;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return internal_error("cannot resolve /proc/self/exe: " + ec.message());
  out.executable = {exe.string(), "libexec/dserve", 0755, ""};

  std::vector<Loaded> loaded;
  dl_iterate_phdr(collect_loaded, &loaded);
  std::string loader;
  std::string libucs;
  std::set<std::string> packed;
  std::set<std::string> left;
  for (const Loaded& l : loaded) {
    if (starts_with(l.name, "ld-linux")) loader = l.path;
    if (starts_with(l.name, "libucs.so")) libucs = l.path;
    if (is_target_library(l.name)) {
      left.insert(l.name);
      continue;
    }
    if (packed.insert(l.name).second) {
      out.libraries.push_back({l.path, "lib/" + l.name, 0644, ""});
    }
  }
  if (loader.empty()) return internal_error("the dynamic loader is not among the loaded objects");

  // UCX loads lib<framework>_<module>.so.<N> from UCX_MODULE_DIR, by default the "ucx"
  // directory beside libucs; N is libucs's own version suffix.
  std::vector<std::pair<PluginDir, std::string>> dirs;  // with the file suffix to take
  if (!libucs.empty()) {
    const char* env = std::getenv("UCX_MODULE_DIR");
    const std::string dir = env != nullptr && env[0] != '\0'
                                ? std::string(env)
                                : (fs::path(libucs).parent_path() / "ucx").string();
    const std::string name = fs::path(libucs).filename().string();
    dirs.push_back({{"UCX transport modules", dir, "lib/ucx", "UCX_MODULE_DIR"},
                    name.substr(name.find(".so"))});
  }
  // OpenSSL 3 loads providers (OPENSSL_MODULES) and engines (OPENSSL_ENGINES) when its
  // configuration asks for them; 8 and 5 are OPENSSL_MODULES_DIR and OPENSSL_ENGINES_DIR.
  if (const std::string d = openssl_dir(8, "OPENSSL_MODULES"); !d.empty()) {
    dirs.push_back({{"OpenSSL providers", d, "lib/ossl-modules", "OPENSSL_MODULES"}, ".so"});
  }
  if (const std::string d = openssl_dir(5, "OPENSSL_ENGINES"); !d.empty()) {
    dirs.push_back({{"OpenSSL engines", d, "lib/engines-3", "OPENSSL_ENGINES"}, ".so"});
  }

  std::vector<BundleFile> links;
  for (auto& [dir, suffix] : dirs) {
    if (!fs::is_directory(dir.source_dir, ec)) {
      out.warnings.push_back(dir.what + ": " + dir.source_dir +
                             " does not exist; the bundle has none");
      out.plugin_dirs.push_back(dir);
      continue;
    }
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir.source_dir, ec)) {
      const std::string n = e.path().filename().string();
      if (n.size() > suffix.size() &&
          n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0 &&
          fs::is_regular_file(e.path(), ec)) {
        files.push_back(e.path());
      }
    }
    std::sort(files.begin(), files.end());
    for (const fs::path& f : files) {
      DSERVE_ASSIGN_OR_RETURN(auto deps, loader_list(loader, f.string()));
      std::vector<std::string> missing;
      for (const auto& [name, path] : deps) {
        if (path.empty()) missing.push_back(name);
      }
      if (!missing.empty()) {
        std::string m;
        for (const std::string& x : missing)
          m += (m.empty() ? "" : ", ") + x;
        out.warnings.push_back(dir.what + ": left out " + f.filename().string() + ", which needs " +
                               m + " (not on this machine, so it cannot load here either)");
        continue;
      }
      for (const auto& [name, path] : deps) {
        if (is_target_library(name)) {
          left.insert(name);
        } else if (fs::equivalent(fs::path(path).parent_path(), dir.source_dir, ec)) {
          // A module that needs another module of its directory (UCX's rdmacm needs ib)
          // finds it through a RUNPATH naming this machine's directory, which the target may
          // lack or hold another UCX in. A link from lib/ to the bundled module lets the
          // library path find it, and keeps both names one file, which the loader maps once.
          if (packed.insert(name).second) {
            links.push_back({"", "lib/" + name, 0777, dir.dest_dir.substr(4) + "/" + name});
          }
        } else if (packed.insert(name).second) {
          out.libraries.push_back({path, "lib/" + name, 0644, ""});
        }
      }
      out.libraries.push_back(
          {f.string(), dir.dest_dir + "/" + f.filename().string(), file_mode(f.string()), ""});
    }
    out.plugin_dirs.push_back(dir);
  }
  for (const BundleFile& l : links) {
    const std::string target = "lib/" + l.link;
    if (std::any_of(out.libraries.begin(), out.libraries.end(),
                    [&](const BundleFile& f) { return f.dest == target; })) {
      out.libraries.push_back(l);
    }
  }
  out.from_target.assign(left.begin(), left.end());

  out.min_glibc = max_glibc_in(out.executable.source, "");
  for (const BundleFile& f : out.libraries) {
    if (f.link.empty()) out.min_glibc = max_glibc_in(f.source, out.min_glibc);
  }
  return out;
}

}  // namespace dserve::bundle
