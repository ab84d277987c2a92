"""The SD 1.5 sections of the GPU benchmark (bench/gpu.py): generation, the DreamBooth LoRA step, compiled UNet."""

from __future__ import annotations

import copy
import time

import torch
from gpu_measure import ROOT, build, flops, free, peak_memory, rel_err, timed
from gpu_trainer import sd_trainer

from lightbooth.accel.graphs import GraphedTrainStep
from lightbooth.families.base import Cond


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
    unet = ounet = opt = oopt = graphed = None  # noqa: F841 (freed; `del` would confuse the closures' linting)
    free(dev)
    sd_trainer(ctx, comps, emb_cache, res)  # `lightbooth dreambooth`'s own step: eager, graphs, compiled
    ctx.sd_comps = ctx.sd_pipe = ctx.sd_ours = None  # the Qwen sections' memory numbers must not include SD
    free(dev)
    return res



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
