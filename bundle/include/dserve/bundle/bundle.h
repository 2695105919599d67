#pragma once
// The relocatable bundle for air-gapped machines (`dserve bundle`): the running dserve, every
// shared library it loads that is not glibc's, the plugin directories those libraries dlopen
// (UCX transport modules, OpenSSL providers and engines), the tokenizer and the example
// manifests, with a launcher and an installer, in one .tar.gz. README.md ("Air-gapped install")
// says how it is used; src/bundle.cc how it is made.

#include <string>

#include "dserve/core/status.h"

namespace dserve::bundle {

struct BundleOptions {
  std::string out;            // the archive to write: FILE.tar.gz, which unpacks into FILE/
  int compression_level = 6;  // gzip's 1 (fast) .. 9 (small)
  std::string tokenizer;      // the tokenizer.json to ship (for `dserve model init`)
  std::string examples_dir;   // a directory of example cluster manifests (*.yaml)
  std::string manifest_doc;   // the manifest schema document to ship
  bool quiet = false;         // stderr gets only the summary, not a line per file
};

// Writes the bundle of the running executable to `options.out` (through "<out>.partial" and a
// rename: a failed run leaves no archive under that name), with progress on stderr.
// InvalidArgument when the options are unusable (a bad --out name or compression level, a
// missing tokenizer, manifest document or examples): the command line's exit code 2. Any other
// code when the bundle cannot be made or written (exit code 1); the message says what failed.
Status write_bundle(const BundleOptions& options);

}  // namespace dserve::bundle
