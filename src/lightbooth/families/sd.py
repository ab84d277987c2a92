"""Stable Diffusion 1.x / 2.x: UNet over 4-channel VAE latents, discrete DDPM schedule, CLIP text encoder.

Epsilon and v prediction are read from the model's scheduler config, as is the training noise schedule. The UNet
also runs as a rectified-flow velocity field (`velocity`, by the exact reparametrisation in sampling/schedules.py),
which is what few-step distillation trains and the "flow_euler" sampler of distilled LoRAs walks.
"""

from __future__ import annotations

import torch

from ..sampling import guidance, samplers, schedules
from ..training.losses import ddpm_noisy, ddpm_target, mse
from .base import Cond, Family, Preset, cfg_batch, guided, presign_attention


class SDFamily(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    component_names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    text_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    # LCM-LoRA's (Luo et al. 2023; diffusers' train_lcm_distill_lora_sd_wds.py): a few-step student must change the
    # ResNet convolutions too, attention alone cannot bend the trajectory enough
    distill_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                            "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                            "time_emb_proj")
    samplers = ("ddim", "euler", "flow_euler", "flow_stochastic")
    presets = {"base": Preset(steps=50, guidance=7.5, sampler="ddim")}
    cuda_graphs_ok = True
    trace_ok = True
    fuse_projections_ok = True

    def __init__(self, components, path, device, dtype):
        super().__init__(components, path, device, dtype)
        vae = components["vae"]
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_factor = self.vae_scale
        self.default_size = (components["unet"].config.sample_size * self.vae_scale,) * 2
        cfg = components["scheduler"].config
        self.sched = dict(cfg)
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.ac = schedules.alphas_cumprod(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.00085),
                                           cfg.get("beta_end", 0.012), cfg.get("beta_schedule", "scaled_linear"))
        self.sigma_max = float(schedules.flow_sigma(self.ac[-1].double()))  # flow level of t = T-1 (0.936 for SD1.5)
        # NHWC is the layout oneDNN's (and cuDNN's) fastest convolutions use; the UNet and VAE are conv nets.
        for name in ("unet", "vae"):
            components[name].to(memory_format=torch.channels_last)
        presign_attention(components["unet"])

    def encode(self, prompts: list[str]) -> Cond:
        with torch.inference_mode():
            return self.encode_text(prompts)

    def encode_text(self, prompts, text_encoder=None):
        tok, enc = self.components["tokenizer"], text_encoder or self.components["text_encoder"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
        return Cond(enc(ids.input_ids.to(self.device), attention_mask=mask)[0])

    def encode_images(self, pixels):
        vae = self.components["vae"]
        return vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean * vae.config.scaling_factor

    def training_loss(self, denoiser, x0, cond, noise, u):
        t = (u * len(self.ac)).long().clamp(max=len(self.ac) - 1)  # uniform over the training timesteps
        a = self.ac.to(x0.device)[t]
        out = denoiser(ddpm_noisy(x0, noise, a), t, encoder_hidden_states=cond.embeds, return_dict=False)[0]
        return mse(out, ddpm_target(x0, noise, a, self.prediction), per_sample=True)

    def noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        c = self.components["unet"].config.in_channels
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, c, height // self.vae_scale, width // self.vae_scale), generator=g, dtype=self.dtype)

    def timesteps(self, steps: int, integer: bool = True):
        return schedules.discrete_timesteps(steps, len(self.ac), self.sched.get("timestep_spacing", "leading"),
                                            self.sched.get("steps_offset", 0), integer)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def _unet(self, x, cond: Cond, t):
        if self.graphed is not None:
            return self.graphed(x.to(self.dtype), torch.as_tensor(t, device=self.device), cond.embeds)
        return self.denoise(x.to(self.dtype), t, cond.embeds)

    def _eps_x0(self, out, x, a):
        """Convert the network output to (eps, x0) at cumulative alpha `a`."""
        if self.prediction == "v_prediction":
            return a**0.5 * out + (1 - a) ** 0.5 * x, a**0.5 * x - (1 - a) ** 0.5 * out
        return out, (x - (1 - a) ** 0.5 * out) / a**0.5

    def sample(self, x, cond, uncond, preset, width, height, callback=None, renoise=None):
        ts = self.timesteps(preset.steps)
        ac = self.ac.to(self.device)
        both = cfg_batch(cond, uncond, preset.guidance)
        if self.graphed is not None:
            self.graphed.begin_run()

        def predict(xin, t):
            fwd = lambda xx, c: self._unet(xx, c, t)  # noqa: E731
            return guided(fwd, guidance.cfg, xin, cond, uncond, preset.guidance, both).float()

        with torch.inference_mode():
            if preset.sampler in ("flow_euler", "flow_stochastic"):
                sigmas = self.schedule(preset).to(self.device)

                def velocity(xt, i):
                    return self.velocity(xt, cond, sigmas[i], width, height, uncond, preset.guidance, both)

                x = x / schedules.vp_scale(sigmas[0])
                if preset.sampler == "flow_stochastic":  # flow states take unit noise as they are
                    return samplers.flow_stochastic(velocity, x, sigmas, renoise, callback, preset.euler_steps)
                return samplers.flow_euler(velocity, x, sigmas, callback)
            if preset.sampler == "euler":
                return self._euler(predict, x, self.timesteps(preset.steps, integer=False), callback)
            ratio = len(self.ac) // preset.steps
            final = 1.0 if self.sched.get("set_alpha_to_one", True) else float(self.ac[0])
            prev = [ac[t - ratio] if t - ratio >= 0 else torch.tensor(final, device=self.device) for t in ts]

            def eps_x0(xt, i):
                return self._eps_x0(predict(xt, int(ts[i])), xt, ac[int(ts[i])])

            return samplers.ddim(eps_x0, x, torch.stack(prev), callback)  # DDIM starts at unit noise

    # --- as a rectified flow (distillation, and the flow_euler sampler of distilled LoRAs) -------------------------
    def image_tokens(self, width: int, height: int) -> int:
        return (height // self.vae_scale) * (width // self.vae_scale)  # unused: SD's schedule has no dynamic shift

    def schedule(self, preset: Preset, image_seq_len: int = 0) -> torch.Tensor:
        """The flow levels (steps + 1 values ending in 0) `preset` walks, in `velocity`'s coordinates.

        flow_euler: the shifted flow schedule (shift None: 1) scaled into [0, sigma_max], the range the UNet was
        trained on.
        ddim / euler: their own timesteps' levels (DDIM is exactly flow Euler on them; Euler solves the same ODE).
        """
        if preset.sampler in ("flow_euler", "flow_stochastic"):
            return schedules.flow_sigmas(preset.steps, shift=preset.shift or 1.0) * self.sigma_max
        ts = self.timesteps(preset.steps, integer=preset.sampler == "ddim")
        return schedules.ve_to_flow(schedules.karras_free_sigmas(self.ac, ts))

    def velocity(self, x: torch.Tensor, cond: Cond, sigma: torch.Tensor, width: int, height: int,
                 uncond: Cond | None = None, guidance_scale: float = 1.0, both: Cond | None = None,
                 rescale: bool = True) -> torch.Tensor:  # `rescale`: sd has none (plain CFG, as Stable Diffusion)
        """The (guided) velocity n - x0 at flow level `sigma` (a scalar, or one per row) for flow states x.

        x is scaled to the DDPM state at the matching cumulative alpha, the UNet runs at the matching continuous
        timestep, and its eps / v output (guided as `sample` guides it) becomes (eps, x0) exactly.
        """
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        a = schedules.vp_alpha(s).view(-1, 1, 1, 1)
        xt = x.float() * schedules.vp_scale(s).view(-1, 1, 1, 1)
        t = schedules.ddpm_timestep(self.ac, s)

        def fwd(xx, c):  # under CFG the batch is [x; x], so per-row timesteps repeat
            return self._unet(xx, c, t.repeat(len(xx) // len(t)))
        out = guided(fwd, guidance.cfg, xt, cond, uncond, guidance_scale, both).float()
        eps, x0 = self._eps_x0(out, xt, a)
        return eps - x0

    def _euler(self, predict, x, ts, callback):
        sigmas = schedules.karras_free_sigmas(self.ac, ts).to(self.device)
        tsf = torch.from_numpy(ts.astype("float32")).to(self.device)
        spacing = self.sched.get("timestep_spacing", "leading")
        init = (sigmas.max() ** 2 + 1) ** 0.5 if spacing in ("leading", "trailing") else sigmas.max()

        def denoised(xt, i):
            s = sigmas[i]
            out = predict(xt / (s**2 + 1) ** 0.5, tsf[i])
            if self.prediction == "v_prediction":
                return out * (-s / (s**2 + 1) ** 0.5) + xt / (s**2 + 1)
            return xt - s * out

        return samplers.euler(denoised, x * init, sigmas, callback)

    def decode(self, latents, width, height):
        vae = self.components["vae"]
        with torch.inference_mode():
            img = vae.decode(latents.to(self.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
