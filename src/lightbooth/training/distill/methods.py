"""Few-step distillation maths in rectified-flow coordinates, as pure functions of tensors and velocity functions.

Conventions (rectified flow): x_s = (1 - s) x0 + s n at noise level s in [0, 1], velocity v = n - x0, so a
clean-image estimate is x0 = x_s - s v and an Euler step from s to s' is x + (s' - s) v. A "velocity function"
is `f(x, sigma) -> v` with `sigma` a (B,) tensor; the caller binds prompts, guidance and which LoRA is active.

Two methods:
- trajectory regression (the baseline): the student's one Euler step over a segment of its schedule must land where
  the teacher's ODE solution lands (progressive distillation, Salimans & Ho 2022, done in one stage), each segment
  starting on the teacher's path or on the student's own (backward distillation, Kohler et al. 2024);
- DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", eq. 7-8, with DMD2's
  normalisation, two-time-scale updates and backward simulation of the multi-step student, Yin et al. 2024b,
  sec. 4.1 and 4.5): the student's samples are pushed along the difference between a "fake" score trained on
  them and the teacher's score, which matches distributions instead of single trajectories.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...sampling import samplers

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A noise level as a (B,) tensor on x's device."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *[1] * (x.dim() - 1))


def x0_estimate(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - _bcast(sigma, x) * v


def merged_schedule(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The teacher's sigmas with the student's inserted (descending, no repeats), and where the student's lie.

    The teacher's ODE is solved on this grid so its state at every student sigma is exact, not interpolated.
    """
    merged = sorted({round(float(s), 6) for s in teacher} | {round(float(s), 6) for s in student}, reverse=True)
    where = [merged.index(round(float(s), 6)) for s in student]
    return torch.tensor(merged), where


@torch.no_grad()
def ode_states(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, keep: list[int]) -> list[torch.Tensor]:
    """Euler along `sigmas` from x (at sigmas[0]); the states at the indices in `keep`."""
    out, x = {}, x.float()
    for i in range(len(sigmas)):
        if i in keep:
            out[i] = x
        if i + 1 < len(sigmas):
            x = x + float(sigmas[i + 1] - sigmas[i]) * velocity(x, _per_sample(sigmas[i], x)).float()
    return [out[i] for i in keep]


def trajectory_targets(segments: list[tuple[torch.Tensor, torch.Tensor]], sigmas: torch.Tensor) -> list[torch.Tensor]:
    """Velocities that take one Euler step over each segment (start at sigmas[i], end at sigmas[i+1])."""
    return [(b - a) / float(sigmas[i + 1] - sigmas[i]) for i, (a, b) in enumerate(segments)]


@torch.no_grad()
def student_states(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The states the student's own Euler sampling passes through, at every level of its schedule but the last."""
    x, out = noise.float(), []
    for i in range(len(sigmas) - 1):
        out.append(x)
        x = x + float(sigmas[i + 1] - sigmas[i]) * velocity(x, _per_sample(sigmas[i], x)).float()
    return out


def student_sample(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, stop: int | None = None,
                   grad_at: int | None = None, renoise: Callable[[int], torch.Tensor] | None = None,
                   euler_steps: int = 0) -> torch.Tensor:
    """The student's clean-image estimate after running its schedule from noise.

    With `stop = j`, steps 0..j-1 run without gradients and step j returns its x0 estimate (with gradients when
    `grad_at == j`): DMD2's backward simulation, so the student is trained on the inputs it meets at inference.
    The steps before j are the student's own sampler: Euler, or with `renoise` (fresh noise after step i) the
    re-noising "flow_stochastic" one (its first `euler_steps` steps Euler steps). `stop=None` runs every step (the
    last one's x0 estimate is the sample).
    """
    stop = len(sigmas) - 2 if stop is None else stop
    with torch.no_grad():
        def step(x, i):
            return velocity(x, _per_sample(sigmas[i], x))
        head = sigmas[:stop + 1]  # ends at the level of step `stop`, which the loop below reaches but does not take
        x = (samplers.flow_euler(step, noise, head) if renoise is None
             else samplers.flow_stochastic(step, noise, head, renoise, euler_steps=euler_steps))
    s = _per_sample(sigmas[stop], x)
    with torch.set_grad_enabled(grad_at == stop and torch.is_grad_enabled()):
        return x0_estimate(x, velocity(x, s).float(), s)


def dmd_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Distribution matching: a surrogate whose gradient wrt `x0` is (fake - real) / mean|x0 - real| per sample.

    `x0_real` / `x0_fake` are the teacher's and the fake score's clean estimates from the same re-noised x0.
    """
    with torch.no_grad():
        dims = list(range(1, x0.dim()))
        scale = (x0 - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
        grad = (x0_fake - x0_real) / scale
    return 0.5 * (x0.float() - (x0 - grad).detach().float()).pow(2).mean()


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise
