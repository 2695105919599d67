#!/usr/bin/env bash
# The first README command: install, build, generate a tiny model, start a local cluster (a
# gateway, a prefill worker and a decode worker as separate processes on loopback) and answer a
# prompt through it with `dserve submit`. Ports: DSERVE_DEMO_PORT (default 17400) and the next
# three; logs in build/demo-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
MODEL_DIR=${DSERVE_DEMO_MODEL:-models/tiny}
BASE=${DSERVE_DEMO_PORT:-17400}
PROMPT=${DSERVE_DEMO_PROMPT:-The capital of France is}
LOGS="$BUILD_DIR/demo-logs"
DSERVE="$BUILD_DIR/dserve"
mkdir -p "$LOGS"

"$DSERVE" model init --preset tiny --seed 1 --out "$MODEL_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Starts one process of a role and waits (60 s at most) for its "dserve: serving" line.
start() {
  local name=$1; shift
  "$DSERVE" serve "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
  pids+=($!)
  for _ in $(seq 600); do
    if grep -q "dserve: serving" "$LOGS/$name.out"; then cat "$LOGS/$name.out"; return 0; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "dserve demo: the $name process did not start; its log:" >&2
  cat "$LOGS/$name.err" >&2
  exit 1
}

start prefill --role prefill --model "$MODEL_DIR" --listen "127.0.0.1:$((BASE + 1))"
start decode --role decode --model "$MODEL_DIR" --listen "127.0.0.1:$((BASE + 2))"
start gateway --role gateway --model "$MODEL_DIR" --listen "127.0.0.1:$BASE" \
  --grpc-listen "127.0.0.1:$((BASE + 3))" \
  --prefill "127.0.0.1:$((BASE + 1))" --decode "127.0.0.1:$((BASE + 2))"

echo "dserve demo: prompt: $PROMPT"
"$DSERVE" submit --gateway "127.0.0.1:$((BASE + 3))" --prompt "$PROMPT" --max-tokens 32
