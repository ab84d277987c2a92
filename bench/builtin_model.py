"""Built-in model: generation latency at its default settings and prompt-adherence scores (lightbooth eval).

    python bench/builtin_model.py [--model DIR] [--n 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPT = "a large red circle in the center, white background"


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from lightbooth import Generator
    from lightbooth.eval.quality import evaluate

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default=None, help="default: the model's default preset (base: the plain teacher)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = Generator.load(args.model, device="cpu", preset=args.preset)
    s = gen.settings()
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"preset {s.preset_name}: {s.preset.steps} steps, guidance {s.preset.guidance}, {s.width}x{s.height}")
    for b in (1, 8):
        def call():
            gen._cache.clear()  # cold: prompt encoding is part of the time
            gen([PROMPT], seed=0, num_images=b)
        print(f"batch {b}: {time_call(call, args.repeats):.3f} s per call")
    rep = evaluate(gen, n=args.n)
    print("\n".join(rep.lines()))


if __name__ == "__main__":
    main()
