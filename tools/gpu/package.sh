#!/usr/bin/env bash
# Packs binaries of a CUDA build, with the shared libraries they need beyond the base system,
# into .device/ (git-ignored) so that they run on a lent GPU machine:
#
#   tools/gpu/package.sh build-cuda/tests/kernels/backend_parity_test ...
#   # then, on the device machine (carry .device):  .device/run.sh backend_parity_test
#
# .device/bin holds the binaries (debug info stripped), .device/lib the libraries, and
# .device/run.sh runs one of them with LD_LIBRARY_PATH pointing there. The C/C++ runtime
# (libc, libm, libstdc++, libgcc_s, the loader, ...) is left to the target, which has newer
# ones. So are the CUDA toolkit's own libraries (cudart, cublas, cublasLt): the device image
# has the same CUDA 13 toolkit, and libcublasLt alone (~540 MB) is far over what a run may
# carry (64 MiB); run.sh adds the toolkit's lib64 to the path instead. --with-cuda-libs
# copies them anyway (for machines without a toolkit). A library ldd cannot find is an error.
set -euo pipefail

usage() {
  echo "usage: $0 [--with-cuda-libs] [--out DIR] BINARY..." >&2
  exit 2
}

root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.device"
with_cuda=0
binaries=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with-cuda-libs) with_cuda=1 ;;
    --out) shift; [ $# -gt 0 ] || usage; out=$1 ;;
    -h|--help) usage ;;
    *) binaries+=("$1") ;;
  esac
  shift
done
[ ${#binaries[@]} -gt 0 ] || usage

# Libraries every Linux target provides (and that must match its own loader).
system_lib='^(linux-vdso|linux-gate|ld-linux[^ ]*|libc|libm|libdl|libpthread|librt|libutil|libresolv|libstdc\+\+|libgcc_s|libatomic)\.so'
cuda_dir=$(readlink -f "${CUDA_HOME:-/usr/local/cuda}")

mkdir -p "$out/bin" "$out/lib"
for bin in "${binaries[@]}"; do
  [ -x "$bin" ] || { echo "package.sh: $bin is not an executable file" >&2; exit 1; }
  if ldd "$bin" | grep -q 'not found'; then
    echo "package.sh: $bin needs libraries ldd cannot find:" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 1
  fi
  dest="$out/bin/$(basename "$bin")"
  cp -f "$bin" "$dest"
  chmod u+w "$dest"
  strip --strip-debug "$dest" 2>/dev/null || true
  # Lines of the form "libname.so.N => /path/libname.so.N (0x...)".
  while read -r name path; do
    [[ "$name" =~ $system_lib ]] && continue
    real=$(readlink -f "$path")
    if [ $with_cuda -eq 0 ] && [[ "$real" == "$cuda_dir"/* ]]; then
      continue
    fi
    if [ ! -e "$out/lib/$name" ]; then
      cp -fL "$path" "$out/lib/$name"
      chmod u+w "$out/lib/$name"
      strip --strip-debug "$out/lib/$name" 2>/dev/null || true
    fi
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')
done

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs a packed binary with the packed libraries first, then the CUDA toolkit's:
#   .device/run.sh BINARY [ARGS...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -eq 0 ]; then
  echo "usage: $0 BINARY [ARGS...]; packed: $(ls "$here/bin" | tr '\n' ' ')" >&2
  exit 2
fi
cuda_lib=${CUDA_HOME:-/usr/local/cuda}/lib64
export LD_LIBRARY_PATH="$here/lib:$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=$1
shift
exec "$here/bin/$bin" "$@"
RUN
chmod +x "$out/run.sh"

size_kib=$(du -sk "$out" | cut -f1)
echo "package.sh: $out holds $(ls "$out/bin" | wc -l) binaries and $(ls "$out/lib" | wc -l) libraries, $((size_kib / 1024)) MiB"
ls "$out/lib"
if [ "$size_kib" -gt $((64 * 1024)) ]; then
  echo "package.sh: warning: over the 64 MiB a device run may carry" >&2
fi
