// The bundle (`dserve bundle --out FILE.tar.gz`, bundle.h): packs this dserve, the shared
// libraries it loads and their plugins, the tokenizer and the example manifests into one
// relocatable archive with an installer, for machines without the project's Debian packages or a
// network.
//
// Design (README.md "Air-gapped install"; the bundle's own README.md):
// - Which libraries: the dynamic loader's list of what it mapped into this process
//   (dl_iterate_phdr), plus the modules UCX and OpenSSL dlopen from their plugin directories
//   and what those need (`ld.so --list`), minus glibc's own libraries (and GPU driver
//   libraries), which must come from the target. See bundle_contents.h.
// - How they are found: bin/dserve is a shell launcher that prepends the bundle's lib/ to
//   LD_LIBRARY_PATH, sets UCX_MODULE_DIR / OPENSSL_MODULES / OPENSSL_ENGINES to the bundled
//   plugin directories and execs libexec/dserve. Not chosen: running the binary through a
//   bundled ld.so (the loader must match the target's libc, which the bundle does not carry,
//   and /proc/self/exe would name the loader, breaking re-exec of dserve); rewriting RUNPATH
//   (needs an ELF editor, and RUNPATH does not apply to the libraries' own dependencies).
// - Integrity: MANIFEST.sha256 lists every other file (sha256sum format); install.sh checks it
//   before and after copying, and checks the target's glibc against the newest GLIBC_2.x
//   version any bundled file needs.
// - Progress: one line per file on stderr (index, size, running total of bytes), then a
//   summary; --quiet keeps only the summary.

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle_archive.h"
#include "bundle_contents.h"
#include "bundle_texts.h"
#include "dserve/bundle/bundle.h"
#include "dserve/core/sha256.h"

namespace dserve::bundle {
namespace {

namespace fs = std::filesystem;

// One archive member: a file on disk or generated text.
struct Entry {
  std::string dest;
  std::string source;  // empty: `text`, or a link when `link` is set
  std::string text;
  uint32_t mode = 0644;
  uint64_t size = 0;
  std::string link{};  // relative to dest's directory
};

double mib(uint64_t bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

// "dserve-0.1.0" for "/tmp/dserve-0.1.0.tar.gz": the directory the archive unpacks into.
std::string top_dir_for(const std::string& out) {
  std::string name = fs::path(out).filename().string();
  for (const std::string ext : {".tar.gz", ".tgz"}) {
    if (name.size() > ext.size() && name.ends_with(ext)) {
      name.resize(name.size() - ext.size());
      break;
    }
  }
  return name;
}

Status check_file(const std::string& path, const std::string& flag) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    return not_found(flag + ": '" + path + "' is not a readable file");
  }
  return Status::ok();
}

Result<std::vector<Entry>> list_entries(const BundleOptions& o, const BundleLibraries& libs,
                                        const std::string& top) {
  std::vector<Entry> entries;
  entries.push_back({"bin/dserve", "", bundle_launcher(libs), 0755});
  entries.push_back({"install.sh", "", bundle_install_script(libs), 0755});
  entries.push_back({"README.md", "", bundle_readme(libs, top), 0644});
  entries.push_back({libs.executable.dest, libs.executable.source, "", libs.executable.mode});
  for (const BundleFile& f : libs.libraries) {
    entries.push_back({f.dest, f.source, "", f.mode, 0, f.link});
  }

  DSERVE_RETURN_IF_ERROR(check_file(o.tokenizer, "--tokenizer"));
  entries.push_back({"share/dserve/tokenizer.json", o.tokenizer, "", 0644});
  DSERVE_RETURN_IF_ERROR(check_file(o.manifest_doc, "--manifest-doc"));
  entries.push_back({"share/dserve/doc/cluster.md", o.manifest_doc, "", 0644});
  std::error_code ec;
  if (!fs::is_directory(o.examples_dir, ec)) {
    return not_found("--examples: '" + o.examples_dir + "' is not a directory");
  }
  std::vector<fs::path> examples;
  for (const auto& e : fs::directory_iterator(o.examples_dir, ec)) {
    if (e.path().extension() == ".yaml" && fs::is_regular_file(e.path(), ec)) {
      examples.push_back(e.path());
    }
  }
  if (examples.empty()) {
    return not_found("--examples: '" + o.examples_dir + "' has no .yaml manifests");
  }
  std::sort(examples.begin(), examples.end());
  for (const fs::path& p : examples) {
    entries.push_back({"share/dserve/examples/" + p.filename().string(), p.string(), "", 0644});
  }

  for (Entry& e : entries) {
    if (!e.link.empty()) {
      e.size = 0;
    } else if (e.source.empty()) {
      e.size = e.text.size();
    } else {
      e.size = fs::file_size(e.source, ec);
      if (ec) return not_found("cannot read '" + e.source + "': " + ec.message());
    }
  }
  return entries;
}

// A failure once the archive is open is the bundle's, not the options' (exit code 1).
Status write_failure(const Status& s) {
  return s.code() == StatusCode::kInvalidArgument ? internal_error(s.message()) : s;
}

}  // namespace

Status write_bundle(const BundleOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  const std::string top = top_dir_for(o.out);
  if (top.empty() || o.out.ends_with("/")) {
    return invalid_argument("--out must name a file such as dserve-0.1.0.tar.gz, got '" + o.out +
                            "'");
  }
  // Open the output first: an unwritable --out fails before any work.
  auto writer = TarGzWriter::open(o.out, o.compression_level);
  if (!writer.is_ok()) return writer.status();
  auto libs = find_bundle_libraries();
  if (!libs.is_ok()) return internal_error(libs.status().to_string());
  for (const std::string& w : libs->warnings)
    std::fprintf(stderr, "dserve bundle: note: %s\n", w.c_str());
  auto entries = list_entries(o, *libs, top);
  if (!entries.is_ok()) {  // a file or directory the options name is not there
    return entries.status().code() == StatusCode::kInternal
               ? entries.status()
               : invalid_argument(entries.status().message());
  }
  uint64_t total = 0;
  for (const Entry& e : *entries)
    total += e.size;
  std::fprintf(stderr,
               "dserve bundle: %zu files, %.1f MiB (%zu libraries; glibc %s or newer from the "
               "target) -> %s\n",
               entries->size() + 1, mib(total), libs->libraries.size(), libs->min_glibc.c_str(),
               o.out.c_str());

  TarGzWriter& w = **writer;
  Status s = w.add_directory(top);
  for (const std::string d : {"bin", "libexec", "lib", "share", "share/dserve"}) {
    if (s.is_ok()) s = w.add_directory(top + "/" + d);
  }
  for (const PluginDir& d : libs->plugin_dirs) {
    if (s.is_ok()) s = w.add_directory(top + "/" + d.dest_dir);
  }
  for (const std::string d : {"share/dserve/doc", "share/dserve/examples"}) {
    if (s.is_ok()) s = w.add_directory(top + "/" + d);
  }
  std::string manifest;
  std::map<std::string, std::string> digests;  // by dest, for the links
  uint64_t done = 0;
  const size_t n = entries->size() + 1;
  for (size_t i = 0; i < entries->size() && s.is_ok(); ++i) {
    const Entry& e = (*entries)[i];
    std::string digest;
    uint64_t size = e.size;
    if (!e.link.empty()) {
      // Links follow their targets (bundle_contents.cc); sha256sum -c reads through them.
      s = w.add_symlink(top + "/" + e.dest, e.link);
      const fs::path target = fs::path(e.dest).parent_path() / e.link;
      digest = digests[target.lexically_normal().string()];
    } else if (e.source.empty()) {
      s = w.add_bytes(top + "/" + e.dest, e.text, e.mode);
      digest = sha256_hex(e.text);
    } else {
      s = w.add_file(top + "/" + e.dest, e.source, e.mode, &digest, &size);
    }
    if (!s.is_ok()) break;
    done += size;
    digests[e.dest] = digest;
    manifest += digest + "  " + e.dest + "\n";
    if (!o.quiet) {
      std::fprintf(stderr, "dserve bundle: [%3zu/%zu] %8.1f MiB of %.1f  %s (%.1f MiB)\n", i + 1, n,
                   mib(done), mib(total), e.dest.c_str(), mib(size));
    }
  }
  if (s.is_ok()) s = w.add_bytes(top + "/MANIFEST.sha256", manifest, 0644);
  if (s.is_ok()) s = w.finish();
  if (!s.is_ok()) return write_failure(s);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr,
               "dserve bundle: wrote %s: %zu files, %.1f MiB, %.1f MiB compressed, in %.1f s\n"
               "dserve bundle: install with: tar xzf %s && %s/install.sh --prefix DIR\n",
               o.out.c_str(), n, mib(done + manifest.size()), mib(w.compressed_bytes()), secs,
               fs::path(o.out).filename().c_str(), top.c_str());
  return Status::ok();
}

}  // namespace dserve::bundle
