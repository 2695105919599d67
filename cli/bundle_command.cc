// `dserve bundle --out FILE.tar.gz`: the relocatable bundle for air-gapped machines. The options
// are here; bundle/ (dserve/bundle/bundle.h) makes the archive.

#include <memory>
#include <string>

#include "commands.h"
#include "dserve/bundle/bundle.h"
#include "dserve/tokenizer/tokenizer.h"

namespace dserve::cli {

Command add_bundle_command(CLI::App& app) {
  auto o = std::make_shared<bundle::BundleOptions>();
  o->examples_dir = std::string(DSERVE_SOURCE_DIR) + "/cluster/examples";
  o->manifest_doc = std::string(DSERVE_SOURCE_DIR) + "/cluster/README.md";
  CLI::App* cmd = app.add_subcommand(
      "bundle",
      "pack dserve, every non-glibc shared library it loads and an installer into one archive "
      "for machines without its packages");
  cmd->add_option("--out", o->out, "the archive to write (FILE.tar.gz; unpacks into FILE/)")
      ->required();
  cmd->add_option("--compression-level", o->compression_level, "gzip level, 1 (fast) .. 9 (small)")
      ->capture_default_str();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.json to ship for `dserve model init` (default: $DSERVE_TOKENIZER_JSON "
                  "or the one scripts/install-deps.sh fetched)");
  cmd->add_option("--examples", o->examples_dir, "directory of example cluster manifests (*.yaml)")
      ->capture_default_str();
  cmd->add_option("--manifest-doc", o->manifest_doc, "the manifest schema document to ship")
      ->capture_default_str();
  cmd->add_flag("--quiet", o->quiet, "print only the summary, not a line per file");
  return [o] {
    if (o->tokenizer.empty())
      o->tokenizer = tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
    const Status written = bundle::write_bundle(*o);
    if (written.is_ok()) return 0;
    print_error(written.message());
    return written.code() == StatusCode::kInvalidArgument ? 2 : 1;
  };
}

}  // namespace dserve::cli
