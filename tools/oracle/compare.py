#!/usr/bin/python3
"""Compares two forward traces stage by stage: ours (`dserve model trace --out OURS`) against the
reference's (`tools/oracle/reference.py --trace REF`), on the same checkpoint and ids.

usage: compare.py OURS REF [--tolerance 1e-4]
Prints, per stage (embed, layer0.., hc_head, final_norm, logits), the largest |difference| and
where it first exceeds the tolerance, so a failing comparison names the first layer that differs.
Exit status 1 when the logits differ by more than --tolerance times the reference's largest
|logit| anywhere, or when an argmax differs at a position whose reference top-2 gap is larger
than that bound (closer than that, either answer is right within fp32 summation order).
"""
import argparse
import os
import sys

import numpy as np


def stage_names(directory):
    layers = sorted((f[:-4] for f in os.listdir(directory) if f.startswith("layer") and f.endswith(".npy")),
                    key=lambda s: int(s[5:]))
    return ["embed"] + layers + ["hc_head", "final_norm", "logits"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours")
    ap.add_argument("ref")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    ok = True
    for name in stage_names(args.ref):
        paths = [os.path.join(d, f"{name}.npy") for d in (args.ours, args.ref)]
        if not all(os.path.exists(p) for p in paths):
            print(f"{name:>11}: missing in {' and '.join(p for p in paths if not os.path.exists(p))}")
            ok = False
            continue
        ours, ref = (np.load(p).astype(np.float64) for p in paths)
        if ours.shape != ref.shape:
            print(f"{name:>11}: shapes differ, ours {ours.shape} reference {ref.shape}")
            ok = False
            continue
        scale = max(float(np.abs(ref).max()), 1e-30)
        diff = np.abs(ours - ref).reshape(ref.shape[0], -1).max(axis=1)  # per position
        bad = np.nonzero(diff > args.tolerance * scale)[0]
        first = f"first position over {args.tolerance:g} x max: {int(bad[0])}" if len(bad) else "within"
        print(f"{name:>11}: max |diff| {diff.max():.3g} (position {int(diff.argmax())}), max |ref| {scale:.3g}, "
              f"relative {diff.max() / scale:.3g}; {first}")
        if name != "logits":
            continue
        bound = args.tolerance * scale
        if len(bad):
            ok = False
        ranked = np.sort(ref, axis=1)
        gaps = ranked[:, -1] - ranked[:, -2]
        differ = np.nonzero(ours.argmax(1) != ref.argmax(1))[0]
        near = [t for t in differ if gaps[t] <= bound]
        far = [t for t in differ if gaps[t] > bound]
        print(f"     argmax: {ref.shape[0] - len(differ)}/{ref.shape[0]} positions agree"
              + (f"; {len(near)} differ where the reference's top two are within {bound:.3g}" if near else ""))
        for t in far[:10]:
            print(f"       position {t}: ours {int(ours[t].argmax())}, reference {int(ref[t].argmax())}, "
                  f"reference top-2 gap {gaps[t]:.3g}")
        if far:
            ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
