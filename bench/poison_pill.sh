#!/usr/bin/env bash
# A poison-pill prompt against a local cluster (2 prefill workers, 1 decode worker, gateway):
# one short request a second, first alone (phase A), then while one prompt of one long word
# runs (phase B). Prints the short requests' failures and TTFT p50/p99 in each phase, and what
# became of the long prompt (completed, or its error) with its placements.
#
#   bench/poison_pill.sh [MODEL_DIR] [CHARS] [SHORTS_A] [SHORTS_B]
#   defaults: models/tiny, 1000000 characters, 30 and 120 short requests
#   LONG_TIMEOUT_MS=N gives the long prompt that deadline (default: the gateway's, 300 s)
#
# Every process listens on a free port on 127.0.0.1; logs go to a temporary directory that is
# printed (and kept) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DSERVE=${DSERVE:-build/dserve}
MODEL=${1:-models/tiny}
CHARS=${2:-1000000}
SHORTS_A=${3:-30}
SHORTS_B=${4:-120}
WORK=$(mktemp -d /tmp/dserve-poison-pill.XXXXXX)
# shellcheck source=bench/local_cluster.sh
source bench/local_cluster.sh

serve prefill-1 --role prefill --model "$MODEL" --listen 127.0.0.1:0
serve prefill-2 --role prefill --model "$MODEL" --listen 127.0.0.1:0
serve decode-1 --role decode --model "$MODEL" --listen 127.0.0.1:0
p1=$(address prefill-1)
p2=$(address prefill-2)
d1=$(address decode-1)
serve gateway --role gateway --model "$MODEL" --listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 \
  --prefill "$p1,$p2" --decode "$d1"
grpc=$(grpc_address gateway)
echo "cluster: prefill $p1 $p2, decode $d1, gateway gRPC $grpc; logs in $WORK"

# N short requests, one a second; one line per request: exit code and TTFT in ms.
shorts() {
  local out=$1 n=$2
  for i in $(seq 1 "$n"); do
    local rc=0
    timeout 60 "$DSERVE" submit --gateway "$grpc" --prompt "Hello" --max-tokens 4 \
      >/dev/null 2>"$WORK/one.err" || rc=$?
    local ttft
    ttft=$(grep -o 'first token [0-9.]* ms' "$WORK/one.err" | tail -1 | cut -d' ' -f3)
    echo "$rc ${ttft:-none}" >>"$out"
    sleep 1
  done
}
report() {
  local name=$1 file=$2
  local n failed
  n=$(wc -l <"$file")
  failed=$(awk '$1 != 0' "$file" | wc -l)
  awk '$1 == 0 {print $2}' "$file" | sort -n | awk -v name="$name" -v n="$n" -v failed="$failed" '
    {v[NR] = $1}
    END {
      if (NR == 0) { printf "%s: %d requests, %d failed\n", name, n, failed; exit }
      i50 = int(NR * 0.50 + 0.999); i99 = int(NR * 0.99 + 0.999)
      printf "%s: %d requests, %d failed; TTFT p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
             name, n, failed, v[i50], v[i99], v[NR]
    }'
}

shorts "$WORK/phase-a.txt" "$SHORTS_A"
/usr/bin/python3 -c "
import json, random, sys
random.seed(1)
word = ''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range($CHARS))
job = {'id': 'long', 'prompt': word, 'max_tokens': 4}
if '${LONG_TIMEOUT_MS:-}':
    job['timeout_ms'] = int('${LONG_TIMEOUT_MS:-0}')
print(json.dumps(job))" >"$WORK/long.jsonl"
start=$(date +%s.%N)
("$DSERVE" submit --gateway "$grpc" --jobs "$WORK/long.jsonl" --out "$WORK/long.out" \
  2>"$WORK/long.err" || true; date +%s.%N >"$WORK/long.end") &
long_pid=$!
shorts "$WORK/phase-b.txt" "$SHORTS_B"
wait "$long_pid"

report "phase A (alone)" "$WORK/phase-a.txt"
report "phase B (with a $CHARS-character word)" "$WORK/phase-b.txt"
tokens=$(grep -o 'prompt_tokens=[0-9]*' "$WORK/gateway.log" | sort -t= -k2 -n | tail -1)
placements=$(grep -c "placed .*${tokens} *$" "$WORK/gateway.log" || true)
echo "long prompt ($tokens): $(cut -c1-300 "$WORK/long.out"); $placements placement(s);" \
  "$(awk -v s="$start" '{printf "%.1f s", $1 - s}' "$WORK/long.end")"
echo "replays in the gateway log: $(grep -c ' replayed ' "$WORK/gateway.log" || true)"
