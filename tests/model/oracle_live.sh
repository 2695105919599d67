#!/usr/bin/env bash
# The oracle on inputs no fixture froze: a freshly generated tiny checkpoint and a random prompt,
# both drawn from one seed per run (printed; DSERVE_ORACLE_SEED=N repeats a run). Our forward
# runs the prompt in random chunks (prefill as serving does it); transformers' (the CPU port in
# tools/oracle) runs it whole. tools/oracle/compare.py then checks every vocab entry of every
# position and names the first layer that differs.
#
# The prompt is long enough that the indexer's top-k is sparse, so the reference breaks exact
# indexer ties by our rule (lowest index first); the rows where such a tie straddled rank k are
# counted and printed. usage: oracle_live.sh DSERVE SOURCE_DIR PYTHON
set -euo pipefail
dserve=$1
source_dir=$2
python=$3

if ! "$python" -c 'import torch, numpy' 2>/dev/null; then
  echo "oracle_live: $python cannot import torch and numpy; run scripts/install-deps.sh" >&2
  exit 1
fi

seed=${DSERVE_ORACLE_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "oracle_live: seed $seed (DSERVE_ORACLE_SEED=$seed repeats this run)"
work=$(mktemp -d "${TMPDIR:-/tmp}/dserve-oracle-live.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$dserve" model init --preset tiny --seed "$seed" --layout transformers --dtype f32 \
  --out "$work/model"

# The prompt: BOS, then 40..199 ids drawn over the whole vocabulary; a chunk size of 1..24.
read -r chunk < <("$python" - "$seed" "$work/model/config.json" "$work/ids.txt" <<'EOF'
import json, random, sys
rng = random.Random(int(sys.argv[1]))
vocab = json.load(open(sys.argv[2]))["vocab_size"]
ids = [0] + [rng.randrange(1, vocab) for _ in range(rng.randrange(40, 200))]
open(sys.argv[3], "w").write(",".join(map(str, ids)))
print(rng.randrange(1, 25))
EOF
)
echo "oracle_live: $(tr "," "\n" < "$work/ids.txt" | grep -c .) ids; ours in chunks of $chunk"

"$dserve" model trace --model "$work/model" --ids "@$work/ids.txt" --chunk "$chunk" --out "$work/ours"
"$python" "$source_dir/tools/oracle/reference.py" --model "$work/model" --ids "@$work/ids.txt" \
  --tie-rule lowest --threads 1 --trace "$work/ref"
"$python" "$source_dir/tools/oracle/compare.py" "$work/ours" "$work/ref" --tolerance 1e-4
