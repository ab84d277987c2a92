"""Pick a model's default sampling settings by measurement: `lightbooth eval` scores over a grid of shift x CFG.

    python bench/settings_sweep.py --model RUN/model --n 8 --shifts 1,2,3 --guidance 2,4,6 --steps 20

Each cell is the mean strict accuracy over every scene kind and language (the same prompts, seeds and detector as
`lightbooth eval`), followed by the single / pair / count means and the variety of "a circle" (colours/cells).
The shift replaces the model's fixed scheduler shift for the run (a preset's `shift`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch


def main() -> int:
    from lightbooth import Generator
    from lightbooth.eval.quality import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--shifts", default="1,2,3")
    ap.add_argument("--guidance", default="2,4,6")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = Generator.load(args.model, device="cpu", preset="base")
    gen.family.presets = dict(gen.family.presets)  # an own copy: the sweep edits it
    base = gen.family.presets["base"]
    print(f"model {args.model or 'built-in'}, {args.steps} steps, n {args.n} per kind and language")
    print("| shift | CFG | mean | single | pair | count | variety |")
    print("|---|---|---|---|---|---|---|")
    for shift in [float(v) for v in args.shifts.split(",")]:
        for g in [float(v) for v in args.guidance.split(",")]:
            gen.family.presets["base"] = replace(base, shift=shift, guidance=g, steps=args.steps)
            rep = evaluate(gen, n=args.n)
            acc = rep.accuracy
            kinds = {k: np.mean([v for key, v in acc.items() if key.startswith(k)]) for k in ("single", "pair", "count")}
            print(f"| {shift:g} | {g:g} | {np.mean(list(acc.values())):.1%} | {kinds['single']:.1%} | "
                  f"{kinds['pair']:.1%} | {kinds['count']:.1%} | {rep.variety['colors']}/8, {rep.variety['cells']}/9 |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
