// The bundle's launcher, installer and README.

#include "bundle_texts.h"

namespace dserve::bundle {

std::string bundle_launcher(const BundleLibraries& libs) {
  std::string s = R"sh(#!/bin/sh
# dserve launcher (written by `dserve bundle`). The real program is ../libexec/dserve; the
# libraries it needs, except glibc's, are in ../lib. This script puts them first on the
# library search path, points each dlopen'ed plugin directory at the bundled copy, and
# replaces itself with the program, so the process id, signals and exit status are dserve's.
# Processes dserve starts inherit this environment, so they find the same libraries.
root=$(dirname "$(dirname "$(readlink -f "$0")")")
LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
)sh";
  for (const PluginDir& d : libs.plugin_dirs) {
    s += "# " + d.what + " (loaded with dlopen, not found through the library path)\n";
    s += d.env + "=\"$root/" + d.dest_dir + "\"\nexport " + d.env + "\n";
  }
  s += R"sh(# The tokenizer `dserve model init` ships with a new model, unless one is chosen.
DSERVE_TOKENIZER_JSON="${DSERVE_TOKENIZER_JSON:-$root/share/dserve/tokenizer.json}"
export DSERVE_TOKENIZER_JSON
exec "$root/libexec/dserve" "$@"
)sh";
  return s;
}

std::string bundle_install_script(const BundleLibraries& libs) {
  std::string s = R"sh(#!/bin/sh
# Installs this dserve bundle (written by `dserve bundle`):
#   ./install.sh --prefix DIR     (default /opt/dserve)
# 1. checks every file against MANIFEST.sha256 (sha256sum) and that this machine's glibc is
#    new enough; 2. copies the bundle to DIR/lib/dserve (replacing an earlier install);
# 3. writes the launcher DIR/bin/dserve; 4. runs `dserve --version` to show that it starts.
# Needs only a POSIX shell and coreutils. Exit status: 0 installed, 1 failed, 2 bad arguments.
set -eu
MIN_GLIBC=@MIN_GLIBC@
fail() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { echo "usage: install.sh [--prefix DIR]   (default /opt/dserve)"; }

prefix=/opt/dserve
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$prefix" ] || { echo "install.sh: error: --prefix is empty" >&2; exit 2; }
case $prefix in /*) ;; *) prefix="$(pwd)/$prefix" ;; esac
case $prefix in *"'"*) echo "install.sh: error: --prefix must not contain a quote (')" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd -P)

echo "install.sh: checking $(wc -l < "$here/MANIFEST.sha256") files against MANIFEST.sha256"
(cd "$here" && sha256sum --check --strict --quiet MANIFEST.sha256) ||
  fail "the files listed above do not match MANIFEST.sha256: the bundle is damaged or was changed; unpack it again from the original archive"

have=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed 's/^glibc //') || have=""
if [ -n "$have" ] && [ -n "$MIN_GLIBC" ]; then
  lowest=$(printf '%s\n%s\n' "$MIN_GLIBC" "$have" | sort -V | head -n 1)
  [ "$lowest" = "$MIN_GLIBC" ] ||
    fail "this bundle needs glibc $MIN_GLIBC or newer; this machine has glibc $have"
fi

dest="$prefix/lib/dserve"
{ mkdir -p "$prefix/bin" "$prefix/lib" 2>/dev/null && [ -w "$prefix/bin" ] && [ -w "$prefix/lib" ]; } ||
  fail "cannot write to $prefix (bin/ and lib/ must be writable by $(id -un)); choose another --prefix"
rm -rf "$dest.new"
mkdir "$dest.new"
cp -pR "$here/." "$dest.new/"
(cd "$dest.new" && sha256sum --check --strict --quiet MANIFEST.sha256) ||
  fail "the copy in $dest.new does not match MANIFEST.sha256 (disk full?)"
rm -rf "$dest.old"
if [ -e "$dest" ]; then mv "$dest" "$dest.old"; fi
mv "$dest.new" "$dest"
rm -rf "$dest.old"

cat > "$prefix/bin/dserve.new" <<LAUNCHER
#!/bin/sh
# dserve, installed from a bundle by install.sh into $dest
exec '$dest/bin/dserve' "\$@"
LAUNCHER
chmod 755 "$prefix/bin/dserve.new"
mv "$prefix/bin/dserve.new" "$prefix/bin/dserve"

version=$("$prefix/bin/dserve" --version) ||
  fail "the installed $prefix/bin/dserve does not start on this machine (its error is above)"
echo "install.sh: installed $version into $dest; run $prefix/bin/dserve"
)sh";
  const std::string key = "@MIN_GLIBC@";
  s.replace(s.find(key), key.size(), libs.min_glibc);
  return s;
}

std::string bundle_readme(const BundleLibraries& libs, const std::string& top_dir) {
  std::string s = "# dserve bundle\n\n";
  s += "A relocatable copy of the `dserve` command and every shared library it loads except\n"
       "glibc's, for machines without the Debian packages it was built with (and without a\n"
       "network). Written by `dserve bundle`.\n\n";
  s += "## Install\n\n```sh\ntar xzf " + top_dir + ".tar.gz\n" + top_dir +
       "/install.sh --prefix /opt/dserve\n/opt/dserve/bin/dserve --help\n```\n\n";
  s += "`install.sh` checks every file against `MANIFEST.sha256` (`sha256sum -c` format), checks\n"
       "that the machine's glibc is at least " +
       libs.min_glibc +
       ", copies the bundle to `PREFIX/lib/dserve` and writes\n"
       "the launcher `PREFIX/bin/dserve`. The unpacked directory also runs in place: "
       "`bin/dserve`.\n\n";
  s += "## What is inside\n\n"
       "| path | what |\n|---|---|\n"
       "| `bin/dserve` | the launcher: sets the search paths below, then runs the program |\n"
       "| `libexec/dserve` | the program, unchanged |\n"
       "| `lib/` | the shared libraries, each under the name the loader looks for |\n";
  for (const PluginDir& d : libs.plugin_dirs) {
    s += "| `" + d.dest_dir + "/` | " + d.what + " (the launcher sets `" + d.env + "`) |\n";
  }
  s += "| `share/dserve/tokenizer.json` | the tokenizer `dserve model init` puts in new models "
       "(`DSERVE_TOKENIZER_JSON`) |\n"
       "| `share/dserve/examples/` | example cluster manifests; the schema is in "
       "`share/dserve/doc/cluster.md` |\n"
       "| `MANIFEST.sha256` | SHA-256 of every other file |\n\n";
  s += "## How it runs\n\n"
       "Libraries come from glibc on the machine (";
  for (size_t i = 0; i < libs.from_target.size(); ++i) {
    s += (i == 0 ? "" : ", ") + ("`" + libs.from_target[i] + "`");
  }
  s += "; glibc " + libs.min_glibc +
       " or newer), everything else from `lib/`, libstdc++ and libgcc_s included, so an older\n"
       "C++ runtime on the machine does not matter. The launcher prepends `lib/` to\n"
       "`LD_LIBRARY_PATH` and runs `libexec/dserve` with `exec`. The program itself is not\n"
       "modified, and `/proc/self/exe` still names it, so processes dserve starts are dserve\n"
       "again and inherit the same environment.\n\n"
       "RDMA: the bundle carries libibverbs and librdmacm for UCX's InfiniBand modules; the\n"
       "hardware providers that libibverbs loads (`/usr/lib/*/libibverbs/`, "
       "`/etc/libibverbs.d/`)\n"
       "are the machine's own (rdma-core), as they belong to its network cards. Without them\n"
       "UCX uses TCP and shared memory.\n";
  if (!libs.warnings.empty()) {
    s += "\nLeft out when this bundle was made:\n\n";
    for (const std::string& w : libs.warnings)
      s += "- " + w + "\n";
  }
  return s;
}

}  // namespace dserve::bundle
