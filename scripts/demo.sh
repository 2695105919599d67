#!/usr/bin/env bash
# The first README command: install, build, generate a tiny model and answer a prompt with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
MODEL_DIR=${DSERVE_DEMO_MODEL:-models/tiny}
"$BUILD_DIR/dserve" model init --preset tiny --seed 1 --out "$MODEL_DIR"
"$BUILD_DIR/dserve" generate --model "$MODEL_DIR" --prompt "The capital of France is" --max-tokens 32
