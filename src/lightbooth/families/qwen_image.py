"""Qwen-Image: MMDiT over 2x2-packed latents of a 16-channel causal VAE, flow matching, Qwen2.5-VL text encoder."""

from __future__ import annotations

import torch

from ..errors import LightboothError
from ..sampling import guidance, samplers, schedules
from ..training.losses import flow_matching_loss, flow_noisy, shifted_sigmas
from .base import Cond, Family, Preset, cfg_batch, guided, presign_attention
from .qwen_vae import fast_rms_norms, single_frame_convs

# Qwen-Image's prompt template; the system part is encoded for context and then dropped from the embeddings.
QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
MAX_PROMPT_TOKENS = 1024  # the pipeline's tokenizer_max_length


def template_prefix_length(tokenizer, template: str = QWEN_PROMPT_TEMPLATE) -> int:
    """Number of tokens before the user's text, measured with this tokenizer (34 for Qwen's own).

    Checked against two different prompts so a tokenizer that merges across the boundary is caught.
    """
    prefix = tokenizer(template.split("{}")[0])["input_ids"]
    for probe in ("a", "红色"):
        ids = tokenizer(template.format(probe))["input_ids"]
        if ids[: len(prefix)] != prefix:
            raise LightboothError("this tokenizer merges the prompt template's prefix with the prompt; "
                                  "lightbooth cannot tell where the prompt starts (use the model's own tokenizer)")
    return len(prefix)


def prompt_embeds(tokenizer, text_encoder, prompts: list[str], prefix_len: int, device) -> Cond:
    """Last-layer hidden states of the user's tokens only, one row per prompt, padded and masked.

    Shared by generation and training (the caller decides on grad / inference mode).
    """
    batch = tokenizer([QWEN_PROMPT_TEMPLATE.format(p) for p in prompts], max_length=MAX_PROMPT_TOKENS + prefix_len,
                      padding=True, truncation=True, return_tensors="pt").to(device)
    hidden = text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          output_hidden_states=True).hidden_states[-1]
    rows = [h[m.bool()][prefix_len:] for h, m in zip(hidden, batch.attention_mask)]
    return Cond.cat([Cond(r[None]) for r in rows])


class QwenImageFamily(Family):
    name = "qwen-image"
    pipeline_classes = ("QwenImagePipeline",)
    component_names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "transformer"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    samplers = ("flow_euler", "flow_stochastic")
    fp8_skip = ("img_in", "txt_in", "norm_out", "proj_out")  # first and last layers: small, and errors there show
    compile_regional = True  # 60 identical blocks are nearly all of the work
    flow_matching = True  # velocity(), image_tokens() and schedule() exist: few-step distillation works on it
    presets = {
        "base": Preset(steps=50, guidance=4.0, sampler="flow_euler"),
        # Qwen-Image-Lightning: fixed shift 3, CFG distilled in (true CFG 1), 8 or 4 steps.
        "lightning": Preset(steps=8, guidance=1.0, sampler="flow_euler", shift=3.0),
        "lightning-4": Preset(steps=4, guidance=1.0, sampler="flow_euler", shift=3.0),
    }

    def __init__(self, components, path, device, dtype):
        super().__init__(components, path, device, dtype)
        vae = components["vae"]
        self.vae_scale = 2 ** len(vae.temperal_downsample)
        self.size_factor = self.vae_scale * 2  # latents are packed into 2x2 patches
        self.default_size = (self.size_factor * 64,) * 2 if self.vae_scale >= 8 else (64, 64)
        self.prefix_len = template_prefix_length(components["tokenizer"])
        self.latent_channels = components["transformer"].config.in_channels // 4
        z = vae.config.z_dim
        self._mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        self._std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        single_frame_convs(vae)  # an image is one frame: exact 2D convs, a third of the 3D arithmetic
        fast_rms_norms(vae)  # torch's channel-dim vector_norm is slow on CPU
        presign_attention(components["transformer"])

    def encode(self, prompts: list[str]) -> Cond:
        with torch.inference_mode():
            return self.encode_text(prompts)

    def encode_text(self, prompts, text_encoder=None):
        return prompt_embeds(self.components["tokenizer"], text_encoder or self.components["text_encoder"], prompts,
                             self.prefix_len, self.device)

    def encode_images(self, pixels):
        z = self.components["vae"].encode(pixels.to(self.device, self.dtype)[:, :, None]).latent_dist.mean
        return ((z - self._mean.to(z)) / self._std.to(z))[:, :, 0]  # (B, C, h, w)

    def training_sigmas(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Training noise levels shifted as the model's own sampling schedule is (fixed or dynamic shift)."""
        cfg = self.components["scheduler"].config
        if cfg.get("use_dynamic_shifting", False):
            mu = schedules.dynamic_shift_mu(image_seq_len, cfg.get("base_image_seq_len", 256),
                                            cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                            cfg.get("max_shift", 1.15))
            return shifted_sigmas(u, mu=mu)
        return shifted_sigmas(u, shift=cfg.get("shift", 1.0))

    def training_loss(self, denoiser, x0, cond, noise, u):
        b, _, h, w = x0.shape
        sigma = self.training_sigmas(u, (h // 2) * (w // 2)).to(x0)
        v = denoiser(hidden_states=pack(flow_noisy(x0, noise, sigma)), timestep=sigma,
                     encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=cond.mask,
                     img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]  # (B, N, 4C)
        return flow_matching_loss(v, pack(x0), pack(noise), per_sample=True)

    def latent_hw(self, width: int, height: int) -> tuple[int, int]:
        return height // self.vae_scale, width // self.vae_scale

    def noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        h, w = self.latent_hw(width, height)
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, 1, self.latent_channels, h, w), generator=g, dtype=self.dtype)
        return pack(x.view(1, self.latent_channels, h, w))  # (1, h/2*w/2, 4C)

    def schedule(self, preset: Preset, image_seq_len: int) -> torch.Tensor:
        if preset.shift is not None:
            return schedules.flow_sigmas(preset.steps, shift=preset.shift)
        cfg = self.components["scheduler"].config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            mu = schedules.dynamic_shift_mu(image_seq_len, cfg.get("base_image_seq_len", 256),
                                            cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                            cfg.get("max_shift", 1.15))
        return schedules.flow_sigmas(preset.steps, mu=mu, shift=cfg.get("shift", 1.0),
                                     shift_terminal=cfg.get("shift_terminal"))

    def _forward(self, x: torch.Tensor, cond: Cond, sigma: torch.Tensor, img_shape) -> torch.Tensor:
        t = (sigma * 1000).to(self.dtype).expand(x.shape[0])  # as the stock pipeline rounds it
        return self.denoiser(hidden_states=x.to(self.dtype), timestep=t / 1000,
                             encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=cond.mask,
                             img_shapes=[[img_shape]] * x.shape[0], return_dict=False)[0]

    def image_tokens(self, width: int, height: int) -> int:
        h, w = self.latent_hw(width, height)
        return (h // 2) * (w // 2)

    def velocity(self, x: torch.Tensor, cond: Cond, sigma: torch.Tensor, width: int, height: int,
                 uncond: Cond | None = None, guidance_scale: float = 1.0, both: Cond | None = None,
                 rescale: bool = True) -> torch.Tensor:
        """The (guided) velocity at noise level `sigma` (a scalar, or one per row of x) for packed latents x;
        `rescale`: Qwen-Image's per-token norm rescale after CFG, else plain CFG."""
        h, w = self.latent_hw(width, height)

        def fwd(xx, c):  # under CFG the batch is [x; x], so per-row levels repeat
            s = sigma if sigma.dim() == 0 or len(sigma) == len(xx) else sigma.repeat(len(xx) // len(sigma))
            return self._forward(xx, c, s, (1, h // 2, w // 2))
        combine = guidance.cfg_norm_rescale if rescale else guidance.cfg
        return guided(fwd, combine, x, cond, uncond, guidance_scale, both)

    def sample(self, x, cond, uncond, preset, width, height, callback=None, renoise=None):
        sigmas = self.schedule(preset, x.shape[1]).to(self.device)
        both = cfg_batch(cond, uncond, preset.guidance)

        def velocity(xt, i):
            return self.velocity(xt, cond, sigmas[i], width, height, uncond, preset.guidance, both,
                                 preset.cfg_rescale)

        with torch.inference_mode():
            if preset.sampler == "flow_stochastic":
                return samplers.flow_stochastic(velocity, x, sigmas, renoise, callback, preset.euler_steps)
            return samplers.flow_euler(velocity, x, sigmas, callback)

    def decode(self, latents, width, height):
        h, w = self.latent_hw(width, height)
        x = unpack(latents, h, w).to(self.dtype)  # (B, C, 1, h, w)
        x = x * self._std.to(x) + self._mean.to(x)
        with torch.inference_mode():
            img = self.components["vae"].decode(x, return_dict=False)[0][:, :, 0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 latent patches become tokens."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, 1, h, w), the causal VAE's one-frame video layout."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, 1, h, w)
