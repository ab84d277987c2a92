"""Samplers: each a short loop over a schedule, calling the model through one function.

`model(x, i)` returns the model's prediction at step i in the parameterization the sampler names (velocity for
flow matching, (eps, x0) for DDIM, eps for Euler); the family adapter does the network call, CFG and
preconditioning. Arithmetic is done in float32 whatever the network's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

Callback = Callable[[int, torch.Tensor], None] | None


def flow_euler(model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    """Euler on the rectified-flow ODE dx/dsigma = v (Liu et al. 2022; Esser et al. 2024, eq. 1)."""
    x = x.float()
    for i in range(len(sigmas) - 1):
        v = model(x, i).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback:
            callback(i, x)
    return x


def flow_stochastic(model, x: torch.Tensor, sigmas: torch.Tensor, noise: Callable[[int], torch.Tensor] | None,
                    callback: Callback = None, euler_steps: int = 0) -> torch.Tensor:
    """Multi-step sampling by re-noising (consistency models, Song et al. 2023, alg. 1; DMD2's few-step generator,
    Yin et al. 2024b, sec. 4.5): at each level the clean estimate x0 = x - sigma v, then fresh unit noise `noise(i)`
    takes it to the next level, (1 - sigma') x0 + sigma' n. An Euler step would reuse the predicted noise x0 + v
    instead, carrying the step's error along. diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    takes the same steps. The last step, to sigma 0, is the clean estimate itself, as with Euler.

    The first `euler_steps` steps are Euler steps: the starting noise then keeps its say over what the first, high
    noise steps decide (layout, colour), which fresh noise would otherwise blur towards the student's favourites.
    """
    if noise is None and any(sigmas[i + 1] != 0 for i in range(euler_steps, len(sigmas) - 1)):
        raise ValueError("flow_stochastic needs fresh noise after each step: pass noise(i) (the families' `renoise`), "
                         "or sample with flow_euler")
    x = x.float()
    for i in range(len(sigmas) - 1):
        v = model(x, i).float()
        if i < euler_steps:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        else:
            x0 = x - sigmas[i] * v
            x = x0 if sigmas[i + 1] == 0 else (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise(i).float()
        if callback:
            callback(i, x)
    return x


def ddim(model, x: torch.Tensor, alphas_prev: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0).

    `model(x, i)` returns (eps, x0) at step i; `alphas_prev[i]` is the cumulative alpha of the step it lands on.
    """
    x = x.float()
    for i in range(len(alphas_prev)):
        eps, x0 = model(x, i)
        a_prev = alphas_prev[i]
        x = a_prev**0.5 * x0.float() + (1 - a_prev) ** 0.5 * eps.float()
        if callback:
            callback(i, x)
    return x


def euler(model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    """Euler on the variance-exploding ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 2, no churn).

    `model(x, i)` returns the denoised estimate x0; x lives in the VE scaling x = x0 + sigma * noise.
    """
    x = x.float()
    for i in range(len(sigmas) - 1):
        x0 = model(x, i).float()
        d = (x - x0) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
        if callback:
            callback(i, x)
    return x
