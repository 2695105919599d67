#!/usr/bin/python3
"""The outside oracle: transformers' DeepseekV4ForCausalLM (the CPU port in dsv4_ref.py), uncached
full forward in fp32, on a checkpoint written by `dserve model init --layout transformers --dtype f32`.

usage: reference.py --model DIR --ids IDS [--tie-rule lowest|torch]
                    [--trace DIR] [--fixture FILE --preset P --model-seed S] [--threads N]
IDS: comma-separated token ids (BOS first), or @FILE holding them.

--trace DIR   writes DIR/{embed,layerN,hc_head,final_norm,logits}.npy, the same stages that
              `dserve model trace` writes for our forward; tools/oracle/compare.py compares them.
--fixture     writes a tests/fixtures/oracle JSON (see tools/oracle/README.md for its fields).
--tie-rule    how the Lightning Indexer's top-k picks among entries of exactly equal score.
              `torch` is transformers as written (torch.topk: unspecified among ties, and it
              changes with the tensor's length); `lowest` keeps the lower entry index, which is
              our rule (model/README.md). Both give the same result wherever no exact tie
              straddles rank k; the number of rows where one does is always counted and reported.
"""
import argparse
import base64
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv4_ref  # noqa: E402

# The loader copies every tensor out of the memory-mapped file; torch's warning that the mapped
# array is read-only says nothing here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

TIE_RULES = {
    "torch": "torch.topk as transformers calls it (unspecified among exact ties)",
    "lowest": "lowest entry index first among exact ties (a stable sort); equals torch.topk "
              "wherever no exact tie straddles rank k",
}


class IndexerTopk:
    """Replaces Tensor.topk inside DeepseekV4Indexer.forward (its one top-k, over [B, S, T] fp32
    scores) and counts the rows where an exact, finite tie straddles rank k."""

    def __init__(self, rule):
        self.rule = rule
        self.straddling = {}  # layer index -> rows with a tie at the boundary
        self._plain_topk = torch.Tensor.topk
        indexer_forward = dsv4_ref.DeepseekV4Indexer.forward
        outer = self

        def forward(module, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
            torch.Tensor.topk = lambda t, k, dim=-1, largest=True, sorted=True: outer._topk(
                layer_idx, t, k, dim, largest, sorted)
            try:
                return indexer_forward(module, hidden_states, q_residual, position_ids,
                                       past_key_values, layer_idx)
            finally:
                torch.Tensor.topk = outer._plain_topk

        dsv4_ref.DeepseekV4Indexer.forward = forward

    def _topk(self, layer, scores, k, dim, largest, sorted_):
        assert dim in (-1, scores.dim() - 1) and largest, "the indexer takes the largest on the last dim"
        n = scores.shape[-1]
        if 0 < k < n:
            ordered = torch.sort(scores, dim=-1, descending=True).values
            tie = (ordered[..., k - 1] == ordered[..., k]) & torch.isfinite(ordered[..., k])
            self.straddling[layer] = self.straddling.get(layer, 0) + int(tie.sum())
        if self.rule == "torch":
            return self._plain_topk(scores, k, dim=dim, largest=largest, sorted=sorted_)
        # A stable descending sort keeps equal scores in index order: the lower index first.
        ordered = torch.sort(scores, dim=-1, descending=True, stable=True)
        return torch.return_types.topk((ordered.values[..., :k], ordered.indices[..., :k]))

    def reset(self):
        self.straddling = {}


def forward(model, ids, trace=None):
    """Logits [n, vocab] (fp32) of one uncached forward; with `trace`, fills it with the stages."""
    hooks = []
    if trace is not None:
        def keep(name):
            return lambda module, inputs, out: trace.__setitem__(name, out[0].detach().numpy().copy())
        hooks.append(model.model.embed_tokens.register_forward_hook(keep("embed")))
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_hook(keep(f"layer{i}")))
        hooks.append(model.model.hc_head.register_forward_hook(keep("hc_head")))
        hooks.append(model.model.norm.register_forward_hook(keep("final_norm")))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()


def read_ids(spec):
    text = open(spec[1:]).read() if spec.startswith("@") else spec
    ids = [int(x) for x in text.replace("\n", ",").split(",") if x.strip()]
    if not ids:
        sys.exit("reference.py: no token ids given")
    return ids


def full_row_positions(n, count):
    """Positions whose whole logit row a fixture pins: all of them for short prompts, otherwise
    `count` spread evenly from the first to the last."""
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def f32_base64(array):
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def f32_text(x):
    """A float32 value as JSON's shortest decimal that reads back to it (9 significant digits)."""
    return float(f"{x:.9g}")


def write_fixture(args, config_json, ids, logits, trace, causality, ties, seconds):
    full = logits.double()
    rows = full_row_positions(len(ids), args.full_rows)
    positions = []
    for t in range(len(ids)):
        top = torch.topk(full[t], args.top).indices.tolist()
        positions.append({
            "argmax": int(torch.argmax(full[t])),
            "logsumexp": float(torch.logsumexp(full[t], 0)),
            "top_ids": top,
            "top_logits": [f32_text(float(logits[t][i])) for i in top],
        })
    fixture = {
        "oracle": "transformers DeepseekV4ForCausalLM (modeling_deepseek_v4.py @ 019760818965, "
                  "ported to torch on CPU: tools/oracle/dsv4_ref.py), uncached full forward, fp32 eager",
        "torch_version": torch.__version__,
        "made_by": "tools/oracle/reference.py --fixture",
        "reference_seconds": round(seconds, 1),
        "dserve_model": {"preset": args.preset, "seed": args.model_seed, "layout": "transformers",
                         "dtype": "f32"},
        "model_config": config_json,
        "token_ids": ids,
        "indexer_topk": {"tie_rule": args.tie_rule, "tie_rule_meaning": TIE_RULES[args.tie_rule],
                         "straddling_tie_rows": sum(ties.values()),
                         "straddling_tie_rows_per_layer": {str(k): v for k, v in sorted(ties.items())}},
        "reference_prefix_causality": causality,
        "max_abs_logit": float(full.abs().max()),
        "positions": positions,
        # The reference's final normed hidden state (lm_head's input) at these positions: with
        # the checkpoint's lm_head it gives the reference's whole row, every vocab entry.
        "final_hidden": {"positions": rows, "hidden_size": int(trace["final_norm"].shape[-1]),
                         "f32_le_base64": f32_base64(trace["final_norm"][rows])},
    }
    with open(args.fixture, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.fixture}: {len(ids)} positions, {len(rows)} whole rows, "
          f"prefix causality {causality['max_abs_diff']:.3g}, straddling ties {sum(ties.values())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--tie-rule", choices=sorted(TIE_RULES), default="torch")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--fixture", default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--model-seed", type=int, default=None)
    ap.add_argument("--full-rows", type=int, default=16, help="whole rows a fixture pins")
    ap.add_argument("--top", type=int, default=16, help="top logits a fixture keeps per position")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.fixture and (args.preset is None or args.model_seed is None):
        ap.error("--fixture needs --preset and --model-seed (how `dserve model init` wrote --model)")
    torch.set_num_threads(args.threads)

    ids = read_ids(args.ids)
    topk = IndexerTopk(args.tie_rule)
    start = time.time()
    model, config = dsv4_ref.load_model(args.model)
    print(f"reference: loaded {args.model} ({config.num_hidden_layers} layers) in "
          f"{time.time() - start:.1f} s", flush=True)

    trace = {} if (args.trace or args.fixture) else None
    start = time.time()
    logits = forward(model, ids, trace)
    seconds = time.time() - start
    ties = dict(topk.straddling)
    print(f"reference: forward over {len(ids)} ids in {seconds:.1f} s; rows with an exact indexer "
          f"tie straddling rank k: {sum(ties.values())} {ties or ''} (tie rule: {args.tie_rule})",
          flush=True)

    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        trace["logits"] = logits.numpy()
        for name, value in trace.items():
            np.save(os.path.join(args.trace, f"{name}.npy"), value.astype(np.float32))
        print(f"reference: wrote {len(trace)} stages to {args.trace}")

    if args.fixture:
        # The reference must itself be causal here, or its logits say nothing about ours:
        # the first half of the prompt alone must give the first half of the rows.
        half = len(ids) // 2
        topk.reset()
        prefix = forward(model, ids[:half])
        diff = float((prefix.double() - logits[:half].double()).abs().max())
        causality = {"prefix": half, "max_abs_diff": diff}
        config_json = json.load(open(os.path.join(args.model, "config.json")))
        write_fixture(args, config_json, ids, logits, trace, causality, ties, seconds)


if __name__ == "__main__":
    main()
