"""The pure schedule and guidance functions against diffusers' schedulers, which are the reference."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from lightbooth.sampling import guidance, samplers, schedules


@pytest.mark.parametrize("steps,seq", [(2, 16), (4, 64), (8, 4096), (50, 1024)])
def test_flow_dynamic_shift_matches_qwen_scheduler(steps, seq):
    cfg = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
               shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = schedules.dynamic_shift_mu(seq, 256, 8192, 0.5, 0.9)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = schedules.flow_sigmas(steps, mu=mu, shift_terminal=0.02)
    assert torch.allclose(ours, ref.sigmas, atol=1e-6), (ours, ref.sigmas)
    assert ours[-1] == 0 and len(ours) == steps + 1


def test_one_step_schedule_with_terminal_is_finite():
    # diffusers' stretch divides by zero at one step (its sigmas are NaN); ours stays [1, 0]
    assert schedules.flow_sigmas(1, mu=0.7, shift_terminal=0.02).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_fixed_shift_equals_its_released_scheduler_config(steps):
    # the Qwen-Image-Lightning README states shift 3 as exponential shifting with mu = log(3)
    ref = FlowMatchEulerDiscreteScheduler(base_shift=math.log(3), max_shift=math.log(3), shift=1.0,
                                          shift_terminal=None, time_shift_type="exponential",
                                          use_dynamic_shifting=True)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(3))
    assert torch.allclose(schedules.flow_sigmas(steps, shift=3.0), ref.sigmas, atol=1e-6)


def test_flow_stochastic_takes_the_steps_of_diffusers_stochastic_flow_scheduler():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    assert torch.allclose(ref.sigmas, schedules.flow_sigmas(4, shift=3.0), atol=1e-6)
    a, x = torch.randn(2, 6), torch.randn(2, 6)
    model = lambda xt, i: a * xt + float(ref.sigmas[i])  # noqa: E731  (any velocity that depends on both)
    g, ours_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expect, seen = x.clone(), []
    for i, t in enumerate(ref.timesteps):
        expect = ref.step(model(expect, i), t, expect, generator=g, return_dict=False)[0]
    ours = samplers.flow_stochastic(model, x, ref.sigmas, lambda i: torch.randn(x.shape, generator=ours_g),
                                    callback=lambda i, xt: seen.append(xt))
    assert torch.allclose(ours, expect, atol=1e-5) and len(seen) == 4
    # Euler reuses the predicted noise instead: the same model lands elsewhere
    assert not torch.allclose(samplers.flow_euler(model, x, ref.sigmas), ours, atol=1e-3)


def test_flow_stochastic_takes_its_first_euler_steps_as_euler_and_only_then_draws_fresh_noise():
    sigmas = schedules.flow_sigmas(8, shift=3.0)
    a, x = torch.randn(2, 6), torch.randn(2, 6)
    model = lambda xt, i: a * xt + float(sigmas[i])  # noqa: E731
    euler, drawn, mixed = [], [], []
    samplers.flow_euler(model, x, sigmas, callback=lambda i, xt: euler.append(xt))

    def noise(i):
        drawn.append(i)
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
    out = samplers.flow_stochastic(model, x, sigmas, noise, callback=lambda i, xt: mixed.append(xt), euler_steps=3)
    assert all(torch.allclose(e, m) for e, m in zip(euler[:3], mixed[:3]))  # the same states up to step 3
    assert drawn == [3, 4, 5, 6]  # fresh noise after steps 3-6 only; the last step returns the clean estimate
    assert not torch.allclose(out, euler[-1], atol=1e-3)
    # as many Euler steps as steps is plain Euler, and none is the re-noising sampler of the test above
    assert torch.allclose(samplers.flow_stochastic(model, x, sigmas, noise, euler_steps=8), euler[-1])
    assert torch.equal(samplers.flow_stochastic(model, x, sigmas, noise, euler_steps=0),
                       samplers.flow_stochastic(model, x, sigmas, noise))
    # without a source of fresh noise: a message naming the fix, not a TypeError; all-Euler needs none
    with pytest.raises(ValueError, match="needs fresh noise"):
        samplers.flow_stochastic(model, x, sigmas, None, euler_steps=3)
    assert torch.allclose(samplers.flow_stochastic(model, x, sigmas, None, euler_steps=8), euler[-1])


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_discrete_timesteps_match_ddim(spacing, offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    for steps in (1, 7, 50):
        ref.set_timesteps(steps)
        assert schedules.discrete_timesteps(steps, 1000, spacing, offset).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_sigmas_match(spacing):
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing=spacing,
              steps_offset=1)
    ref = EulerDiscreteScheduler(**kw)
    ref.set_timesteps(20)
    ac = schedules.alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
    assert torch.allclose(ac, ref.alphas_cumprod)
    ts = schedules.discrete_timesteps(20, 1000, spacing, 1, integer=False)
    assert np.allclose(ts, ref.timesteps.numpy())
    assert torch.allclose(schedules.karras_free_sigmas(ac, ts), ref.sigmas, rtol=1e-5)


def test_cfg_norm_rescale_keeps_conditional_norm():
    torch.manual_seed(0)
    c, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = guidance.cfg_norm_rescale(c, u, 4.0)
    assert torch.allclose(out.norm(dim=-1), c.norm(dim=-1), atol=1e-5)
    direction = guidance.cfg(c, u, 4.0)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), direction / direction.norm(dim=-1, keepdim=True),
                          atol=1e-6)
    assert torch.allclose(guidance.cfg(c, u, 1.0), c, atol=1e-6)


def test_ddpm_states_are_rescaled_flow_states_and_timesteps_match_diffusers_sigma_to_t():
    ac = schedules.alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
    s = schedules.flow_sigma(ac.double())
    assert torch.allclose(schedules.vp_alpha(s), ac.double(), rtol=1e-10)
    torch.manual_seed(0)
    x0, n = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    a, sv = ac[[10, 900]].double().view(-1, 1), s[[10, 900]].view(-1, 1)
    assert torch.allclose(schedules.vp_scale(sv) * ((1 - sv) * x0 + sv * n), a.sqrt() * x0 + (1 - a).sqrt() * n)
    assert schedules.vp_scale(torch.tensor(1.0)) == 1 and schedules.vp_scale(torch.tensor(0.0)) == 1
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sig = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    probe = np.concatenate([np.exp(np.linspace(-4, 3, 200)), sig[[0, 1, 500, 998, 999]].numpy()])  # in and out of range
    want = ref._sigma_to_t(probe, np.log(sig.numpy()))
    got = schedules.ddpm_timestep(ac, schedules.ve_to_flow(torch.from_numpy(probe)))
    assert np.allclose(got.numpy(), want, atol=2e-3), np.abs(got.numpy() - want).max()
