"""GPU benchmark: lightbooth against stock diffusers, side by side in one process, same inputs, same card.

    python bench/gpu.py --out results/            # full-size architectures, random weights, on the GPU
    python bench/gpu.py --tiny --out results/     # tiny configs on the CPU (the test suite runs this)

Components are built with random weights directly on the device (speed and memory do not depend on weight values).
Every lightbooth number comes with the relative error of its output against the stock result, so a fast path
that computes something else cannot pass; FLOPs are counted with torch's FlopCounterMode on the real modules and
turned into the fraction of the matrix-product ceiling measured on the same card at the start of the run.

Sections (in this order, each guarded so a failure or the time budget skips it and the run goes on):
  ceilings      bf16 and fp8 8192^3 matrix products, device copy bandwidth
  sd            SD 1.5 512x512, 50 DDIM steps, CFG 7.5, batch 1 and 8: stock pipeline vs lightbooth Generator
                (fp16, channels-last, fused QKV, CUDA graph per step), per step and end to end
  sd-train      SD 1.5 DreamBooth LoRA r4 step, batch 2 (instance + class), as diffusers' example does it
                (fp16 autocast + GradScaler, VAE and text encoder every step) vs lightbooth (cached latents and
                embeddings, bf16, fused AdamW, the whole step replayed as one CUDA graph): time and peak memory
  qwen          Qwen-Image 1024x1024, Lightning 8 steps and 50 steps CFG 4: stock pipeline vs lightbooth in bf16
                and with fp8 transformer weights (prompt embeddings given to both: text encoding is the same
                transformers module in both and lightbooth caches it)
  qwen-train    Qwen-Image LoRA r16 step at 1024x1024, batch 1, gradient checkpointing: bf16 (stock) vs lightbooth
                with fp8-stored frozen weights; time and peak memory
  sd-compile    optional, last: the SD UNet through torch.compile under the same CUDA graph (compile takes ~1 min)
Results: OUT/gpu.json (everything) and OUT/gpu.md (the tables), written after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lightbooth.accel.fp8 import to_fp8  # noqa: E402
from lightbooth.accel.graphs import GraphedTrainStep  # noqa: E402
from lightbooth.families.base import Cond, Preset  # noqa: E402

GiB = 2**30
T0 = time.time()


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
    import gc

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


# --- sections ------------------------------------------------------------------------------------------------
def ceilings(ctx) -> dict:
    dev, n = ctx.dev, (8192 if not ctx.tiny else 256)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, dev, repeats=10, warmup=3)
    res = {"bf16_matmul_tflops": 2 * n**3 / t / 1e12, "n": n}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t8 = timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), dev,
               repeats=10, warmup=3)
    res["fp8_matmul_tflops"] = 2 * n**3 / t8 / 1e12
    big = torch.empty(2 * n * n, device=dev, dtype=torch.float32)
    dst = torch.empty_like(big)
    tc = timed(lambda: dst.copy_(big), dev, repeats=10, warmup=2)
    res["copy_tb_s"] = 2 * big.numel() * 4 / tc / 1e12
    ctx.ceiling = res["bf16_matmul_tflops"] * 1e12
    return res


def sd_components(ctx):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightbooth.tiny import tiny_clip_tokenizer

    dev, dt = ctx.dev, ctx.half
    if ctx.tiny:
        unet_cfg = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
        vae_cfg = dict(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    else:  # SD 1.5
        unet_cfg = dict(sample_size=64, cross_attention_dim=768)
        vae_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       sample_size=512)
        text_cfg = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    tok = tiny_clip_tokenizer()
    return dict(
        unet=build(UNet2DConditionModel, dev, dt, **unet_cfg),
        vae=build(AutoencoderKL, dev, dt, **vae_cfg),
        text_encoder=build(CLIPTextModel, dev, dt, config=CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, vocab_size=49408, max_position_embeddings=77, pad_token_id=1,
            **text_cfg)),
        tokenizer=tok,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )


def sd_generator(comps, ctx, cuda_graphs: bool, compile_unet: bool = False):
    from lightbooth.families.sd import SDFamily
    from lightbooth.generate import Generator

    fam = SDFamily({k: copy.deepcopy(v) for k, v in comps.items()}, ROOT, ctx.dev, ctx.half)
    fam.use_fast_paths(cuda_graphs=cuda_graphs, fuse_projections=True, compile=compile_unet)
    return Generator(fam, "bench", [])


def sd(ctx) -> dict:
    from diffusers import StableDiffusionPipeline

    comps = sd_components(ctx)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, px = (50, 512) if not ctx.tiny else (4, 32)
    res = ctx.results["sd"] = {"steps": steps, "px": px, "rows": []}  # filled as it goes: a failure keeps rows
    ours = {"eager": sd_generator(comps, ctx, cuda_graphs=False), "graphs": sd_generator(comps, ctx, True)}
    ctx.sd_comps, ctx.sd_pipe = comps, pipe
    unet_flops = None
    for batch in (1, 8):
        prompts = ["a photo of a red circle on a white background"] * batch
        seeds = list(range(batch))
        gen = ours["eager"]
        x = torch.cat([gen.family.noise(s, px, px) for s in seeds]).to(ctx.dev)
        stock_call = lambda out="pil": pipe(prompts, negative_prompt=[""] * batch, num_inference_steps=steps,  # noqa
                                            guidance_scale=7.5, latents=x.clone(), height=px, width=px,
                                            output_type=out)
        with torch.inference_mode():
            ref = stock_call("latent").images.float()
        t_stock = timed(stock_call, ctx.dev, repeats=ctx.repeats)
        # per step: one guided UNet call (batch 2B)
        e = pipe.encode_prompt(prompts, ctx.dev, 1, True, [""] * batch)
        emb = torch.cat([e[1], e[0]])
        xx, t = torch.cat([x, x]).to(ctx.half), torch.tensor(500, device=ctx.dev)
        unet = pipe.unet
        with torch.inference_mode():
            step_stock = timed(lambda: unet(xx, t, encoder_hidden_states=emb), ctx.dev, repeats=ctx.repeats * 4)
            if unet_flops is None or batch == 8:
                unet_flops = flops(lambda: unet(xx, t, encoder_hidden_states=emb))
        row = dict(batch=batch, stock_s=t_stock, stock_step_s=step_stock, unet_step_flops=unet_flops)
        for name, g in ours.items():
            s = g.settings(steps=steps, guidance=7.5, width=px, height=px)
            cond, unc = g.encode(prompts), g.encode([""] * batch)
            with torch.inference_mode():
                lat = g.family.sample(x.clone(), cond, unc, s.preset, px, px)
            row[f"{name}_rel_err"] = rel_err(lat, ref)
            t_ours = timed(lambda: g._cache.clear() or g(prompts[0], seed=0, num_images=batch, steps=steps, guidance=7.5,
                                     width=px, height=px), ctx.dev, repeats=ctx.repeats)
            both = Cond.cat([cond, unc])
            with torch.inference_mode():
                step = timed(lambda: g.family._unet(torch.cat([x, x]), both, t), ctx.dev, repeats=ctx.repeats * 4)
            row.update({f"{name}_s": t_ours, f"{name}_step_s": step, f"{name}_vs_stock": t_ours / t_stock,
                        f"{name}_step_vs_stock": step / step_stock})
        row["graphs_failed"] = ours["graphs"].family.graphed.failed if ours["graphs"].family.graphed else "off CUDA"
        row["step_fraction_of_ceiling"] = ctx.fraction(unet_flops, row["graphs_step_s"])
        res["rows"].append(row)
    ctx.sd_ours = ours
    return res


def sd_train(ctx) -> dict:
    """One DreamBooth LoRA step, batch 2: diffusers' example recipe vs lightbooth's."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    comps = ctx.sd_comps if ctx.sd_comps is not None else sd_components(ctx)
    px = 512 if not ctx.tiny else 32
    dev = ctx.dev
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    acp = sched.alphas_cumprod.to(dev)
    lora = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    g = torch.Generator(dev).manual_seed(0)
    pixels = torch.rand(2, 3, px, px, device=dev, generator=g) * 2 - 1
    ids = comps["tokenizer"](["a photo of xqz star", "a photo of a star"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids.to(dev)
    amp_stock = torch.float16 if dev.type == "cuda" else torch.bfloat16

    def loss_of(pred, target):  # instance and class halves, prior weight 1 (the example's --with_prior_preservation)
        p, pp = pred.float().chunk(2)
        t, tp = target.float().chunk(2)
        return torch.nn.functional.mse_loss(p, t) + torch.nn.functional.mse_loss(pp, tp)

    # -- stock: the example's step (VAE encode and text encoder every step, fp16 autocast with a GradScaler)
    unet = copy.deepcopy(comps["unet"]).to(ctx.half)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(**lora))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    vae, te = comps["vae"], comps["text_encoder"]

    def stock_step(noise=None, t=None, lat=None, emb=None, do_step=True):
        with torch.autocast(dev.type, dtype=amp_stock):
            if lat is None:
                lat = vae.encode(pixels.to(ctx.half)).latent_dist.sample() * 0.18215
                emb = te(ids)[0]
            noise = torch.randn_like(lat) if noise is None else noise
            t = torch.randint(0, 1000, (2,), device=dev) if t is None else t
            a = acp[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
            loss = loss_of(unet(noisy, t, encoder_hidden_states=emb).sample, noise)
        if do_step:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return loss

    # -- ours: cached latents and embeddings, bf16 weights, fused capturable AdamW, whole step as one CUDA graph
    ounet = copy.deepcopy(comps["unet"]).to(torch.bfloat16).to(memory_format=torch.channels_last)
    ounet.add_adapter(LoraConfig(**lora))
    oparams = [p for p in ounet.parameters() if p.requires_grad]
    for p, q in zip(oparams, params):
        p.data = q.data.clone()  # same LoRA init as the stock run
    on_gpu = dev.type == "cuda"
    oopt = torch.optim.AdamW(oparams, lr=1e-4, fused=on_gpu, capturable=on_gpu)
    with torch.inference_mode():
        lat_cache = (vae.encode(pixels.to(ctx.half)).latent_dist.mean * 0.18215).float()
        emb_cache = te(ids)[0].float()

    def our_loss(lat, emb, noise, t):
        with torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):  # no cast cache across a graph
            a = acp[t].view(-1, 1, 1, 1)
            noisy = (a.sqrt() * lat + (1 - a).sqrt() * noise).to(memory_format=torch.channels_last)
            return loss_of(ounet(noisy, t, encoder_hidden_states=emb).sample, noise)

    def our_step(lat, emb, noise, t):
        loss = our_loss(lat, emb, noise, t)
        loss.backward()
        oopt.step()
        return loss.detach()

    graphed = GraphedTrainStep(our_step, oopt)
    # correctness: loss and LoRA gradients of one step on identical inputs, ours vs stock recipe
    noise, t = torch.randn(lat_cache.shape, device=dev, generator=g), torch.tensor([100, 700], device=dev)
    ref_loss = stock_step(noise, t, lat_cache.to(ctx.half), emb_cache.to(ctx.half), do_step=False)
    ref_loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in params])
    opt.zero_grad(set_to_none=True)
    out_loss = our_loss(lat_cache, emb_cache, noise, t)
    out_loss.backward()
    out_grad = torch.cat([p.grad.flatten() for p in oparams])
    oopt.zero_grad(set_to_none=True)
    res = {"px": px, "loss_rel_err": rel_err(out_loss.detach(), ref_loss.detach()),
           "lora_grad_rel_err": rel_err(out_grad, ref_grad)}
    del out_loss, ref_loss  # a live autograd graph from the default stream would break graph capture later
    res["step_flops"] = flops(lambda: our_loss(lat_cache, emb_cache, noise, t).backward())
    oopt.zero_grad(set_to_none=True)

    def ours_call():
        graphed(lat_cache, emb_cache, torch.randn(lat_cache.shape, device=dev), torch.randint(0, 1000, (2,),
                                                                                              device=dev))

    reps = ctx.repeats * 4
    res["stock_s"] = timed(stock_step, dev, repeats=reps, warmup=3)
    res["stock_mem_before_gib"], res["stock_peak_gib"] = peak_memory(stock_step, dev)
    def ours_eager():
        oopt.zero_grad(set_to_none=True)
        our_step(lat_cache, emb_cache, torch.randn(lat_cache.shape, device=dev), torch.randint(0, 1000, (2,),
                                                                                            device=dev))

    res["ours_eager_s"] = timed(ours_eager, dev, repeats=reps, warmup=2)
    oopt.zero_grad(set_to_none=True)
    res["ours_s"] = timed(ours_call, dev, repeats=reps, warmup=5)
    res["graph_failed"] = graphed.failed
    res["ours_mem_before_gib"], res["ours_peak_gib"] = peak_memory(ours_call, dev)
    res["ours_vs_stock"] = res["ours_s"] / res["stock_s"]
    res["ours_fraction_of_ceiling"] = ctx.fraction(res["step_flops"], res["ours_s"])
    del unet, ounet, opt, oopt, graphed
    ctx.sd_comps = ctx.sd_pipe = ctx.sd_ours = None  # the Qwen sections' memory numbers must not include SD
    free(dev)
    return res


def qwen_components(ctx):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from lightbooth.tiny import rope_axes, tiny_qwen_tokenizer

    if ctx.tiny:
        tcfg = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                    axes_dims_rope=rope_axes(16))
        vcfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])
    else:  # Qwen-Image (20B transformer, its VAE): the classes' defaults are its configuration
        tcfg, vcfg = {}, {}
    base = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return dict(transformer=build(QwenImageTransformer2DModel, ctx.dev, torch.bfloat16, **tcfg),
                vae=build(AutoencoderKLQwenImage, ctx.dev, torch.bfloat16, **vcfg),
                tokenizer=tiny_qwen_tokenizer(), text_encoder=None, scheduler=base)


def lightning_scheduler(base):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(base.config, base_shift=math.log(3), max_shift=math.log(3),
                                                       shift_terminal=None)


def run_timed(call, steps: int, ctx):
    """(seconds, result): few-step runs are warmed up and repeated; a 50-step run is long enough to time once."""
    if steps > 8:
        sync(ctx.dev)
        t = time.perf_counter()
        out = call()
        sync(ctx.dev)
        return time.perf_counter() - t, out
    out = call()
    return timed(call, ctx.dev, repeats=ctx.repeats, warmup=0), out


def qwen(ctx) -> dict:
    from diffusers import QwenImagePipeline

    from lightbooth.families.qwen_image import QwenImageFamily

    ctx.sd_comps = ctx.sd_pipe = ctx.sd_ours = None  # nothing of SD may count in Qwen's memory numbers
    free(ctx.dev)
    comps = qwen_components(ctx)
    dev, px = ctx.dev, (1024 if not ctx.tiny else 64)
    tr = comps["transformer"]
    side = px // 2 ** len(comps["vae"].temperal_downsample) // 2  # tokens per side: VAE downsampling, 2x2 packing
    ctx.qwen_side = side
    pipe = QwenImagePipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(dev).manual_seed(0)
    d = tr.config.joint_attention_dim
    pe, pm = torch.randn(1, 24, d, device=dev, generator=g, dtype=torch.bfloat16), torch.ones(1, 24, device=dev,
                                                                                               dtype=torch.long)
    ne, nm = torch.randn(1, 6, d, device=dev, generator=g, dtype=torch.bfloat16), torch.ones(1, 6, device=dev,
                                                                                              dtype=torch.long)
    cases = [("lightning-8", 8, 1.0, "lightning"), ("base-50-cfg4", 50 if not ctx.tiny else 4, 4.0, "base")]
    cases = [c for c in cases if c[0].split("-")[0] in ctx.qwen_cases]
    base_sched = comps["scheduler"]
    res = ctx.results["qwen"] = {"px": px, "rows": {}}  # filled as it goes: a failure keeps what was measured
    refs, x = {}, None
    for name, steps, cfg, preset in cases:  # stock first: our family patches modules in place when built
        if ctx.over_budget(60 if steps == 8 else 150):
            continue
        pipe.scheduler = lightning_scheduler(base_sched) if preset == "lightning" else base_sched
        kw = dict(prompt_embeds=pe, prompt_embeds_mask=pm, num_inference_steps=steps, true_cfg_scale=cfg,
                  height=px, width=px)
        if cfg > 1:
            kw.update(negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm)
        if x is None:
            x = torch.randn(1, side**2, tr.config.in_channels, device=dev, generator=g, dtype=torch.bfloat16)
        last = {}

        def keep(pipe_, i, t_, kwargs):  # the final latents, to check ours against without a second run
            last["latents"] = kwargs["latents"]
            return kwargs
        with torch.inference_mode():
            t, _ = run_timed(lambda: pipe(latents=x.clone(), output_type="pt", callback_on_step_end=keep, **kw),
                             steps, ctx)
        refs[name] = last["latents"].float()
        res["rows"][name] = {"steps": steps, "guidance": cfg, "stock_s": t, "stock_step_s": t / steps}
    ts = torch.tensor([0.5], device=dev, dtype=torch.bfloat16)
    fwd = lambda: tr(hidden_states=x, timestep=ts, encoder_hidden_states=pe, encoder_hidden_states_mask=pm,  # noqa
                     img_shapes=[[(1, side, side)]], return_dict=False)
    with torch.inference_mode():
        res["forward_flops"] = flops(fwd)
        res["stock_forward_s"] = timed(fwd, dev, repeats=ctx.repeats)
    res["stock_forward_fraction_of_ceiling"] = ctx.fraction(res["forward_flops"], res["stock_forward_s"])
    fam = QwenImageFamily(comps, ROOT, dev, torch.bfloat16)
    ctx.qwen = (comps, fam, pe, pm, x, px)

    def run_ours(label, only=None):
        for name, steps, cfg, preset in cases:
            if name not in res["rows"] or (only and name != only):
                continue
            p = Preset(steps=steps, guidance=cfg, sampler="flow_euler", shift=3.0 if preset == "lightning" else None)
            unc = Cond(ne, nm) if cfg > 1 else None

            def call():
                lat = fam.sample(x.clone(), Cond(pe, pm), unc, p, px, px)
                return lat, fam.decode(lat, px, px)
            t, (lat, _) = run_timed(call, steps, ctx)
            row = res["rows"][name]
            row.update({f"{label}_s": t, f"{label}_vs_stock": t / row["stock_s"],
                        f"{label}_rel_err": rel_err(lat, refs[name])})
        with torch.inference_mode():
            s = timed(fwd, dev, repeats=ctx.repeats)
            if ctx.profile:
                profile(fwd, ctx, f"qwen-forward-{label}")
        res[f"{label}_forward_s"] = s
        res[f"{label}_forward_fraction_of_ceiling"] = ctx.fraction(res["forward_flops"], s)

    run_ours("bf16")
    ctx.save()
    if not ctx.over_budget(90):
        qwen_train(ctx, res, "stock")
    # fp8 first for the image stream's big products only (4096 rows each), then for every layer
    img_only = fam.fp8_skip + ("add_", "to_add_out", "txt_", "_mod")
    res["fp8_img_layers"] = to_fp8(tr, "fp8", skip=img_only)
    run_ours("fp8_img", only="lightning-8")
    ctx.save()
    fam.use_fast_paths(fp8=True)
    res["fp8_layers"] = sum(type(m).__name__ == "Fp8Linear" for m in tr.modules())
    free(dev)
    res["allocated_after_fp8_gib"] = torch.cuda.memory_allocated() / GiB if dev.type == "cuda" else None
    run_ours("fp8")
    ctx.save()
    if not ctx.over_budget(60):
        qwen_train(ctx, res, "fp8")
    ctx.save()
    if not ctx.over_budget(150) and dev.type == "cuda":  # optional: regional torch.compile on top of fp8
        try:
            t0 = time.time()
            fam.use_fast_paths(compile=True)
            run_ours("fp8_compiled", only="lightning-8")
            res["fp8_compiled_section_s"] = time.time() - t0
        except Exception as e:
            res["fp8_compiled_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def qwen_train(ctx, res: dict, label: str) -> None:
    """LoRA r16 on the attention projections (diffusers' Qwen DreamBooth default), gradient checkpointing."""
    from peft import LoraConfig

    comps, fam, pe, pm, x, px = ctx.qwen
    tr, dev = comps["transformer"], ctx.dev
    comps["vae"].to("cpu")  # training works on cached latents
    free(dev)
    tr.enable_gradient_checkpointing()
    torch.manual_seed(0)  # the same LoRA initialization for every label
    tr.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                              target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name=label)
    tr.set_adapter(label)
    params = [p for n, p in tr.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(dev).manual_seed(1)
    x0 = torch.randn(x.shape, device=dev, generator=g, dtype=torch.bfloat16)
    noise = torch.randn(x.shape, device=dev, generator=g, dtype=torch.bfloat16)
    sigma = torch.tensor([0.6], device=dev)
    tr.train()

    def loss_fn():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            noisy = ((1 - sigma) * x0 + sigma * noise).to(torch.bfloat16)
            pred = tr(hidden_states=noisy, timestep=sigma.to(torch.bfloat16), encoder_hidden_states=pe,
                      encoder_hidden_states_mask=pm, img_shapes=[[(1, ctx.qwen_side, ctx.qwen_side)]],
                      return_dict=False)[0]
            return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    loss = loss_fn()
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in params])
    opt.zero_grad(set_to_none=True)
    key = "train_" + label
    out = {"loss": float(loss.detach()), "lora_layers": sum(1 for n, _ in tr.named_modules() if n.endswith(
        f"lora_A.{label}"))}
    if label == "stock":
        ctx.qwen_train_ref = (float(loss.detach()), grad)
    elif ctx.qwen_train_ref is not None:
        out["loss_rel_err"] = abs(float(loss.detach()) - ctx.qwen_train_ref[0]) / abs(ctx.qwen_train_ref[0])
        out["lora_grad_rel_err"] = rel_err(grad, ctx.qwen_train_ref[1])
    out["step_s"] = timed(step, dev, repeats=max(2, ctx.repeats - 1), warmup=1)
    out["mem_before_gib"], out["peak_gib"] = peak_memory(step, dev)
    if label != "stock" and "train_stock" in res:
        out["vs_stock"] = out["step_s"] / res["train_stock"]["step_s"]
    res[key] = out
    tr.eval()
    tr.disable_gradient_checkpointing()
    tr.delete_adapters(label)
    for p in tr.parameters():
        p.requires_grad_(False)
    comps["vae"].to(dev)
    del opt, params, grad
    free(dev)


def sd_compile(ctx) -> dict:
    """Batch 1, 50 steps: the UNet through torch.compile inside the same per-step CUDA graph, vs stock again."""
    from diffusers import StableDiffusionPipeline

    if ctx.dev.type != "cuda":
        return {"skipped": "needs CUDA"}
    comps = sd_components(ctx)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt, steps, px = "a photo of a red circle on a white background", 50, 512
    g = sd_generator(comps, ctx, cuda_graphs=True, compile_unet=True)
    t0 = time.time()
    g(prompt, seed=0, num_images=1, steps=steps, guidance=7.5, width=px, height=px)
    res = {"compile_and_first_call_s": time.time() - t0}
    x = g.family.noise(0, px, px).to(ctx.dev)
    s = g.settings(steps=steps, guidance=7.5, width=px, height=px)
    call = lambda out="pil": pipe([prompt], negative_prompt=[""], num_inference_steps=steps,  # noqa: E731
                                  guidance_scale=7.5, latents=x.clone(), height=px, width=px, output_type=out)
    with torch.inference_mode():
        ref = call("latent").images.float()
        lat = g.family.sample(x.clone(), g.encode([prompt]), g.encode([""]), s.preset, px, px)
    res["rel_err"] = rel_err(lat, ref)
    res["stock_s"] = timed(call, ctx.dev, repeats=ctx.repeats)
    res["s"] = timed(lambda: g._cache.clear() or g(prompt, seed=0, num_images=1, steps=steps, guidance=7.5, width=px,
                                                   height=px), ctx.dev, repeats=ctx.repeats)
    res["vs_stock"] = res["s"] / res["stock_s"]
    return res


SECTIONS = {"ceilings": ceilings, "sd": sd, "sd-train": sd_train, "qwen": qwen, "sd-compile": sd_compile}


class Ctx:
    def __init__(self, args):
        self.tiny, self.out, self.budget = args.tiny, Path(args.out), args.budget
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.half = torch.float16 if self.dev.type == "cuda" else torch.float32
        self.repeats = args.repeats
        self.qwen_cases = args.qwen_cases.split(",")
        self.profile = args.profile
        self.ceiling = None
        self.sd_comps = self.sd_pipe = self.sd_ours = self.qwen = self.qwen_train_ref = self.qwen_side = None
        self.results: dict = {"meta": meta(self)}

    def fraction(self, flop: float, seconds: float) -> float | None:
        """Achieved rate over the measured bf16 matrix ceiling (None when the ceilings section did not run)."""
        return flop / seconds / self.ceiling if self.ceiling else None

    def over_budget(self, need_s: float) -> bool:
        return time.time() - T0 + need_s > self.budget

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu.md").write_text(markdown(self.results))


def meta(ctx) -> dict:
    import diffusers
    import transformers

    m = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
         "diffusers": diffusers.__version__, "transformers": transformers.__version__, "device": str(ctx.dev),
         "python": platform.python_version(), "command": " ".join(sys.argv)}
    if ctx.dev.type == "cuda":
        m["card"] = torch.cuda.get_device_name()
    return m


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(r: dict) -> str:
    lines = [f"card: {r['meta'].get('card', r['meta']['device'])}, {r['meta']['date']}, torch {r['meta']['torch']}, "
             f"diffusers {r['meta']['diffusers']}", ""]
    if "ceilings" in r and "error" not in r["ceilings"]:
        c = r["ceilings"]
        lines += [f"ceilings: bf16 {fmt(c['bf16_matmul_tflops'])} TFLOP/s, fp8 {fmt(c['fp8_matmul_tflops'])} TFLOP/s, "
                  f"copy {fmt(c['copy_tb_s'])} TB/s", ""]
    if "sd" in r and "rows" in r["sd"]:
        lines += ["| SD batch | stock s | eager s (x) | graphs s (x) | step stock / graphs ms | rel err | UNet step "
                  "GFLOP | % ceiling |", "|---|---|---|---|---|---|---|---|"]
        for w in r["sd"]["rows"]:
            lines.append(f"| {w['batch']} | {fmt(w['stock_s'])} | {fmt(w['eager_s'])} ({fmt(w['eager_vs_stock'])}) | "
                         f"{fmt(w['graphs_s'])} ({fmt(w['graphs_vs_stock'])}) | {fmt(w['stock_step_s'] * 1e3)} / "
                         f"{fmt(w['graphs_step_s'] * 1e3)} | {fmt(w['graphs_rel_err'])} | "
                         f"{fmt(w['unet_step_flops'] / 1e9)} | {fmt(100 * (w['step_fraction_of_ceiling'] or 0))} |")
        lines.append("")
    for key in ("sd-train", "sd-compile"):
        if key in r:
            lines += [f"{key}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r[key].items()), ""]
    if "qwen" in r and "rows" in r["qwen"]:
        q = r["qwen"]
        kinds = ("bf16", "fp8_img", "fp8", "fp8_compiled")
        lines += ["| Qwen case | stock s | " + " | ".join(f"{k} s (x, rel err)" for k in kinds) + " |",
                  "|---" * (2 + len(kinds)) + "|"]
        for name, w in q["rows"].items():
            cells = [f"{fmt(w.get(f'{k}_s'))} ({fmt(w.get(f'{k}_vs_stock'))}, {fmt(w.get(f'{k}_rel_err'))})"
                     for k in kinds]
            lines.append(f"| {name} | {fmt(w['stock_s'])} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["qwen: " + ", ".join(f"{k} {fmt(v)}" for k, v in q.items() if k != "rows" and
                                       not k.startswith("train_")), ""]
        for k in ("train_stock", "train_fp8"):
            if k in q:
                lines += [f"{k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in q[k].items()), ""]
    for k, v in r.items():
        if isinstance(v, dict) and "error" in v:
            lines += [f"{k}: FAILED {v['error']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (for tests)")
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="write kernel tables of one Qwen forward per variant")
    ap.add_argument("--qwen-cases", default="lightning,base", help="lightning (8 steps) and/or base (50, CFG 4)")
    ap.add_argument("--budget", type=float, default=480, help="seconds; later sections are skipped past it")
    args = ap.parse_args(argv)
    ctx = Ctx(args)
    if ctx.dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ok = True
    for name in args.sections.split(","):
        if ctx.over_budget(30):
            ctx.results[name] = {"skipped": "time budget"}
            continue
        t = time.time()
        print(f"[{time.time() - T0:6.1f}s] {name} ...", flush=True)
        try:
            ctx.results[name] = SECTIONS[name](ctx)
        except Exception as e:  # keep going: one failure must not cost the rest of a GPU lease
            ok = False
            ctx.results.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        ctx.results[name]["section_s"] = time.time() - t
        ctx.save()
        free(ctx.dev)
    print(markdown(ctx.results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
