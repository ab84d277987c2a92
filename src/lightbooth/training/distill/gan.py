"""DMD2's adversarial term (Yin et al. 2024b, sec. 4.3): a classifier on the fake score's features tells real
images from the student's, and the student is also pushed toward what it calls real.

The classifier is a small head on the denoiser's last hidden states (under the fake-score adapter), per image
token, averaged: it sees a noised image and its prompt, so it judges both how an image looks and whether it fits
its prompt. The real side is data the teacher never had to produce: for the built-in model, rendered shapes-world
scenes with their captions (`gan_data: shapes`), whose crisp shapes the teacher itself only approximates.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

GAN_DATA = ("shapes",)


def head(width: int) -> torch.nn.Module:
    """Per-token logits from hidden states of `width` channels."""
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))


def feature_module(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The module whose output the classifier reads: the last normalisation before the output projection."""
    for name in ("norm_out", "conv_norm_out"):  # MMDiT (qwen-image), UNet (sd)
        if hasattr(denoiser, name):
            return getattr(denoiser, name)
    raise ValueError(f"{type(denoiser).__name__} has no final normalisation to read features from")


@contextlib.contextmanager
def captured(module: torch.nn.Module):
    """Collect `module`'s outputs of the forward passes run inside the block."""
    out: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        yield out
    finally:
        handle.remove()


def logits(classifier: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(B,) logits: the head per token (B, N, D) or per pixel (B, C, H, W), averaged over the image."""
    if features.dim() == 4:
        features = features.flatten(2).transpose(1, 2)
    return classifier(features.float()).mean(dim=(1, 2))


def critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The classifier's non-saturating GAN loss on real and fake logits."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient wrt `x` is `grad` (the generator's GAN gradient, taken through the classifier without
    touching its weights)."""
    return (x.float() * grad.detach().float()).sum()


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()


def shapes_batch(seed: int, g: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """Step g's real images ((n, 3, 64, 64) in [-1, 1]) and captions, English or Chinese, from the shapes world."""
    from ...data import shapes

    rng = np.random.default_rng([seed, 11, g])
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    captions = [shapes.caption(s, "en" if rng.random() < 0.5 else "zh", rng) for s in scenes]
    pixels = np.stack([np.asarray(shapes.render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1, captions


def feature_width(module: torch.nn.Module) -> int:
    """Channels of `feature_module`'s output."""
    norm = getattr(module, "norm", module)  # AdaLayerNormContinuous wraps a LayerNorm
    return norm.num_channels if isinstance(norm, torch.nn.GroupNorm) else int(norm.normalized_shape[0])
