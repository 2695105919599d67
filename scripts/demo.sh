#!/usr/bin/env bash
# The first README command: install, build, generate a tiny model, start a local cluster from a
# manifest with `dserve up` (a gateway, a prefill worker and a decode worker as separate
# processes on loopback), show `dserve status`, answer a prompt with `dserve submit`, and stop
# the cluster with `dserve down`. Ports: DSERVE_DEMO_PORT (default 17400) and the next few;
# the manifest, state and logs in build/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
MODEL_DIR=$(realpath -m "${DSERVE_DEMO_MODEL:-models/tiny}")
BASE=${DSERVE_DEMO_PORT:-17400}
PROMPT=${DSERVE_DEMO_PROMPT:-The capital of France is}
DEMO="$BUILD_DIR/demo"
DSERVE="$BUILD_DIR/dserve"
mkdir -p "$DEMO"

"$DSERVE" model init --preset tiny --seed 1 --out "$MODEL_DIR"

# The cluster: one CPU-only node; ports from BASE in launch order (gateway control, gateway
# gRPC, prefill-0, decode-0), each process's /metrics 100 above its control port.
cat >"$DEMO/cluster.yaml" <<YAML
version: 1
mode: disaggregated
model:
  path: $MODEL_DIR
nodes:
  - name: local
    address: 127.0.0.1
    devices: 0
    base_port: $BASE
gateway:
  node: local
pools:
  prefill:
    replicas: 1
    placement: local
    devices_per_replica: 0
  decode:
    replicas: 1
    placement: local
    devices_per_replica: 0
    kv_budget_mib: 256
network:
  ucx_transports: [tcp]
  ucx_net_devices: [lo]
  metrics_port_offset: 100
YAML

CLUSTER=(-f "$DEMO/cluster.yaml" --state-dir "$DEMO/state")
# A cluster left over from an interrupted demo is stopped first.
"$DSERVE" down "${CLUSTER[@]}" >/dev/null 2>&1 || true
trap '"$DSERVE" down "${CLUSTER[@]}"' EXIT
"$DSERVE" up "${CLUSTER[@]}"
"$DSERVE" status "${CLUSTER[@]}"

echo "dserve demo: prompt: $PROMPT"
"$DSERVE" submit --gateway "127.0.0.1:$((BASE + 1))" --prompt "$PROMPT" --max-tokens 32
