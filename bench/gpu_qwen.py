"""The Qwen-Image sections of the GPU benchmark (bench/gpu.py): generation in bf16 and fp8, LoRA training step."""

from __future__ import annotations

import math
import time

import torch
from gpu_measure import GiB, ROOT, build, flops, free, peak_memory, profile, rel_err, sync, timed

from lightbooth.accel.fp8 import to_fp8
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
