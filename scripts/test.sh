#!/usr/bin/env bash
# The second README command (and CI's): install, build, run clang-tidy and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
scripts/check-layers.sh  # no module depends on one above it (README.md "Layout")
# clang-tidy over the project's sources (scripts/tidy.sh, .clang-tidy): any finding fails the
# run, after the tests have run too. DSERVE_SKIP_TIDY=1 leaves it out (local runs only).
failed=0
if [ "${DSERVE_SKIP_TIDY:-0}" != 1 ]; then
  tidy_start=$(date +%s)
  DSERVE_BUILD_DIR="$BUILD_DIR" scripts/tidy.sh || failed=1
  echo "dserve: clang-tidy took $(( $(date +%s) - tidy_start )) s"
fi
ctest --test-dir "$BUILD_DIR" --output-on-failure --parallel "$(nproc)" --timeout 900 || failed=1
echo "dserve: install + build + clang-tidy + tests took $(( $(date +%s) - start )) s"
if [ "$failed" != 0 ]; then echo "dserve: FAILED (clang-tidy or tests, see above)"; fi
exit "$failed"
