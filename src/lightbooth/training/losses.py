"""Training losses as pure functions (the readable references the modules call)."""

from __future__ import annotations

import torch


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_sigma = (1 - sigma) x0 + sigma noise (Liu et al. 2022; SD3 eq. 1)."""
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional flow matching: regress the velocity noise - x0 (Lipman et al. 2023, eq. 23)."""
    return (v_pred.float() - (noise - x0).float()).pow(2).mean()


def logit_normal_sigmas(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                        shift: float = 1.0) -> torch.Tensor:
    """Training noise levels: sigmoid of a normal (SD3 sec. 3.1), then the flow shift s*t / (1 + (s-1) t)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Pixel L1 + MSE plus a small KL (Kingma & Welling 2014), the weighting SD's autoencoders use in spirit."""
    err = recon.float() - target.float()
    return err.abs().mean() + err.pow(2).mean() + kl_weight * kl.mean()
