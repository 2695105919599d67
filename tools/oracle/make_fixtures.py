#!/usr/bin/env python3
"""Golden logits from the outside oracle, for tests/model/oracle_test.cc.

Runs on a machine with PyTorch and transformers 5.17 (the lent GPU machine): loads a
checkpoint written by `dserve model init --layout transformers --dtype f32|bf16`, runs
`DeepseekV4ForCausalLM`'s uncached full forward in fp32 (eager), and writes a small JSON
fixture: for every position of the prompt, the argmax, the log-sum-exp of the row, and the
logits at a fixed set of probe ids (the reference's top 16 plus seeded random ids). Storing
probes instead of whole rows keeps a fixture of a 129,280-word vocabulary under 1 MB while
still checking every position.

Before trusting a fixture, it also checks the reference's own prefix causality on this config
(../shared/design/MODEL-V4.md, "measured caveats"): logits of the prompt's first half must
equal the first half of the full run. The result is recorded in the fixture; the C++ test
refuses a fixture whose reference was not causal.

usage: make_fixtures.py --model DIR --preset tiny --model-seed 1 --dtype bf16 --ids "0,1,..." \
           --out FILE [--device cuda] [--probes 240]
(--preset/--model-seed/--dtype record how `dserve model init` wrote DIR, so that the C++ test
regenerates the identical checkpoint.)
"""
import argparse
import json
import random
import sys

import torch
from transformers import DeepseekV4ForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated token ids, BOS included")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--model-seed", type=int, required=True)
    ap.add_argument("--dtype", required=True, choices=["bf16", "f32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--probes", type=int, default=240)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    model = DeepseekV4ForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attn_implementation="eager").to(args.device).eval()
    x = torch.tensor([ids], device=args.device)
    with torch.no_grad():
        full = model(x, use_cache=False).logits[0].double().cpu()
        half = len(ids) // 2
        prefix = model(x[:, :half], use_cache=False).logits[0].double().cpu()
    causal_diff = float((prefix - full[:half]).abs().max())

    vocab = full.shape[1]
    rng = random.Random(args.seed)
    fixed = sorted(rng.sample(range(vocab), args.probes))
    rows = []
    for t in range(len(ids)):
        row = full[t]
        top = torch.topk(row, 16).indices.tolist()
        probe_ids = sorted(set(top) | set(fixed))
        rows.append({
            "argmax": int(torch.argmax(row)),
            "logsumexp": float(torch.logsumexp(row, 0)),
            "probe_ids": probe_ids,
            "probe_logits": [float(row[i]) for i in probe_ids],
        })
    fixture = {
        "oracle": "transformers DeepseekV4ForCausalLM, uncached full forward, fp32 eager",
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dserve_model": {"preset": args.preset, "seed": args.model_seed,
                         "layout": "transformers", "dtype": args.dtype},
        "model_config": json.load(open(f"{args.model}/config.json")),
        "token_ids": ids,
        "reference_prefix_causality_max_diff": causal_diff,
        "positions": rows,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {args.out}: {len(ids)} positions, causality diff {causal_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
