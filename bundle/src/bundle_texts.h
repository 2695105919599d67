#pragma once
// The text files `dserve bundle` writes into the bundle: the launcher (bin/dserve), the
// installer (install.sh) and the bundle's own README.md.

#include <string>

#include "bundle_contents.h"

namespace dserve::bundle {

// bin/dserve: sets the library path and the plugin directories, then runs libexec/dserve.
std::string bundle_launcher(const BundleLibraries& libs);
// install.sh --prefix DIR: checks MANIFEST.sha256 and the target's glibc, copies the bundle to
// DIR/lib/dserve, writes DIR/bin/dserve and runs it once.
std::string bundle_install_script(const BundleLibraries& libs);
// README.md: what is inside, how it runs, how to install it.
std::string bundle_readme(const BundleLibraries& libs, const std::string& top_dir);

}  // namespace dserve::bundle
