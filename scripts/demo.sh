#!/usr/bin/env bash
# The first README command: install, build, generate a tiny model, start a local cluster from a
# manifest with `dserve up` (a gateway, a prefill worker and a decode worker as separate
# processes on loopback), show `dserve status`, answer a prompt with `dserve submit`, and stop
# the cluster with `dserve down`. Ports: DSERVE_DEMO_PORT (default: the first of a run of free
# ones, see free_base) and the next three, and 100 above each; the manifest, state and logs in
# build/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSERVE_BUILD_DIR:-build}
MODEL_DIR=$(realpath -m "${DSERVE_DEMO_MODEL:-models/tiny}")

# A port BASE such that BASE..BASE+3 and BASE+100..BASE+103 are all unused on this machine now
# (no TCP socket of any state has them), searched from a random start below the kernel's
# ephemeral port range (10000 up to it; 20000..59999 when it leaves no room), as the tests'
# free_port_run does.
free_base() {
  local first=10000 end used start=$RANDOM base i p free
  read -r end _ </proc/sys/net/ipv4/ip_local_port_range
  if [ "$end" -lt 10400 ]; then first=20000 end=60000; fi
  end=$((end - 104))  # the bases searched: first..end-1
  used=" $(ss -Htan | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }') "
  for ((i = 0; i < end - first; i++)); do
    base=$((first + (start + i) % (end - first)))
    free=1
    for p in $base $((base + 1)) $((base + 2)) $((base + 3)) $((base + 100)) $((base + 101)) \
      $((base + 102)) $((base + 103)); do
      if [[ "$used" == *" $p "* ]]; then free=0 && break; fi
    done
    if [ "$free" = 1 ]; then echo "$base" && return; fi
  done
  echo "dserve demo: no free run of ports; set DSERVE_DEMO_PORT" >&2
  return 1
}
BASE=${DSERVE_DEMO_PORT:-$(free_base)}
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
    speculative_tokens: 3   # MTP drafts, the draft count adapted per step (decode/README.md)
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
# The workers' figures after the prompt (the gateway polls them every 250 ms): the decode
# worker's speculation among them.
sleep 1
"$DSERVE" status "${CLUSTER[@]}"
