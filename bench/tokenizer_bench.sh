#!/usr/bin/env bash
# Tokenizer encode throughput, C++ against JavaScript, on the same seeded corpus.
#   bench/tokenizer_bench.sh [build-dir]     (default: build; needs scripts/install-deps.sh)
# Prints both figures; bench/RESULTS.md ("Tokenizer") keeps the latest.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build}"
cmake --build "$build" --target tokenizer_bench
corpus="$(mktemp --suffix=.json)"
trap 'rm -f "$corpus"' EXIT
"$build/bench/tokenizer_bench" --write_corpus="$corpus"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; date: $(date -u +%F)"
"$build/bench/tokenizer_bench" --benchmark_filter=BM_EncodeCorpus
(cd tools/tokenizer-oracle && node bench.mjs "$corpus" 3)
