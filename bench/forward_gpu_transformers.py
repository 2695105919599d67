#!/usr/bin/env python3
"""The forward_gpu points in transformers' DeepseekV4ForCausalLM on the same GPU.

Same config (the config.json `forward_gpu --config-out DIR` writes: V4-Flash widths, the same
layer count), bf16, weights drawn by torch (speed does not depend on their values beyond the
routing spread: the hash layers' tid2eid tables, which transformers initialises to zeros, are
drawn uniformly as forward_gpu draws them). Prefill is the uncached full forward;
decode is one cached step after a prefill of the context. Points whose cache would not fit, or
whose prefill would take longer than --max-prefill-tokens, are reported as skipped with the
reason. Prints one JSON line per point, comparable with `forward_gpu --json`.

  python3 bench/forward_gpu_transformers.py --config DIR [--prefill 4096,32768]
      [--batches 1,16,64,256] [--contexts 4096,65536] [--steps 8]
"""

import argparse
import json
import sys
import time

import torch
import transformers


def ints(text):
    return [int(v) for v in text.split(",") if v]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="directory holding config.json")
    parser.add_argument("--prefill", default="4096,32768")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--contexts", default="4096,65536")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-prefill-tokens", type=int, default=1 << 20,
                        help="skip decode points whose batch x context exceeds this")
    args = parser.parse_args()

    config = transformers.AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.DeepseekV4ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.eval()
    # Hash-routed layers: every token to expert 0 with the zero table; draw it instead.
    with torch.no_grad():
        tables = [t for name, t in [*model.named_buffers(), *model.named_parameters()]
                  if name.endswith("tid2eid")]
        for table in tables:
            table.copy_(torch.randint(0, config.n_routed_experts, table.shape,
                                      device=table.device, dtype=table.dtype))
    print(json.dumps({"device": torch.cuda.get_device_name(), "transformers":
                      transformers.__version__, "torch": torch.__version__,
                      "layers": config.num_hidden_layers, "hash_tables_drawn": len(tables)}),
          flush=True)
    vocab = config.vocab_size

    with torch.no_grad():
        for length in ints(args.prefill):
            ids = torch.randint(0, vocab, (1, length), device="cuda")
            try:
                _, seconds = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
                print(json.dumps({"kind": "prefill", "tokens": length, "seconds": seconds,
                                  "tokens_per_second": length / seconds}), flush=True)
            except torch.cuda.OutOfMemoryError as err:
                print(json.dumps({"kind": "prefill", "tokens": length, "skipped":
                                  f"out of memory: {str(err).splitlines()[0]}"}), flush=True)
            torch.cuda.empty_cache()

        for ctx in ints(args.contexts):
            for batch in ints(args.batches):
                if batch * ctx > args.max_prefill_tokens:
                    print(json.dumps({"kind": "decode", "context": ctx, "batch": batch,
                                      "skipped": f"batch x context {batch * ctx} is over "
                                                 f"--max-prefill-tokens {args.max_prefill_tokens}"}),
                          flush=True)
                    continue
                out = cache = step_ids = None
                try:
                    ids = torch.randint(0, vocab, (batch, ctx), device="cuda")
                    out = model(ids, use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                    step_ids = out.logits[:, -1].argmax(-1, keepdim=True)

                    def steps():
                        nonlocal cache, step_ids
                        for _ in range(args.steps):
                            o = model(step_ids, past_key_values=cache, use_cache=True)
                            cache = o.past_key_values
                            step_ids = o.logits[:, -1].argmax(-1, keepdim=True)

                    _, seconds = timed(steps)
                    step = seconds / args.steps
                    print(json.dumps({"kind": "decode", "context": ctx, "batch": batch,
                                      "step_seconds": step, "tokens_per_second": batch / step}),
                          flush=True)
                except torch.cuda.OutOfMemoryError as err:
                    print(json.dumps({"kind": "decode", "context": ctx, "batch": batch,
                                      "skipped": f"out of memory: {str(err).splitlines()[0]}"}),
                          flush=True)
                finally:
                    # The output holds the cache too: drop every reference before the next
                    # point's prefill.
                    ids = out = cache = step_ids = None
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
