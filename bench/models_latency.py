"""Generation latency of several model folders side by side, in one process, their calls interleaved.

    python bench/models_latency.py --model shipped= --model z16=candidates/z16 [--preset base] [--repeats 7]

`NAME=` (empty path) is the built-in model; `NAME=DIR,PRESET[:SAMPLER[:EULER_STEPS]]` gives that row its own
preset (and sampler, and for flow_stochastic its first Euler steps), e.g. `--model s4=,4step --model
e4=,4step:flow_euler --model k0=,4step:flow_stochastic:0 --model base=,base`. Each round times one call of
every model, in turn, at batch 1 and at batch 8 (cold prompt cache, as bench/builtin_model.py does), so drift of
the machine reaches every model alike; the median over rounds is printed. For comparing a candidate built-in model
with the shipped one, which bench/builtin_model.py times only one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builtin_model import PROMPT  # noqa: E402
from distill_builtin import preset_row  # noqa: E402


def main() -> None:
    from lightbooth import Generator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gens, kwargs = {}, {}
    for spec in args.model:
        name, _, rest = spec.partition("=")
        path, _, row = rest.partition(",")
        kwargs[name] = preset_row(row or args.preset)[2]
        gens[name] = Generator.load(path or None, device="cpu", preset=kwargs[name].pop("preset"))
    times = {(name, b): [] for name in gens for b in (1, 8)}
    for r in range(args.repeats + 1):  # round 0 warms up
        for b in (1, 8):
            for name, gen in gens.items():
                gen._cache.clear()
                t = time.perf_counter()
                gen([PROMPT], seed=0, num_images=b, **kwargs[name])
                if r:
                    times[name, b].append(time.perf_counter() - t)
    print(f"{args.threads} threads, torch {torch.__version__}, preset {args.preset}, median of {args.repeats} rounds")
    print("| model | batch 1 | batch 8 |\n|---|---|---|")
    for name in gens:
        print(f"| {name} | {statistics.median(times[name, 1]):.3f} s | {statistics.median(times[name, 8]):.3f} s |")


if __name__ == "__main__":
    main()
