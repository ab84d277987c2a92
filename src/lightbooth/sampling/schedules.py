"""Noise schedules as pure functions.

Each returns float32 tensors that match what diffusers' schedulers compute for the same settings, so lightbooth's
samplers reproduce the stock pipelines; the tests hold them to that.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift (SD3 paper, sec. 5.3.2): mu grows linearly with the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_sigmas(steps: int, *, mu: float | None = None, shift: float = 1.0,
                shift_terminal: float | None = None) -> torch.Tensor:
    """Rectified-flow noise levels 1 -> 0, `steps + 1` values ending in 0.

    Starts from linspace(1, 1/steps) and shifts it: with `mu`, the exponential time shift
    exp(mu) / (exp(mu) + 1/t - 1) (Flux / Qwen-Image dynamic shifting); otherwise the fixed shift
    s*t / (1 + (s-1)*t) (SD3 eq. 23). A fixed shift s equals mu = log(s), which is how the Qwen-Image-Lightning
    release states its shift-3 schedule. `shift_terminal` stretches the schedule so it ends at that value.
    """
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if mu is not None:
        t = (math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)).astype(np.float32)
    else:
        t = (shift * t / (1 + (shift - 1) * t)).astype(np.float32)
    if shift_terminal and steps > 1:  # one step has nothing to stretch (diffusers divides by zero there)
        one_minus = 1 - t
        t = (1 - one_minus / (one_minus[-1] / (1 - shift_terminal))).astype(np.float32)
    return torch.cat([torch.from_numpy(t).float(), torch.zeros(1)])


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """Cumulative signal fractions of a discrete DDPM schedule (Ho et al. 2020, eq. 4)."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (use linear or scaled_linear)")
    return torch.cumprod(1.0 - betas, dim=0)


def discrete_timesteps(steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                       steps_offset: int = 0, integer: bool = True) -> np.ndarray:
    """Timesteps, high to low, spaced as diffusers' `timestep_spacing` (Lin et al. 2023, table 2).

    `integer=False` keeps linspace spacing fractional, as the Euler sampler evaluates the model between steps.
    """
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, steps)[::-1]
        return ts.round().astype(np.int64) if integer else ts.astype(np.float32)
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r} (use linspace, leading or trailing)")


def karras_free_sigmas(ac: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """Euler (Karras et al. 2022, alg. 2) noise levels sigma = sqrt((1 - a) / a) at `timesteps`, then 0."""
    full = (((1 - ac) / ac) ** 0.5).numpy()
    sig = np.interp(timesteps.astype(np.float32), np.arange(len(full)), full).astype(np.float32)
    return torch.cat([torch.from_numpy(sig), torch.zeros(1)])


# --- DDPM <-> rectified flow -------------------------------------------------------------------------------------
# Karras et al. 2022 (EDM), sec. 2 and eq. 4: a diffusion state is x = scale * (x0 + sigma n), and processes with
# the same sigma(t) differ only by that scale. DDPM has scale sqrt(a) and sigma = sqrt((1 - a) / a); rectified
# flow, x = (1 - s) x0 + s n, has scale 1 - s and sigma = s / (1 - s). So at equal sigma, i.e. flow level
# s = sigma / (1 + sigma) = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) (logit(s) = log sigma = -logSNR / 2), the DDPM
# state is the flow state times sqrt(a) + sqrt(1 - a), exactly, and any eps- or v-prediction model can be run as a
# velocity field v = n - x0 on flow states.

def ve_to_flow(sigma: torch.Tensor) -> torch.Tensor:
    """Flow noise level s = sigma / (1 + sigma) of a VE level sigma (inf -> 1, 0 -> 0)."""
    return sigma / (1 + sigma)


def flow_sigma(ac: torch.Tensor) -> torch.Tensor:
    """Flow noise level of cumulative alpha `ac`: sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))."""
    return ve_to_flow(((1 - ac) / ac) ** 0.5)


def vp_alpha(s: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha of flow level s: (1 - s)^2 / ((1 - s)^2 + s^2), the inverse of `flow_sigma`."""
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def vp_scale(s: torch.Tensor) -> torch.Tensor:
    """sqrt(a) + sqrt(1 - a) = 1 / sqrt((1 - s)^2 + s^2): x_t = vp_scale(s) * x_flow at the same level.

    So a DDPM sampler's start, unit noise at level s, is noise / vp_scale(s) in flow coordinates (noise itself at
    s = 1, where both conventions agree).
    """
    return ((1 - s) ** 2 + s**2) ** -0.5


def ddpm_timestep(ac: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The continuous DDPM timestep whose noise level is flow level `s` (any shape), clamped to [0, len(ac) - 1].

    Piecewise linear in log sigma = logit(s) between the integer timesteps (diffusers' EulerDiscreteScheduler
    `_sigma_to_t`), so it is exact at the training timesteps; the UNet's sinusoidal embedding takes float steps.
    """
    table = (0.5 * torch.log((1 - ac.double()) / ac.double())).to(s.device)  # log sigma, increasing in t
    x = torch.logit(s.double().clamp(1e-12, 1 - 1e-12))
    i = torch.searchsorted(table, x.contiguous()).clamp(1, len(table) - 1)
    w = ((x - table[i - 1]) / (table[i] - table[i - 1])).clamp(0, 1)
    return (i - 1 + w).float()
