"""CPU generation benchmark: lightbooth's Generator against the stock diffusers pipeline on the same weights.

    python bench/cpu_generate.py --family all --batch-sizes 1,2,4,8 --repeats 9 --out bench_results.json

Builds tiny random models (lightbooth.tiny) into a temporary folder, loads that folder both as a lightbooth
`Generator` and as the stock `QwenImagePipeline` / `StableDiffusionPipeline`, and times end-to-end generation
(prompt encoding, sampling, VAE decode, conversion to PIL) at each batch size. lightbooth and stock calls are
interleaved (alternating which goes first) so drift on a shared machine hits both; each is warmed up first;
the median of `--repeats` timed calls is reported. Both get the same prompts, per-image seeds, steps, guidance
and size, and their images are compared (max abs difference in 0..255 levels) so a fast path that computes
something else shows up.

lightbooth caches prompt encodings per Generator; the stock pipeline does not. "cold" clears that cache before
every timed call (the fair comparison, the default); "warm" keeps it (what repeated generation with the same
prompt costs in lightbooth) and is labelled as such.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "a large red circle on the left, white background",
    "a blue square to the left of a yellow star",
    "three green triangles on a black background",
    "白色背景上，左边有一个大的红色圆形",
    "蓝色正方形在黄色五角星的左边",
    "黑色背景上有三个绿色三角形",
    "a yellow star above a green square",
    "a white circle on a blue background",
]

# Model sizes. "tiny" is the test suite's model (overhead-dominated: it measures per-call and per-step cost);
# "small" is wider and deeper with larger images, still CPU-friendly, so the networks' arithmetic weighs more.
SIZES = {
    "tiny": {"qwen-image": dict(build={}, px=64), "sd": dict(build={}, px=16)},
    "small": {"qwen-image": dict(build=dict(hidden=128, layers=4), px=128),
              "sd": dict(build=dict(block_out_channels=(64, 128), sample_size=16), px=64)},
}


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    steps: int
    guidance: float
    negative: str | None = None
    preset: str | None = None  # lightbooth preset
    lightning: bool = False  # stock: fixed shift 3 through the dynamic-shift scheduler, true CFG 1


CASES = [
    Case("qwen-image", "true-cfg", steps=20, guidance=4.0, negative=" "),
    Case("qwen-image", "lightning", steps=8, guidance=1.0, preset="lightning", lightning=True),
    Case("sd", "cfg-ddim", steps=20, guidance=7.5),
]


@dataclass
class Row:
    family: str
    case: str
    size: str
    prompts: str
    cache: str
    batch: int
    lightbooth_s: list = field(default_factory=list)  # seconds per call
    stock_s: list = field(default_factory=list)
    max_abs_diff: int = -1

    def summary(self) -> dict:
        """Medians per call -> per image; `ratio` = lightbooth img/s over stock img/s (of medians), `best_ratio`
        the same of the fastest calls (less sensitive to other load on a shared machine)."""
        lb, st = statistics.median(self.lightbooth_s), statistics.median(self.stock_s)
        return dict(lightbooth_s_per_img=lb / self.batch, lightbooth_img_per_s=self.batch / lb,
                    stock_s_per_img=st / self.batch, stock_img_per_s=self.batch / st, ratio=st / lb,
                    best_ratio=min(self.stock_s) / min(self.lightbooth_s))


# --- the two implementations ---------------------------------------------------------------------------------
def load_stock(family: str, path: Path, gen):
    from diffusers import QwenImagePipeline, StableDiffusionPipeline

    if family == "qwen-image":
        pipe = QwenImagePipeline.from_pretrained(path)
        pipe.prompt_template_encode_start_idx = gen.family.prefix_len
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_scheduler(pipe, case: Case, base_scheduler):
    """The scheduler the stock pipeline runs `case` with (Lightning: shift 3 as mu = log 3, no terminal stretch)."""
    if not case.lightning:
        return base_scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(
        base_scheduler.config, base_shift=math.log(3), max_shift=math.log(3), use_dynamic_shifting=True,
        shift_terminal=None)


def inputs(mode: str, batch: int) -> tuple[list[str], list[int]]:
    """(prompt per image, seed per image): one prompt x `batch` seeds, or `batch` prompts at one seed."""
    if mode == "seeds":
        return [PROMPTS[0]] * batch, [1000 + i for i in range(batch)]
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)], [1000] * batch


def run_lightbooth(gen, case: Case, mode: str, batch: int, px: int, cold: bool):
    prompts, seeds = inputs(mode, batch)
    if cold:
        gen._cache.clear()
    kw = dict(negative_prompt=case.negative, steps=case.steps, guidance=case.guidance, width=px, height=px,
              preset=case.preset)
    if mode == "seeds":
        return gen(prompts[0], seed=seeds, **kw)
    return gen(prompts, seed=seeds[0], **kw)


def run_stock(pipe, case: Case, mode: str, batch: int, px: int):
    prompts, seeds = inputs(mode, batch)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kw = dict(num_inference_steps=case.steps, height=px, width=px, generator=gens, output_type="pil")
    if mode == "seeds":
        kw.update(prompt=prompts[0], num_images_per_prompt=batch)
    else:
        kw.update(prompt=prompts)
    if case.family == "qwen-image":
        kw.update(true_cfg_scale=case.guidance, negative_prompt=case.negative)
    else:
        kw.update(guidance_scale=case.guidance, negative_prompt=case.negative)
    return pipe(**kw).images


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --- the benchmark ---------------------------------------------------------------------------------------------
def bench_case(gen, pipe, case: Case, args, px: int, cache: str) -> list[Row]:
    base = pipe.scheduler
    pipe.scheduler = stock_scheduler(pipe, case, base)
    rows = []
    try:
        for b in args.batch_sizes:
            row = Row(case.family, case.name, args.size, args.prompts, cache, b)
            lb = lambda: run_lightbooth(gen, case, args.prompts, b, px, cache == "cold")  # noqa: E731
            st = lambda: run_stock(pipe, case, args.prompts, b, px)  # noqa: E731
            (t_lb, ours), (t_st, ref) = timed(lb), timed(st)  # warm-up, and the agreement check
            row.max_abs_diff = int(np.abs(pixels(ours) - pixels(ref)).max())
            # short calls get more repeats (up to --min-time seconds each), so a median is not a handful of
            # timeslices on a shared machine
            repeats = min(max(args.repeats, math.ceil(args.min_time / max(t_lb, t_st, 1e-3))), 50)
            for r in range(repeats):
                pair = (lb, st) if r % 2 == 0 else (st, lb)  # alternate who goes first
                for fn in pair:
                    (row.lightbooth_s if fn is lb else row.stock_s).append(timed(fn)[0])
            rows.append(row)
            print_row(row)
    finally:
        pipe.scheduler = base
    return rows


def print_header():
    print(f"| {'family/case':<22} | {'cache':<5} | {'batch':>5} | {'lb s/img':>8} | {'lb img/s':>8} | "
          f"{'stock img/s':>11} | {'ratio':>6} | {'best':>6} | {'maxdiff':>7} |", flush=True)
    print("|" + "|".join(["-" * 24, "-" * 7, "-" * 6 + ":", "-" * 9 + ":", "-" * 9 + ":", "-" * 12 + ":",
                          "-" * 7 + ":", "-" * 7 + ":", "-" * 8 + ":"]) + "|", flush=True)


def print_row(row: Row):
    s = row.summary()
    name = f"{row.family}/{row.case}"
    print(f"| {name:<22} | {row.cache:<5} | {row.batch:>5} | {s['lightbooth_s_per_img']:>8.4f} | "
          f"{s['lightbooth_img_per_s']:>8.2f} | {s['stock_img_per_s']:>11.2f} | {s['ratio']:>5.2f}x | "
          f"{s['best_ratio']:>5.2f}x | {row.max_abs_diff:>7} |", flush=True)


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import diffusers
    import transformers

    return dict(cpu=model, threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                date=time.strftime("%Y-%m-%d"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["qwen-image", "sd", "all"], default="all")
    p.add_argument("--batch-sizes", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per implementation and batch size (at least)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="repeat short calls until about this many seconds per implementation (at most 50 calls)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--prompts", choices=["seeds", "prompts"], default="seeds",
                   help="seeds: one prompt x B seeds (num_images_per_prompt); prompts: B different prompts, one seed")
    p.add_argument("--cache", choices=["cold", "warm", "both"], default="cold",
                   help="lightbooth's prompt-encoding cache: cleared before every call (cold), kept (warm), or both")
    p.add_argument("--cases", default=None, help="comma-separated case names to run (default: all of the family)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both (default 1: on a small shared machine, 2 threads stall for "
                        "seconds whenever another process takes a core)")
    p.add_argument("--out", default=None, help="write the raw timings and summary as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightbooth.families.base import quiet_libraries
    from lightbooth.generate import Generator
    from lightbooth.tiny import build_tiny_model

    quiet_libraries()

    families = ["qwen-image", "sd"] if args.family == "all" else [args.family]
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    info = machine()
    print(f"# {info['cpu']}, {info['threads']} threads, torch {info['torch']}, diffusers {info['diffusers']}, "
          f"size {args.size}, prompts {args.prompts}, repeats {args.repeats}", flush=True)
    print_header()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            spec = SIZES[args.size][fam]
            path = build_tiny_model(fam, Path(tmp) / fam, **spec["build"])
            gen = Generator.load(path, device="cpu")
            pipe = load_stock(fam, path, gen)
            for case in CASES:
                if case.family != fam or (args.cases and case.name not in args.cases.split(",")):
                    continue
                for cache in caches:
                    rows += bench_case(gen, pipe, case, args, spec["px"], cache)
    if args.out:
        result = dict(machine=info, command=" ".join([Path(sys.executable).name] + sys.argv), args=vars(args),
                      rows=[{**asdict(r), **r.summary()} for r in rows])
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return rows


if __name__ == "__main__":
    main()
