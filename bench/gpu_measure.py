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


def trace_start(dev: torch.device) -> None:
    """Record every CUDA allocation with its Python stack, for `trace_peak` (nothing off CUDA)."""
    if dev.type == "cuda":
        torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)


# frames of these files name where an allocation was made (the innermost one of them wins)
_OURS = ("lightbooth", "diffusers", "peft", "lightning", "torchinductor", "bench/gpu", "torch/utils/checkpoint",
         "torch/optim", "torch/autograd")


def trace_peak(dev: torch.device, top: int = 14) -> dict | None:
    """Stop recording and replay the trace: at the moment of the highest allocation since `trace_start`, what
    was live, summed by the innermost frame of our or a library's code that made it (GiB, count). Allocations
    with no Python frame come from the autograd engine's thread (eager backward)."""
    if dev.type != "cuda":
        return None
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    return live_at_peak(events, top)


def live_at_peak(events: list[dict], top: int = 14) -> dict:
    """`trace_peak`'s replay of allocator events (dicts with action, addr, size, frames)."""
    live, cur, peak, at = {}, 0, 0, -1
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            cur += ev["size"]
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            cur -= live.pop(ev["addr"])
        if cur > peak:
            peak, at = cur, i
    live = {}
    for ev in events[:at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] in ("free_requested", "free_completed"):
            live.pop(ev["addr"], None)
    groups: dict[str, list] = {}
    for ev in live.values():
        frames = ev.get("frames") or []
        mine = next((f for f in frames if any(s in f["filename"] for s in _OURS)), None)
        if not frames:
            key = "(no Python frame: autograd engine)"
        elif mine is None or mine is frames[0]:
            key = _short(frames[0])
        else:  # our call, then the library function that allocated
            key = f"{_short(mine)} <- {_short(frames[0])}"
        g = groups.setdefault(key, [0, 0])
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"events": len(events), "peak_above_start_gib": peak / GiB,
            "live_at_peak": [{"where": k, "gib": round(v[0] / GiB, 4), "count": v[1]} for k, v in rows]}


def _short(frame: dict) -> str:
    parts = frame["filename"].split("/")
    return f"{'/'.join(parts[-2:])}:{frame['line']} {frame['name']}"


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
