#!/usr/bin/env bash
# Runs clang-tidy (Debian's clang-tidy 14) with the repo's .clang-tidy over the project's own C++
# sources: every .cc of the compilation database (build/compile_commands.json, written by
# scripts/build.sh) that lies in the repository outside the build folder, i.e. every module's
# src/ (and through them its include/ headers, see HeaderFilterRegex) and the CLI; not the
# protobuf/gRPC code generated into the build folder, not third-party code, and not the CUDA .cu
# files: clang-tidy 14 cannot parse nvcc's compile commands (-forward-unknown-to-host-compiler,
# --extended-lambda, --generate-code=arch=compute_90a) nor CUDA 13's headers (its CUDA wrapper
# wants texture_fetch_functions.h, which CUDA 13 dropped). The CUDA backend's .cc files are
# checked when nvcc was found (they are in compile_commands.json then). tests/ and bench/ only
# with --all: they would double the time (see .clang-tidy) and are not clean yet.
# Runs $DSERVE_TIDY_JOBS (default: nproc) files at a time, prints every finding once (a finding
# in a header is reported by each file that includes it), a count per check and the time taken,
# and fails on any finding (WarningsAsErrors: '*') or any file clang-tidy cannot parse.
#   scripts/tidy.sh [--all] [REGEX]   only the files whose path (relative to the repo) matches
#                                     REGEX (Python syntax)
# DSERVE_TIDY_CHECKS=GLOBS adds to .clang-tidy's Checks (e.g. -clang-analyzer-* for a quick run);
# DSERVE_TIDY_PROFILE=DIR stores each file's time per check there (clang-tidy
# --store-check-profile) and prints the checks that took longest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
JOBS=${DSERVE_TIDY_JOBS:-$(nproc)}
ALL=0
if [ "${1:-}" = "--all" ]; then
  ALL=1
  shift
fi
FILTER=${1:-.}
TIDY=${CLANG_TIDY:-}
if [ -z "$TIDY" ]; then
  if command -v clang-tidy-14 >/dev/null 2>&1; then TIDY=clang-tidy-14; else TIDY=clang-tidy; fi
fi
DB="$BUILD_DIR/compile_commands.json"
if [ ! -f "$DB" ]; then
  echo "tidy: $DB not found: build first (scripts/build.sh)" >&2
  exit 2
fi
BUILD_ABS=$(cd "$BUILD_DIR" && pwd)

mapfile -t files < <(python3 - "$DB" "$ROOT" "$BUILD_ABS" "$FILTER" "$ALL" <<'EOF'
import json, os, re, sys
db, root, build, pattern, everything = sys.argv[1:6]
seen = set()
for entry in json.load(open(db)):
    path = os.path.normpath(os.path.join(entry["directory"], entry["file"]))
    rel = os.path.relpath(path, root)
    if rel.startswith("..") or path.startswith(build + os.sep):
        continue  # outside the repository, or generated into the build folder
    if not rel.endswith(".cc") or rel.startswith("third_party/") or not re.search(pattern, rel):
        continue  # .cu: nvcc only
    if everything != "1" and rel.startswith(("tests/", "bench/")):
        continue
    if rel not in seen:
        seen.add(rel)
        print(rel)
EOF
)
if [ ${#files[@]} -eq 0 ]; then
  echo "tidy: no file matches '$FILTER' in $DB" >&2
  exit 2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
echo "tidy: $TIDY on ${#files[@]} files, $JOBS at a time"
# One clang-tidy per file: <n>.log is what it printed, <n>.rc its exit status, milliseconds, file.
run_one() {
  local t0=${EPOCHREALTIME/./} rc=0
  "$TIDY" -p "$BUILD_DIR" --quiet ${CHECKS:+--checks="$CHECKS"} \
    ${PROFILE:+--enable-check-profile --store-check-profile="$PROFILE"} \
    "$2" >"$out/$1.log" 2>&1 || rc=$?
  echo "$rc $(((${EPOCHREALTIME/./} - t0) / 1000)) $2" >"$out/$1.rc"
}
export -f run_one
PROFILE=${DSERVE_TIDY_PROFILE:+$(mkdir -p "$DSERVE_TIDY_PROFILE" && cd "$DSERVE_TIDY_PROFILE" && pwd)}
CHECKS=${DSERVE_TIDY_CHECKS:-}
export TIDY BUILD_DIR out PROFILE CHECKS
printf '%s\n' "${files[@]}" | nl -ba -w1 -s' ' | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
times >"$out/times"  # the second line: user and system CPU time of every clang-tidy

python3 - "$out" "${#files[@]}" "$(($(date +%s) - start))" "$JOBS" "$PROFILE" <<'EOF'
import collections, glob, json, os, re, sys
out, count, wall, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
profile = sys.argv[5]
head = re.compile(r"^(\S.*?):(\d+):(\d+): (warning|error): (.*) \[([^\]]+)\]$")
findings = {}  # (file, line, column, check) -> the diagnostic with its notes and source lines
broken, times = [], []
for rc_path in glob.glob(os.path.join(out, "*.rc")):
    rc, ms, name = open(rc_path).read().strip().split(" ", 2)
    times.append((int(ms), name))
    log = open(rc_path[:-3] + ".log", errors="replace").read().splitlines()
    found, current = False, None
    for line in log:
        m = head.match(line)
        if m:
            found = True
            key = (os.path.relpath(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(6))
            current = None if key in findings else findings.setdefault(key, [])
            if current is not None:
                current.append(line)
        elif re.match(r"^\d+ (warnings?|errors?)( and \d+ errors?)? generated\.$", line) \
                or line.startswith("Error while processing") or "treated as error" in line:
            current = None
        elif current is not None:
            current.append(line)
    if rc != "0" and not found:
        broken.append((name, "\n".join(log[-20:])))
for key in sorted(findings):
    print("\n".join(findings[key]))
for name, tail in broken:
    print(f"tidy: clang-tidy failed on {name} without a finding:\n{tail}")
per_check = collections.Counter(k[3].split(",")[0] for k in findings)
times.sort(reverse=True)
def seconds(text):  # bash's `times`: 1m2.345s
    m = re.match(r"(\d+)m([\d.]+)s", text)
    return int(m.group(1)) * 60 + float(m.group(2))
cpu = sum(seconds(t) for t in open(os.path.join(out, "times")).read().split()[2:4])
print(f"tidy: {count} files in {wall} s wall on {jobs} jobs, {cpu:.0f} s CPU"
      f" (~{cpu / jobs:.0f} s on {jobs} idle cores); slowest (wall): "
      + ", ".join(f"{n} {t / 1000:.0f} s" for t, n in times[:5]))
if profile:
    per_check_cpu = collections.Counter()
    for path in glob.glob(os.path.join(profile, "*.json")):
        for key, value in json.load(open(path))["profile"].items():
            if key.endswith((".user", ".sys")):  # time.clang-tidy.<check>.user
                per_check_cpu[key.split(".", 2)[2].rsplit(".", 1)[0]] += value
    print("tidy: CPU per check (s, without parsing and the static analyzer): " +
          ", ".join(f"{c} {t:.0f}" for c, t in per_check_cpu.most_common(10)))
if per_check:
    print(f"tidy: {len(findings)} findings: " +
          ", ".join(f"{c} {n}" for c, n in per_check.most_common()))
if findings or broken:
    print("tidy: FAILED: fix each finding, or mark a false positive with "
          "// NOLINT(check-name): reason")
    sys.exit(1)
print("tidy: no findings")
EOF
