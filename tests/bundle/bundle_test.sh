#!/usr/bin/env bash
# The air-gapped install, end to end (tests/bundle/CMakeLists.txt registers it):
#   1. `dserve bundle` from the build tree;
#   2. a clean root made of this machine's own files of the Debian packages debootstrap's
#      minbase installs (Priority: required, plus what they depend on), checked to hold no
#      library of the project's packages;
#   3. in a network namespace with only loopback, chrooted into that root: unpack the bundle,
#      run install.sh, make a tiny model with the bundle's `dserve model init`, `dserve generate`
#      (compared with the build tree's output), then a prefill, a decode and a gateway process
#      on loopback and `dserve submit`, then the same cluster from a manifest with `dserve up`
#      (both answers compared too), stopped with `dserve down`.
# Usage: bundle_test.sh BUILD/dserve. Needs root, chroot, unshare and iproute2's `ip`; without
# them it prints "skipped: <why>" and exits 77 (ctest's SKIP_RETURN_CODE).
# Ports: DSERVE_BUNDLE_TEST_PORT (default 17640) and the next three, and 10 to 13 above it, all in
# the test's own network namespace (unshare --net: only its loopback, where nothing else listens),
# so fixed ports cannot collide with another test. DSERVE_BUNDLE_TEST_KEEP=1 keeps the work
# directory.
set -euo pipefail

DSERVE=$(readlink -f "${1:?usage: bundle_test.sh BUILD/dserve}")
BASE=${DSERVE_BUNDLE_TEST_PORT:-17640}
PROMPT="The capital of France is"
MAX_TOKENS=16
T0=$(date +%s.%N)

skip() { echo "skipped: $*"; exit 77; }
fail() { echo "bundle_test: FAILED: $*" >&2; exit 1; }
step() { awk -v now="$(date +%s.%N)" -v t0="$T0" -v what="$*" 'BEGIN { printf "bundle_test: [%5.1f s] %s\n", now - t0, what }'; }

[ "$(id -u)" = 0 ] || skip "needs root (chroot, mknod and a network namespace)"
for tool in chroot unshare ip dpkg-query tar; do
  command -v "$tool" >/dev/null || skip "needs '$tool' on this machine"
done
unshare --net true 2>/dev/null || skip "this machine does not allow new network namespaces"

WORK=$(mktemp -d /tmp/dserve-bundle-test.XXXXXX)
ROOT="$WORK/root"
cleanup() {
  if [ "${DSERVE_BUNDLE_TEST_KEEP:-0}" = 1 ]; then echo "bundle_test: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# 1. The bundle.
step "dserve bundle"
"$DSERVE" bundle --out "$WORK/dserve-test.tar.gz" --quiet
# An output path that cannot be written fails with a message that says so, before any work:
# a read-only file system (root may write anywhere else) and a directory that does not exist.
mkdir "$WORK/ro"
if unshare --mount --propagation private sh -c \
    'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" bundle --out "$1/b.tar.gz"' \
    ro "$WORK/ro" "$DSERVE" 2>"$WORK/unwritable.err"; then
  fail "dserve bundle --out on a read-only file system succeeded"
fi
grep -q "cannot write the bundle to '$WORK/ro/b.tar.gz': Read-only file system (the directory '$WORK/ro' is not writable" \
  "$WORK/unwritable.err" || fail "unexpected error for a read-only --out: $(cat "$WORK/unwritable.err")"
if "$DSERVE" bundle --out "$WORK/missing/b.tar.gz" 2>"$WORK/missing.err"; then
  fail "dserve bundle --out into a missing directory succeeded"
fi
grep -q "the directory '$WORK/missing' does not exist" "$WORK/missing.err" ||
  fail "unexpected error for a missing --out directory: $(cat "$WORK/missing.err")"

# 2. The clean root: the required packages and their dependencies (what minbase installs),
#    from this machine's dpkg database, following Depends and Pre-Depends (first installed
#    alternative, or an installed provider of a virtual package).
step "clean root"
dpkg-query -W -f='${binary:Package}\t${Package}\t${Priority}\t${db:Status-Abbrev}\t${Provides}\t${Pre-Depends}, ${Depends}\n' |
  awk -F '\t' '
    $4 ~ /^ii/ {
      inst[$2] = $1; deps[$1] = $6
      if ($3 == "required") queue[++qn] = $1
      np = split($5, pv, ",")
      for (i = 1; i <= np; i++) { v = pv[i]; sub(/\(.*\)/, "", v); gsub(/ /, "", v); if (v != "" && !(v in prov)) prov[v] = $1 }
    }
    END {
      for (qi = 1; qi <= qn; qi++) {
        p = queue[qi]
        if (p in seen) continue
        seen[p] = 1
        na = split(deps[p], alts, ",")
        for (i = 1; i <= na; i++) {
          no = split(alts[i], opts, "|")
          for (j = 1; j <= no; j++) {
            o = opts[j]; sub(/\(.*\)/, "", o); sub(/\[.*\]/, "", o); gsub(/ /, "", o); sub(/:any$/, "", o)
            if (o == "") continue
            if (o in inst) { queue[++qn] = inst[o]; break }
            if (o in prov) { queue[++qn] = prov[o]; break }
          }
        }
      }
      for (p in seen) print p
    }' | sort >"$WORK/packages.txt"
[ -s "$WORK/packages.txt" ] || fail "no Priority: required packages found with dpkg-query"
# None of the project's packages (or OpenSSL) may be in it; libstdc++6, libgcc-s1, zlib1g,
# libzstd1, liblz4-1, libbz2-1.0, libxxhash0 and libpcre2-8-0 are (minbase has them too).
if grep -E '^(libcaf|libucx|ucx|librocksdb|libgrpc|libprotobuf|libyaml-cpp|libcpp-httplib|libssl|libabsl|libfmt|libopenblas|libnuma|libibverbs)' "$WORK/packages.txt"; then
  fail "the clean root would hold the project's packages listed above"
fi
xargs dpkg -L <"$WORK/packages.txt" 2>/dev/null | grep '^/' | sort -u |
  grep -v -E '^/usr/share/(doc|man|info|locale|zoneinfo|lintian|bug|common-licenses)/' |
  sed 's|^/||' >"$WORK/listed.txt"
# A path dpkg lists may be absent here (a container image drops /boot, an admin deletes a
# conffile): the clean root is made of what this machine has, and says how much it lacked.
while IFS= read -r f; do
  if [ -e "/$f" ] || [ -L "/$f" ]; then echo "$f"; fi
done <"$WORK/listed.txt" >"$WORK/files.txt"
absent=$(($(wc -l <"$WORK/listed.txt") - $(wc -l <"$WORK/files.txt")))
mkdir -p "$ROOT"
# Merged /usr as on this machine: /bin, /sbin, /lib, /lib64 are links into /usr.
for d in bin sbin lib lib64; do
  if [ -L "/$d" ]; then
    mkdir -p "$ROOT/$(readlink "/$d")"
    ln -s "$(readlink "/$d")" "$ROOT/$d"
  fi
done
tar -C / --no-recursion -cf - -T "$WORK/files.txt" 2>"$WORK/copy.err" |
  tar -C "$ROOT" --keep-directory-symlink -xf - ||
  fail "copying this machine's files of those packages: $(head -n 5 "$WORK/copy.err")"
mkdir -p "$ROOT/dev" "$ROOT/proc" "$ROOT/sys" "$ROOT/tmp" "$ROOT/etc" "$ROOT/work" "$ROOT/dev/shm"
chmod 1777 "$ROOT/tmp"
mknod -m 666 "$ROOT/dev/null" c 1 3
mknod -m 666 "$ROOT/dev/zero" c 1 5
mknod -m 666 "$ROOT/dev/random" c 1 8
mknod -m 666 "$ROOT/dev/urandom" c 1 9
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
chroot "$ROOT" /sbin/ldconfig
found=$(find "$ROOT" \( -name 'libcaf*' -o -name 'libuc[pstm]*' -o -name 'librocksdb*' \
  -o -name 'libgrpc*' -o -name 'libprotobuf*' -o -name 'libyaml-cpp*' -o -name 'libcpp-httplib*' \
  -o -name 'libssl.so*' -o -name 'libcrypto.so*' -o -name 'libfmt*' -o -name 'libopenblas*' \
  -o -name 'libabsl*' \) -print)
[ -z "$found" ] || fail "the clean root holds project libraries: $found"
echo "bundle_test: clean root: $(wc -l <"$WORK/packages.txt") packages, $(wc -l <"$WORK/files.txt") paths ($absent listed by dpkg but absent here), $(du -sm "$ROOT" | cut -f1) MiB"

# The reference: the build tree's own model and generate output.
step "reference generate (build tree)"
"$DSERVE" model init --preset tiny --seed 1 --out "$WORK/ref-model" 2>/dev/null
"$DSERVE" generate --model "$WORK/ref-model" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" \
  >"$WORK/ref-generate.out" 2>"$WORK/ref-generate.err"

# 3. Inside the clean root.
cp "$WORK/dserve-test.tar.gz" "$ROOT/work/"
cat >"$ROOT/work/inside.sh" <<'INSIDE'
#!/bin/sh
# Runs chrooted in the clean root, in a network namespace with only loopback.
set -eu
BASE=$1 PROMPT=$2 MAX_TOKENS=$3
cd /work
tar xzf dserve-test.tar.gz
./dserve-test/install.sh --prefix /opt/dserve
D=/opt/dserve/bin/dserve
$D model init --preset tiny --seed 1 --out /work/model 2>/work/model-init.err
$D generate --model /work/model --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" \
  >/work/generate.out 2>/work/generate.err

pids=""
up_started=0
stop() {
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$up_started" = 1 ]; then $D down -f /work/up.yaml --state-dir /work/up-state || true; fi
}
trap stop EXIT
# Starts one role and waits (60 s at most) for its "dserve: serving" line.
start() {
  name=$1; shift
  $D serve "$@" >"/work/$name.out" 2>"/work/$name.err" &
  pid=$!
  pids="$pids $pid"
  i=0
  while [ $i -lt 600 ]; do
    if grep -q "dserve: serving" "/work/$name.out"; then return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
  done
  echo "inside: the $name process did not start; its log:" >&2
  cat "/work/$name.err" >&2
  exit 1
}
start prefill --role prefill --model /work/model --listen "127.0.0.1:$((BASE + 1))"
# The decode worker reports each UCX module it loads on stdout (checked outside).
export UCX_MODULE_LOG_LEVEL=warn
start decode --role decode --model /work/model --listen "127.0.0.1:$((BASE + 2))"
unset UCX_MODULE_LOG_LEVEL
start gateway --role gateway --model /work/model --listen "127.0.0.1:$BASE" \
  --grpc-listen "127.0.0.1:$((BASE + 3))" \
  --prefill "127.0.0.1:$((BASE + 1))" --decode "127.0.0.1:$((BASE + 2))"
$D submit --gateway "127.0.0.1:$((BASE + 3))" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" \
  >/work/submit.out 2>/work/submit.err
stop
pids=""

# The same cluster from a manifest (after the bundled share/dserve/examples/single-node.yaml):
# `dserve up` starts the workers through /proc/self/exe, i.e. the bundle's libexec/dserve with
# this environment, and returns once the gateway is healthy.
cat >/work/up.yaml <<UP
version: 1
mode: disaggregated
model:
  path: /work/model
nodes:
  - name: local
    address: 127.0.0.1
    devices: 0
    base_port: $((BASE + 10))
gateway:
  node: local
  grpc_port: $((BASE + 13))
pools:
  prefill:
    replicas: 1
    placement: local
    devices_per_replica: 0
  decode:
    replicas: 1
    placement: local
    devices_per_replica: 0
network:
  ucx_transports: [tcp]
  ucx_net_devices: [lo]
UP
up_started=1
$D up -f /work/up.yaml --state-dir /work/up-state >/work/up.out 2>/work/up.err
$D submit --gateway "127.0.0.1:$((BASE + 13))" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" \
  >/work/up-submit.out 2>/work/up-submit.err
$D down -f /work/up.yaml --state-dir /work/up-state >/work/down.out 2>&1
up_started=0
INSIDE
step "chroot + unshare --net: install, model init, generate, cluster, submit, up, down"
if ! unshare --net --mount --propagation private sh -c '
    set -e
    ip link set lo up
    mount -t proc proc "$1/proc"
    mount -t sysfs sysfs "$1/sys"
    mount -t tmpfs -o mode=1777 tmpfs "$1/dev/shm"
    exec chroot "$1" /bin/sh /work/inside.sh "$2" "$3" "$4"' \
    inside "$ROOT" "$BASE" "$PROMPT" "$MAX_TOKENS" >"$WORK/inside.log" 2>&1; then
  cat "$WORK/inside.log" >&2
  for f in model-init generate prefill decode gateway submit up up-submit; do
    [ -s "$ROOT/work/$f.err" ] && { echo "--- $f.err" >&2; tail -n 20 "$ROOT/work/$f.err" >&2; }
  done
  fail "the bundle did not run in the clean root (log above)"
fi
cat "$WORK/inside.log"

step "compare"
cmp "$WORK/ref-model/config.json" "$ROOT/work/model/config.json" ||
  fail "the bundle's model init wrote a different config.json"
cmp "$WORK/ref-generate.out" "$ROOT/work/generate.out" ||
  fail "generate in the clean root printed '$(cat "$ROOT/work/generate.out")', the build tree '$(cat "$WORK/ref-generate.out")'"
cmp "$WORK/ref-generate.out" "$ROOT/work/submit.out" ||
  fail "submit through the bundle's cluster printed '$(cat "$ROOT/work/submit.out")', generate '$(cat "$WORK/ref-generate.out")'"
[ -s "$WORK/ref-generate.out" ] || fail "generate printed nothing"
# UCX found its transport modules in the bundle (UCX_MODULE_DIR), every one of them.
modules=0
for m in "$ROOT"/opt/dserve/lib/dserve/lib/ucx/*.so.*; do
  [ -e "$m" ] || fail "the installed bundle has no UCX modules in lib/ucx"
  grep -q "loaded /opt/dserve/lib/dserve/lib/ucx/$(basename "$m")" "$ROOT/work/decode.out" ||
    fail "the decode worker did not load the bundled UCX module $(basename "$m"): $(grep -i module "$ROOT/work/decode.out" | head -n 5)"
  modules=$((modules + 1))
done
echo "bundle_test: UCX loaded its $modules transport modules from the bundle"
cmp "$WORK/ref-generate.out" "$ROOT/work/up-submit.out" ||
  fail "submit through the bundle's \`dserve up\` cluster printed '$(cat "$ROOT/work/up-submit.out")', generate '$(cat "$WORK/ref-generate.out")'"
echo "bundle_test: generate, submit and submit to \`dserve up\` in the clean root match the build tree: $(head -c 80 "$WORK/ref-generate.out")"
step "passed"
