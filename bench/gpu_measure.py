"""Measuring helpers of the GPU benchmark (bench/gpu.py): timing, peak memory, FLOPs, errors, random builds."""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GiB = 2**30

# --- measuring -----------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` after `warmup` calls (device synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory(fn, dev: torch.device) -> tuple[float, float]:
    """(GiB allocated before, peak GiB during) one call of `fn`; zeros off CUDA."""
    if dev.type != "cuda":
        fn()
        return 0.0, 0.0
    sync(dev)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return before / GiB, torch.cuda.max_memory_allocated() / GiB


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def profile(fn, ctx, name: str) -> None:
    """OUT/profile-NAME.txt: the 25 most expensive kernels / ops of one call (where the time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.dev.type == "cuda" else [])
    with prof(activities=acts) as p:
        fn()
        sync(ctx.dev)
    key = "cuda_time_total" if ctx.dev.type == "cuda" else "cpu_time_total"
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"profile-{name}.txt").write_text(p.key_averages().table(sort_by=key, row_limit=25))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().flatten(), ref.double().flatten()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cls, dev: torch.device, dtype: torch.dtype, seed: int = 0, **config):
    """A diffusers / transformers module with random weights, initialized directly on `dev` in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(dev), default_dtype(dtype):
        return cls(**config).eval().requires_grad_(False)
