"""What the CPU trace costs: the first, second and third generation call of a freshly loaded model.

    python bench/cpu_first_calls.py --family sd --loads 5

lightbooth runs a shape eagerly in its first sampling run, traces it in the second (a one-time cost) and replays
the trace from then on (accel/trace.py). bench/cpu_generate.py measures the steady state after one warm-up call;
this measures the calls before it, for lightbooth (default, and `fast=False`, which never traces) and the stock
pipeline, each freshly loaded `--loads` times from the same folder. Medians per call index, seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("cpu_generate", Path(__file__).with_name("cpu_generate.py"))
cg = importlib.util.module_from_spec(_spec)
sys.modules["cpu_generate"] = cg  # its dataclasses look their module up
_spec.loader.exec_module(cg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["qwen-image", "sd"], default="sd")
    p.add_argument("--size", choices=sorted(cg.SIZES), default="tiny")
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightbooth.families.base import quiet_libraries
    from lightbooth.generate import Generator
    from lightbooth.tiny import build_tiny_model

    quiet_libraries()
    case = next(c for c in cg.CASES if c.family == args.family)
    spec = cg.SIZES[args.size][args.family]
    times = {"lightbooth": [], "lightbooth fast=False": [], "stock": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(args.family, Path(tmp) / args.family, **spec["build"])
        for _ in range(args.loads):
            for name in times:
                if name == "stock":
                    # the stock Qwen pipeline needs lightbooth's prefix length; SD needs nothing from lightbooth
                    ref = Generator.load(path, device="cpu", fast=False) if args.family == "qwen-image" else None
                    pipe = cg.load_stock(args.family, path, ref)
                    pipe.scheduler = cg.stock_scheduler(pipe, case, pipe.scheduler)
                    fn = lambda: cg.run_stock(pipe, case, "seeds", args.batch, spec["px"])  # noqa: E731
                else:
                    gen = Generator.load(path, device="cpu", fast=name == "lightbooth")
                    fn = lambda: cg.run_lightbooth(gen, case, "seeds", args.batch, spec["px"], True)  # noqa: E731
                row = []
                for _ in range(args.calls):
                    t = time.perf_counter()
                    fn()
                    row.append(time.perf_counter() - t)
                times[name].append(row)
    print(f"# {args.family}/{case.name}, size {args.size}, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.loads} fresh loads, seconds per call")
    print("| implementation | " + " | ".join(f"call {i + 1}" for i in range(args.calls)) + " |")
    print("|---|" + "---:|" * args.calls)
    for name, rows in times.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[i] for r in rows):.4f}"
                                           for i in range(args.calls)) + " |")


if __name__ == "__main__":
    main()
