"""Training losses as pure functions (the readable references the modules call)."""

from __future__ import annotations

import math

import torch


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_sigma = (1 - sigma) x0 + sigma noise (Liu et al. 2022; SD3 eq. 1)."""
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       per_sample: bool = False) -> torch.Tensor:
    """Conditional flow matching: regress the velocity noise - x0 (Lipman et al. 2023, eq. 23).

    `per_sample=True` returns one loss per batch row (B,) instead of the batch mean, for weighted sums.
    """
    return mse(v_pred, noise - x0, per_sample)


def mse(pred: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean squared error in fp32; the mean over everything, or over all but the batch dimension."""
    err = (pred.float() - target.float()).pow(2)
    return err.flatten(1).mean(1) if per_sample else err.mean()


def shifted_sigmas(u: torch.Tensor, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """Flow noise levels from uniform `u` with the sampler's time shift: exp(mu) / (exp(mu) + 1/u - 1) when `mu`
    is given (Flux / Qwen-Image dynamic shifting), else s*u / (1 + (s-1) u) (SD3 eq. 23)."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + 1 / u - 1)
    return shift * u / (1 + (shift - 1) * u)


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps at cumulative alpha a (Ho et al. 2020, eq. 4)."""
    a = alpha_bar.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddpm_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network regresses: eps ("epsilon", Ho et al. 2020 eq. 14) or v = sqrt(a) eps - sqrt(1 - a) x0
    ("v_prediction", Salimans & Ho 2022, sec. 4)."""
    if prediction == "epsilon":
        return noise
    if prediction != "v_prediction":
        raise ValueError(f"unsupported prediction_type {prediction!r} (use epsilon or v_prediction)")
    a = alpha_bar.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def logit_normal_sigmas(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                        shift: float = 1.0) -> torch.Tensor:
    """Training noise levels: sigmoid of a normal (SD3 sec. 3.1), then the flow shift s*t / (1 + (s-1) t)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def mixed_sigmas(n: int, shift: float, uniform_share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shifted logit-normal noise levels, with a share `uniform_share` of the batch drawn uniformly from (0, 1)
    instead: the shift spends training on high noise, the uniform share keeps the low-noise end (edges) trained."""
    sigma = logit_normal_sigmas(n, generator, shift=shift)
    uniform = torch.rand(n, generator=generator) < uniform_share
    return torch.where(uniform, torch.rand(n, generator=generator).clamp(1e-3, 1 - 1e-3), sigma)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Pixel L1 + MSE plus a small KL (Kingma & Welling 2014), the weighting SD's autoencoders use in spirit."""
    err = recon.float() - target.float()
    return err.abs().mean() + err.pow(2).mean() + kl_weight * kl.mean()


def prior_preservation_loss(per_sample: torch.Tensor, is_class: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamBooth's objective: mean loss on the instance half plus `weight` times the mean loss on the class half
    (Ruiz et al. 2023, eq. 2); without class samples, the plain mean."""
    if not bool(is_class.any()):
        return per_sample.mean()
    return per_sample[~is_class].mean() + weight * per_sample[is_class].mean()
