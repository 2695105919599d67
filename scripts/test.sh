#!/usr/bin/env bash
# The second README command (and CI's): install, build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
scripts/check-layers.sh  # no module depends on one above it (README.md "Layout")
ctest --test-dir "$BUILD_DIR" --output-on-failure --parallel "$(nproc)" --timeout 900
echo "dserve: install + build + tests took $(( $(date +%s) - start )) s"
