"""The trainer rows of the GPU benchmark (bench/gpu.py): `lightbooth dreambooth`'s own step, not a bench loop.

The trainer's functions run as `train_dreambooth` runs them after caching: `prepare_denoiser` (fp8, the LoRA,
compiling) and `fit` (Lightning, bf16-mixed, cached latents and prompt encodings, checkpoints, its sampler and
loss), on the full-size random components the other sections built. A callback times every step (device
synchronized) and reads the peak memory from the third step on, of training alone and of the whole run (with the
final validation image); the first steps (compiling) are reported apart.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_measure import GiB, free, rel_err, sync, trace_peak, trace_start


def trainer_steps(ctx, family, cond, px: int, steps: int, **settings) -> dict:
    """Run the DreamBooth trainer for `steps` steps on random latents; `settings`: DreamBoothConfig fields."""
    import lightning as L

    from lightbooth.config import load_config
    from lightbooth.families.base import Cond
    from lightbooth.lora import from_peft_model
    from lightbooth.training.dreambooth import DreamBoothConfig, fit, prepare_denoiser
    from lightbooth.training.dreambooth_module import CachedData

    dev = ctx.dev
    g = torch.Generator().manual_seed(0)  # every row trains on the same data, whatever ran before
    with torch.inference_mode():  # latents of the training size, as cache_data makes them
        z = family.encode_images((torch.rand(1, 3, px, px, generator=g) * 2 - 1).to(dev))[0].float().cpu()
    lat = [torch.randn(z.shape, generator=g) * z.std() for _ in range(8)]
    cpu_cond = Cond(cond.embeds.float().cpu(), None)
    data = CachedData(lat[:4], ["a qzx star"] * 4, lat[4:], "a star", {"a qzx star": cpu_cond, "a star": cpu_cond})
    times, peak = [], {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(dev)
            if batch_idx == 2 and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                peak["before_gib"] = torch.cuda.memory_allocated() / GiB
                if ctx.memory_trace:
                    trace_start(dev)
            self.t0 = time.perf_counter()

        def on_before_backward(self, trainer, pl_module, loss):  # where the peak happens: forward or backward
            if pl_module.global_step == 2 and dev.type == "cuda":
                peak["forward_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
                peak["held_for_backward_gib"] = torch.cuda.memory_allocated() / GiB

        def on_after_backward(self, trainer, pl_module):
            if pl_module.global_step == 2 and dev.type == "cuda":
                peak["backward_peak_gib"] = torch.cuda.max_memory_allocated() / GiB

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(dev)
            times.append(time.perf_counter() - self.t0)
            if batch_idx == 2 and ctx.memory_trace:
                peak["trace"] = trace_peak(dev)
            if dev.type == "cuda":  # training alone; the run's peak below includes the final validation image
                peak["train_gib"] = torch.cuda.max_memory_allocated() / GiB

    with tempfile.TemporaryDirectory() as run:
        cfg = load_config(DreamBoothConfig, None, dict(
            instance_dir="unused", class_noun="star", out=run, steps=steps, checkpoint_every=10**6,
            validation_prompt=[""], logger="none", seed=0, **settings))
        t0 = time.time()
        prepare_denoiser(cfg, family)
        fit(cfg, family, data, Path(run), None, [Timer()])
        total = time.time() - t0
    # the up factors start at zero: they are what the steps learnt
    trained = {k: v.up.float().cpu() for k, v in from_peft_model(family.denoiser_name, family.denoiser).items()}
    out = {"steps": len(times), "first_two_steps_s": sum(times[:2]), "step_s": statistics.median(times[2:]),
           "total_s": total, "_lora_up": trained, **{k: v for k, v in settings.items() if not isinstance(v, list)}}
    if dev.type == "cuda":
        out["mem_before_gib"], out["train_peak_gib"] = peak.get("before_gib"), peak.get("train_gib")
        out["run_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        out.update({k: v for k, v in peak.items() if k.endswith("ward_gib") or k.endswith("ward_peak_gib")})
        if peak.get("trace"):
            out["memory_trace"] = peak["trace"]
    free(dev)
    return out


def sd_trainer(ctx, comps, emb: torch.Tensor, res: dict) -> None:
    """SD 1.5 LoRA r4 at 512, instance + class image per step (the stock row's batch 2): eager, then compiled."""
    import copy

    from gpu_measure import ROOT

    from lightbooth.families.base import Cond
    from lightbooth.families.sd import SDFamily

    px = 512 if not ctx.tiny else 32
    rows = (("trainer_eager", {}), ("trainer_graphs", {"cuda_graphs": True}), ("trainer_compiled", {"compile": True}))
    for label, extra in rows:
        if (extra.get("compile") and not ctx.compile) or ctx.over_budget(120 if extra.get("compile") else 40):
            continue
        dt = torch.bfloat16 if ctx.dev.type == "cuda" else torch.float32  # what the trainer loads
        fam = SDFamily({k: copy.deepcopy(v).to(dt) if isinstance(v, torch.nn.Module) else v
                        for k, v in comps.items()}, ROOT, ctx.dev, dt)
        try:
            res[label] = trainer_steps(ctx, fam, Cond(emb[:1]), px, steps=10, rank=4, prior=True, **extra)
        except Exception as e:  # one row failing must not cost the others
            res[label] = {"error": f"{type(e).__name__}: {e}"[:400]}
            continue
        finally:
            del fam
            free(ctx.dev)
        if "stock_s" in res:
            res[label]["vs_stock"] = res[label]["step_s"] / res["stock_s"]
        lora = res[label].pop("_lora_up")
        if label == "trainer_eager":
            eager_lora = lora
        elif "trainer_eager" in res:  # same seed, same batches and noise: the same learnt factors
            res[label]["lora_up_rel_err_vs_eager"] = rel_err(torch.cat([lora[k].flatten() for k in eager_lora]),
                                                             torch.cat([v.flatten() for v in eager_lora.values()]))
