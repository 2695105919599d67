#!/usr/bin/env bash
# Requests per second through a real cluster (gateway, one prefill and one decode worker) with
# 1 stream and with N concurrent streams of `dserve submit --jobs`, each request a short prompt
# and 64 new tokens (greedy). The decode worker batches the concurrent streams into one step.
#
#   bench/concurrent_streams.sh [MODEL_DIR] [STREAMS] [REQUESTS_PER_STREAM]
#   defaults: models/small, 16 streams, 4 requests each (the 1-stream run sends as many
#   requests in total as the others, one at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
DSERVE=${DSERVE:-build/dserve}
MODEL=${1:-models/small}
STREAMS=${2:-16}
PER_STREAM=${3:-4}
WORK=$(mktemp -d /tmp/dserve-streams.XXXXXX)
# shellcheck source=bench/local_cluster.sh
source bench/local_cluster.sh
serve prefill --role prefill --model "$MODEL" --listen 127.0.0.1:0
serve decode --role decode --model "$MODEL" --listen 127.0.0.1:0
serve gateway --role gateway --model "$MODEL" --listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 \
  --prefill "$(address prefill)" --decode "$(address decode)"
grpc=$(grpc_address gateway)
total=$((STREAMS * PER_STREAM))
/usr/bin/python3 -c "
import json
for i in range($total):
    print(json.dumps({'id': str(i), 'prompt': 'Request %d: tell me a story about the sea.' % i,
                      'max_tokens': 64, 'temperature': 0}))" >"$WORK/jobs.jsonl"

# `submit --jobs` keeps CONCURRENCY requests in flight; prints the wall time.
run() {
  local concurrency=$1 out=$2
  local t0 t1
  t0=$(date +%s.%N)
  "$DSERVE" submit --gateway "$grpc" --jobs "$WORK/jobs.jsonl" --concurrency "$concurrency" \
    --out "$out" 2>"$out.err"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; model $MODEL;" \
  "$total requests of 64 tokens"
head -n 2 "$WORK/jobs.jsonl" >"$WORK/warmup-jobs.jsonl"
"$DSERVE" submit --gateway "$grpc" --jobs "$WORK/warmup-jobs.jsonl" --out /dev/null 2>/dev/null
one=$(run 1 "$WORK/one.jsonl")
many=$(run "$STREAMS" "$WORK/many.jsonl")
failed=$( (grep -c '"error"' "$WORK/one.jsonl" "$WORK/many.jsonl" || true) |
  awk -F: '{s += $2} END {print s + 0}')
# The tokens of each request must not depend on the concurrency.
same=$(/usr/bin/python3 -c "
import json
def load(p):
    return {j['id']: j.get('tokens') for j in map(json.loads, open(p))}
a, b = load('$WORK/one.jsonl'), load('$WORK/many.jsonl')
print(sum(1 for k in a if a[k] is not None and a[k] == b.get(k)))")
awk -v n="$total" -v one="$one" -v many="$many" -v s="$STREAMS" -v failed="$failed" -v same="$same" 'BEGIN {
  printf "1 stream: %.2f requests/s (%.1f s); %d streams: %.2f requests/s (%.1f s); ratio %.2f\n",
         n / one, one, s, n / many, many, one / many
  printf "failed: %d; requests with identical tokens at both concurrencies: %d of %d\n",
         failed, same, n
}'
