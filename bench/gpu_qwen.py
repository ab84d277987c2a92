"""The Qwen-Image sections of the GPU benchmark (bench/gpu.py): generation in bf16 and fp8, LoRA training step."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from gpu_measure import (GiB, ROOT, build, flops, free, peak_memory, profile, rel_err, sync, timed, trace_peak,
                         trace_start)
from gpu_trainer import trainer_steps

from lightbooth.families.base import Cond, Preset


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


def sdpa_order(cudnn: bool):
    """A context giving SDPA cuDNN attention first (cudnn=True) or leaving torch's own order."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not cudnn:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def uncompile(tr) -> None:
    """Undo compile_repeated_blocks (nn.Module.compile) so the next variant compiles afresh."""
    for m in tr.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def qwen(ctx) -> dict:
    """Stock pipeline, then lightbooth eager, compiled, fp8 eager and fp8 compiled, on one set of weights.

    Order matters, as lightbooth's family changes the transformer in place: stock generation and the stock LoRA
    step come first, on the untouched model; then lightbooth in bf16, eager and with its blocks compiled, then fp8
    weights (the fp8 LoRA step eager, then generation compiled, then optionally the LoRA step compiled).
    """
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
    refs = {}
    x = torch.randn(1, side**2, tr.config.in_channels, device=dev, generator=g, dtype=torch.bfloat16)
    for name, steps, cfg, preset in cases:  # stock first: our family changes modules in place when built
        if ctx.over_budget(60 if steps == 8 else 150):
            continue
        pipe.scheduler = lightning_scheduler(base_sched) if preset == "lightning" else base_sched
        kw = dict(prompt_embeds=pe, prompt_embeds_mask=pm, num_inference_steps=steps, true_cfg_scale=cfg,
                  height=px, width=px)
        if cfg > 1:
            kw.update(negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm)
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
    # one forward as the stock pipeline calls it (it drops an all-ones text mask, so: no mask)
    fwd = lambda: tr(hidden_states=x, timestep=ts, encoder_hidden_states=pe, encoder_hidden_states_mask=None,  # noqa
                     img_shapes=[[(1, side, side)]], return_dict=False)[0]
    with torch.inference_mode():
        res["forward_flops"] = flops(fwd)
        ref_fwd = fwd().float()
        res["stock_forward_s"] = timed(fwd, dev, repeats=ctx.repeats + 2)
        if ctx.profile:
            profile(fwd, ctx, "stock")
    res["stock_forward_fraction_of_ceiling"] = ctx.fraction(res["forward_flops"], res["stock_forward_s"])
    ctx.save()
    ctx.qwen = (comps, None, pe, pm, x, px)
    if not ctx.over_budget(90):
        qwen_train(ctx, res, "stock", mask=pm)  # as diffusers' Qwen DreamBooth script: the mask passed
    fam = QwenImageFamily(comps, ROOT, dev, torch.bfloat16)
    ctx.qwen = (comps, fam, pe, pm, x, px)
    if ctx.qwen_trainer_only:  # the stock LoRA step, then straight to the trainer's (it converts to fp8 itself)
        if ctx.memory_trace:  # and the bench loop with the trainer's settings, to compare what each keeps at its peak
            fam.use_fast_paths(fp8=True)
            if ctx.compile:
                fam.use_fast_paths(compile=True)
            qwen_train(ctx, res, "fp8_compiled" if ctx.compile else "fp8", mask=None)
            uncompile(tr)
        qwen_trainer(ctx, res, fam, pe, px)
        return res
    cudnn = {"on": False}

    def measure(label, e2e=True, prof=False):
        """Forward time and error against the stock forward; the 8-step run end to end against stock's latents."""
        with torch.inference_mode(), sdpa_order(cudnn["on"]):
            t0 = time.time()
            out = fwd().float()  # the first call compiles, when compiling
            res[f"{label}_first_call_s"] = time.time() - t0
            res[f"{label}_forward_rel_err"] = rel_err(out, ref_fwd)
            res[f"{label}_forward_s"] = s = timed(fwd, dev, repeats=ctx.repeats + 2)
            res[f"{label}_forward_fraction_of_ceiling"] = ctx.fraction(res["forward_flops"], s)
            if prof and ctx.profile:
                profile(fwd, ctx, label)
        for name, steps, cfg, preset in cases if e2e else ():
            if name not in res["rows"] or ctx.over_budget(20 + 4 * steps * s):
                continue
            p = Preset(steps=steps, guidance=cfg, sampler="flow_euler", shift=3.0 if preset == "lightning" else None)
            unc = Cond(ne) if cfg > 1 else None
            if steps > 8:  # timed once: warm up (a compiled denoiser compiles for the CFG batch of 2 here)
                with sdpa_order(cudnn["on"]):
                    fam.sample(x.clone(), Cond(pe), unc, replace(p, steps=2), px, px)

            def call():
                with sdpa_order(cudnn["on"]):
                    lat = fam.sample(x.clone(), Cond(pe), unc, p, px, px)  # masks as encode() gives them: none
                    return lat, fam.decode(lat, px, px)
            t, (lat, _) = run_timed(call, steps, ctx)
            row = res["rows"][name]
            row.update({f"{label}_s": t, f"{label}_vs_stock": t / row["stock_s"],
                        f"{label}_rel_err": rel_err(lat, refs[name])})
        ctx.save()

    measure("bf16")
    if not ctx.over_budget(90):
        qwen_train(ctx, res, "bf16", mask=None)  # lightbooth's processor, bf16 weights, eager
    if dev.type == "cuda":  # which attention kernel: torch's default order, or cuDNN's first
        cudnn["on"] = True
        measure("bf16_cudnn", e2e=False)
        cudnn["on"] = res["bf16_cudnn_forward_s"] < 0.97 * res["bf16_forward_s"]
        res["sdpa_cudnn_first"] = cudnn["on"]
    if ctx.compile and not ctx.over_budget(200):
        fam.use_fast_paths(compile=True)
        measure("bf16_compiled", prof=True)
        uncompile(tr)
    fam.use_fast_paths(fp8=True)
    res["fp8_layers"] = sum(type(m).__name__ == "Fp8Linear" for m in tr.modules())
    free(dev)
    res["allocated_after_fp8_gib"] = torch.cuda.memory_allocated() / GiB if dev.type == "cuda" else None
    measure("fp8", e2e=not ctx.compile)
    if not ctx.over_budget(60):
        with sdpa_order(cudnn["on"]):
            qwen_train(ctx, res, "fp8", mask=None)
    if ctx.compile and not ctx.over_budget(60):
        fam.use_fast_paths(compile=True)
        measure("fp8_compiled", prof=True)
        if not ctx.over_budget(80):  # compiling the step took 33 s on an H200
            with sdpa_order(cudnn["on"]):
                qwen_train(ctx, res, "fp8_compiled", mask=None)
        uncompile(tr)
    if not ctx.over_budget(90):
        with sdpa_order(cudnn["on"]):
            qwen_trainer(ctx, res, fam, pe, px)
    return res


def qwen_trainer(ctx, res: dict, fam, pe, px: int) -> None:
    """`lightbooth dreambooth`'s own step with the settings of the fp8 compiled row."""
    res["trainer_fp8"] = trainer_steps(
        ctx, fam, Cond(pe), px, steps=8, prior=False, rank=16, grad_checkpointing=True, fp8=True,
        compile=ctx.compile, lora_targets=["to_q", "to_k", "to_v", "to_out.0"],
        precision="bf16-mixed")  # the trainer's choice on a GPU (the tiny CPU run's bf16 model needs it)
    res["trainer_fp8"].pop("_lora_up")
    if "train_stock" in res:
        res["trainer_fp8"]["vs_stock"] = res["trainer_fp8"]["step_s"] / res["train_stock"]["step_s"]


def qwen_train(ctx, res: dict, label: str, mask) -> None:
    """LoRA r16 on the attention projections (diffusers' Qwen DreamBooth default), gradient checkpointing.

    `mask`: the text mask as passed (diffusers' script passes it; lightbooth's all-ones masks are None);
    the first step's time (compiling, when compiled) is kept apart."""
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
                      encoder_hidden_states_mask=mask, img_shapes=[[(1, ctx.qwen_side, ctx.qwen_side)]],
                      return_dict=False)[0]
            return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.time()
    loss = loss_fn()
    loss.backward()
    sync(dev)
    first_s = time.time() - t0
    grad = torch.cat([p.grad.flatten().float() for p in params])
    opt.zero_grad(set_to_none=True)
    key = "train_" + label
    out = {"loss": float(loss.detach()), "first_step_s": first_s, "lora_layers": sum(1 for n, _ in tr.named_modules() if n.endswith(
        f"lora_A.{label}"))}
    if label == "stock":
        ctx.qwen_train_ref = (float(loss.detach()), grad)
    elif ctx.qwen_train_ref is not None:
        out["loss_rel_err"] = abs(float(loss.detach()) - ctx.qwen_train_ref[0]) / abs(ctx.qwen_train_ref[0])
        out["lora_grad_rel_err"] = rel_err(grad, ctx.qwen_train_ref[1])
    out["step_s"] = timed(step, dev, repeats=max(2, ctx.repeats - 1), warmup=1)
    if dev.type == "cuda":  # where the peak happens, as the trainer rows report it
        torch.cuda.reset_peak_memory_stats()
        loss = loss_fn()
        out["forward_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["held_for_backward_gib"] = torch.cuda.memory_allocated() / GiB
        loss.backward()
        out["backward_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        opt.zero_grad(set_to_none=True)
        loss = None
    out["mem_before_gib"], out["peak_gib"] = peak_memory(step, dev)
    if ctx.memory_trace and dev.type == "cuda":  # what is live at the step's peak, by where it was made
        trace_start(dev)
        step()
        out["memory_trace"] = trace_peak(dev)
    if label != "stock" and "train_stock" in res:
        out["vs_stock"] = out["step_s"] / res["train_stock"]["step_s"]
    res[key] = out
    tr.eval()
    tr.disable_gradient_checkpointing()
    tr.unload_lora()  # the base layers back in place (delete_adapters would leave peft's wrappers)
    for p in tr.parameters():
        p.requires_grad_(False)
    comps["vae"].to(dev)
    opt.state.clear()
    params = grad = None  # noqa: F841 (freed before measuring what comes next)
    free(dev)
