#!/usr/bin/env bash
# The batch-invariant product against OpenBLAS sgemm, with OpenBLAS on each core type it may
# use here (its own guess, Haswell, SkylakeX, Cooperlake): bench/RESULTS.md keeps the best
# OpenBLAS time of each point.
#   bench/gemm_bench.sh [build-dir] [extra gemm_bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build}"
shift || true
cmake --build "$build" --target gemm_bench
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; date: $(date -u +%F)"
"$build/bench/gemm_bench" --benchmark_filter='BM_Invariant|BM_SgemvPerRow' "$@"
for core in default Haswell SkylakeX Cooperlake; do
  if [ "$core" = default ]; then
    env -u OPENBLAS_CORETYPE "$build/bench/gemm_bench" --benchmark_filter='BM_OpenBlas|BM_Stream' "$@"
  else
    OPENBLAS_CORETYPE=$core "$build/bench/gemm_bench" --benchmark_filter='BM_OpenBlas|BM_Stream' "$@"
  fi
done
