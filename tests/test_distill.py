"""Few-step distillation: the maths against closed forms, adapter routing, and whole runs on tiny Qwen-Image and SD."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lightbooth import Generator
from lightbooth.errors import LightboothError
from lightbooth.families.base import Cond, Family, Preset, can_distill
from lightbooth.generate import Job
from lightbooth.safeload import load_safetensors, validate_safetensors
from lightbooth.sampling import samplers, schedules
from lightbooth.training.distill import methods
from lightbooth.training.distill.module import FAKE, STUDENT, adapter
from lightbooth.training.distill.run import DistillConfig, add_adapters, train_distill


def test_merged_schedule_keeps_both_grids_and_finds_the_students_points():
    teacher, student = schedules.flow_sigmas(8, shift=1.0), schedules.flow_sigmas(4, shift=3.0)
    grid, where = methods.merged_schedule(teacher, student)
    assert (grid[:-1] > grid[1:]).all() and grid[0] == 1 and grid[-1] == 0
    assert torch.allclose(grid[where], student.float(), atol=1e-6)
    assert len(grid) == len({round(float(s), 6) for s in torch.cat([teacher, student])})


def test_ode_states_and_trajectory_targets_reproduce_the_teachers_euler_path():
    a = torch.randn(3, 5)  # a linear velocity field v = a * x: Euler is x_{i+1} = x_i (1 + a ds)
    vel = lambda x, s: a * x  # noqa: E731
    x0 = torch.randn(3, 5)
    grid = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0])
    states = methods.ode_states(vel, x0, grid, [0, 2, 4])
    expect = x0.clone()
    for i in range(4):
        expect = expect * (1 + a * float(grid[i + 1] - grid[i]))
    assert torch.allclose(states[2], expect, atol=1e-6) and torch.equal(states[0], x0)
    student = grid[[0, 2, 4]]
    targets = methods.trajectory_targets(list(zip(states, states[1:])), student)
    x = states[0]  # a student that outputs the targets lands exactly on the teacher's states
    for i, v in enumerate(targets):
        x = x + float(student[i + 1] - student[i]) * v
        assert torch.allclose(x, states[i + 1], atol=1e-6)


def test_student_sample_backpropagates_only_through_the_chosen_step():
    w = torch.tensor(0.5, requires_grad=True)
    calls = []

    def vel(x, s):
        calls.append(torch.is_grad_enabled())
        return w * x

    noise, sigmas = torch.randn(2, 4), torch.tensor([1.0, 0.6, 0.2, 0.0])
    x0 = methods.student_sample(vel, noise, sigmas, stop=2, grad_at=2)
    assert calls == [False, False, True] and x0.requires_grad
    x1 = (noise * (1 - 0.4 * 0.5)) * (1 - 0.4 * 0.5)  # two Euler steps, then x0 = x - s v
    assert torch.allclose(x0, x1 - 0.2 * 0.5 * x1, atol=1e-6)
    calls.clear()
    full = methods.student_sample(vel, noise, sigmas)  # every step: the last Euler step is the x0 estimate
    assert calls == [False, False, False] and not full.requires_grad


def test_student_sample_follows_the_stochastic_sampler_when_given_fresh_noise():
    a, noise, sigmas = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1.0, 0.6, 0.2, 0.0])
    vel = lambda x, s: a * x  # noqa: E731
    fresh = [torch.randn(2, 4) for _ in range(2)]
    x0 = methods.student_sample(vel, noise, sigmas, stop=2, renoise=lambda i: fresh[i])
    x = noise
    for i in range(2):  # x0 estimate, then fresh noise to the next level
        x = (1 - sigmas[i + 1]) * (x - sigmas[i] * a * x) + sigmas[i + 1] * fresh[i]
    assert torch.allclose(x0, x - 0.2 * a * x, atol=1e-6)
    assert torch.equal(methods.student_sample(vel, noise, sigmas, stop=0, renoise=lambda i: fresh[i]),
                       methods.student_sample(vel, noise, sigmas, stop=0))  # the first step starts from noise


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    x0 = torch.randn(2, 3, 4, requires_grad=True)
    real, fake = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    methods.dmd_loss(x0, real, fake).backward()
    scale = (x0.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
    assert torch.allclose(x0.grad, (fake - real) / scale / x0.numel(), atol=1e-6)
    # descending it moves the sample toward the teacher's estimate and away from the fake score's
    moved = x0.detach() - 0.1 * x0.grad * x0.numel()
    assert ((moved - x0.detach()) * (real - fake)).sum() > 0


def test_adapter_routing_switches_layers_without_touching_requires_grad(qwen_dir):
    gen = Generator.load(qwen_dir, device="cpu")
    add_adapters(DistillConfig(out="x", method="dmd", rank=2), gen.family)
    den = gen.family.denoiser
    with torch.no_grad():
        for n, p in den.named_parameters():
            if f"lora_B.{FAKE}." in n:
                p.normal_()
    grads = {n: p.requires_grad for n, p in den.named_parameters()}
    x, cond = torch.randn(1, 64, 16), gen.encode(["a red circle"])
    out = {}
    for name in (None, STUDENT, FAKE):
        with adapter(den, name), torch.no_grad():
            out[name] = gen.family.velocity(x, cond, torch.tensor(0.5), 64, 64)
    assert torch.equal(out[None], out[STUDENT])  # the student starts as the teacher (zero LoRA B)
    assert not torch.allclose(out[None], out[FAKE])
    assert grads == {n: p.requires_grad for n, p in den.named_parameters()}
    assert sum(grads.values()) == sum(p.numel() > 0 for n, p in den.named_parameters() if "lora_" in n)


def max_fused_change(stock: torch.nn.Module, ours: torch.nn.Module, base: dict, atol: float) -> float:
    """Assert every weight stock diffusers fused equals ours; return how far the fused weights moved from `base`."""
    ours = dict(ours.named_parameters())
    moved = 0.0
    for n, p in stock.named_parameters():
        n = n.replace(".base_layer", "")
        if "lora_" not in n and n in ours:
            assert torch.allclose(p, ours[n], atol=atol), n
            moved = max(moved, float((ours[n] - base[n]).abs().max()))
    return moved


def run_cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), steps=2, batch_size=2, rank=4, teacher_steps=4, logger="none",
                checkpoint_every=1, keep=5, student_steps=2)
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["trajectory", "dmd"])
def test_distill_writes_a_lightning_format_lora_that_generate_and_diffusers_load(method, qwen_dir, tmp_path):
    path = train_distill(run_cfg(tmp_path, model=str(qwen_dir), method=method))
    assert path == tmp_path / "run" / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {"lora_down", "lora_up",
                                                                                         "alpha"}
    meta = validate_safetensors(path)
    assert json.loads(meta["lightbooth_preset"]) == {"steps": 2, "guidance": 1.0, "sampler": "flow_euler",
                                                     "shift": 3.0}
    provenance = json.loads(meta["lightbooth_distill"])
    assert provenance["method"] == method and provenance["teacher"] == str(qwen_dir)
    gen = Generator.load(qwen_dir, loras=[path], device="cpu")  # a Path works as well as a string
    s = gen.settings()
    assert (s.preset_name, s.preset.steps, s.preset.guidance, s.preset.shift) == ("lora", 2, 1.0, 3.0)
    img = gen("a red circle", seed=0)[0]
    assert img.size == (64, 64) and json.loads(img.info["lightbooth"])["steps"] == 2

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir))
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    assert max_fused_change(pipe.transformer, gen.family.denoiser, base, atol=1e-5) > 0
    lines = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_resume_auto_on_a_new_run_folder_says_that_it_starts_fresh(qwen_dir, tmp_path, capsys):
    path = train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", steps=1), resume="auto")
    assert path.is_file() and "--resume auto found no checkpoint" in capsys.readouterr().err


def test_a_resumed_run_ends_with_the_same_lora_as_an_uninterrupted_one(qwen_dir, tmp_path):
    straight = train_distill(run_cfg(tmp_path / "a", model=str(qwen_dir), method="dmd", steps=4, fake_updates=2))
    train_distill(run_cfg(tmp_path / "b", model=str(qwen_dir), method="dmd", steps=2, fake_updates=2))
    shutil.copytree(tmp_path / "b", tmp_path / "moved")  # a copied run folder resumes where it now is
    resumed = train_distill(run_cfg(tmp_path / "b", model=str(qwen_dir), method="dmd", steps=4, fake_updates=2),
                            resume="auto")
    moved = train_distill(run_cfg(tmp_path / "moved", model=str(qwen_dir), method="dmd", steps=4, fake_updates=2),
                          resume="auto")
    (a, meta_a), (b, meta_b) = load_safetensors(moved), load_safetensors(resumed)
    assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(straight), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    losses = lambda r: [json.loads(x)["loss"] for x in (r.parent / "losses.jsonl").read_text().splitlines()]  # noqa
    assert losses(straight) == losses(resumed)


def test_a_run_can_start_from_an_earlier_student_lora(qwen_dir, tmp_path):
    from lightbooth.lora import load_lora

    first = train_distill(run_cfg(tmp_path / "a", model=str(qwen_dir), method="trajectory", lr=1e-2))
    # lr 0: the warm-started student is exported untouched; another alpha must not change the updates it makes
    again = train_distill(run_cfg(tmp_path / "b", model=str(qwen_dir), method="trajectory", lr=0.0, alpha=2.0,
                                  init_lora=str(first)))
    family = Generator.load(qwen_dir, device="cpu", fast=False).family
    a, b = (load_lora(p, family.name, {family.denoiser_name: family.denoiser}) for p in (first, again))
    meta = validate_safetensors(again)
    assert a.keys() == b.keys() and any(layer.delta().abs().max() > 0 for layer in a.values())
    assert all(torch.allclose(a[k].delta(), b[k].delta(), atol=1e-7) for k in a)
    assert all(b[k].alpha == 2.0 for k in b) and json.loads(meta["lightbooth_distill"])["init_lora"] == str(first)
    with pytest.raises(LightboothError, match="rank 4 but the run trains rank 8; pass --rank 4"):
        train_distill(run_cfg(tmp_path / "c", model=str(qwen_dir), method="trajectory", rank=8, init_lora=str(first)))
    with pytest.raises(LightboothError, match="starting LoRA .* not found"):
        train_distill(run_cfg(tmp_path / "d", model=str(qwen_dir), init_lora=str(tmp_path / "none.safetensors")))


def test_a_fake_warmup_trains_the_critic_and_leaves_a_warm_started_student_alone(qwen_dir, tmp_path):
    first = train_distill(run_cfg(tmp_path / "a", model=str(qwen_dir), method="trajectory", lr=1e-2))
    run = tmp_path / "dmd"
    train_distill(run_cfg(run, model=str(qwen_dir), method="dmd", steps=3, fake_updates=1, lr=1e-2, fake_lr=1e-2,
                          fake_warmup=2, init_lora=str(first)))  # a student update on step 3 only

    def lora_b(step: int, name: str) -> torch.Tensor:
        ckpt = torch.load(run / "run" / "checkpoints" / f"step-{step:08d}.ckpt", map_location="cpu",
                          weights_only=True)
        b = [v.flatten() for k, v in sorted(ckpt["state_dict"].items()) if f"lora_B.{name}." in k]
        assert b
        return torch.cat(b)

    assert lora_b(1, STUDENT).abs().max() > 0  # warm-started: not a zero LoRA
    assert torch.equal(lora_b(1, STUDENT), lora_b(2, STUDENT))  # left alone while the critic warms up
    assert not torch.equal(lora_b(1, FAKE), lora_b(2, FAKE))  # ... which it does
    assert not torch.allclose(lora_b(2, STUDENT), lora_b(3, STUDENT))  # then trained


def test_dmd_compares_the_scores_at_levels_spread_by_their_own_shift(qwen_dir, tmp_path):
    from lightbooth.seeds import draw_seed
    from lightbooth.training.distill.module import DistillModule

    family = Generator.load(qwen_dir, device="cpu", fast=False).family
    sigmas = torch.tensor([1.0, 0.75, 0.0])
    u = torch.rand(6, generator=torch.Generator().manual_seed(draw_seed(0, 3, 1))).clamp(0.02, 0.98)
    levels = {}
    for level_shift in (None, 1.0, 3.0):
        cfg = run_cfg(tmp_path, model=str(qwen_dir), dmd_level_shift=level_shift)
        levels[level_shift] = DistillModule(cfg, family, family.presets["base"], sigmas, (64, 64)).levels(3, 6, 1)
    assert torch.allclose(levels[1.0], u)  # shift 1: even over [0.02, 0.98]
    assert torch.allclose(levels[None], 3 * u / (1 + 2 * u)) and torch.equal(levels[None], levels[3.0])


def test_a_stochastic_student_trains_on_its_own_re_noised_states_and_generate_samples_it_so(qwen_dir, tmp_path):
    euler = train_distill(run_cfg(tmp_path / "e", model=str(qwen_dir), method="dmd"))
    path = train_distill(run_cfg(tmp_path / "s", model=str(qwen_dir), method="dmd", sampler="flow_stochastic"))
    meta = validate_safetensors(path)
    assert json.loads(meta["lightbooth_preset"]) == {"steps": 2, "guidance": 1.0, "sampler": "flow_stochastic",
                                                     "shift": 3.0}
    gen = Generator.load(qwen_dir, loras=[path], device="cpu")
    assert gen.settings().preset.sampler == "flow_stochastic"
    assert json.loads(gen("a red circle", seed=0)[0].info["lightbooth"])["sampler"] == "flow_stochastic"
    # the same seed and draws otherwise (seed 0 trains step 2 of 2 at both steps): its inputs are re-noised
    with safe_open(str(euler), "pt") as a, safe_open(str(path), "pt") as b:
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_student_whose_first_steps_are_euler_steps_says_so_and_trains_on_those_states(qwen_dir, tmp_path):
    a, noise, sigmas = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1.0, 0.6, 0.2, 0.0])
    vel = lambda x, s: a * x  # noqa: E731
    fresh = [torch.randn(2, 4) for _ in range(2)]
    x1 = noise - 0.4 * a * noise  # step 0 is an Euler step, step 1 re-noises
    x2 = 0.8 * (x1 - 0.6 * a * x1) + 0.2 * fresh[1]
    got = methods.student_sample(vel, noise, sigmas, stop=2, renoise=lambda i: fresh[i], euler_steps=1)
    assert torch.allclose(got, x2 - 0.2 * a * x2, atol=1e-6)
    path = train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="dmd", sampler="flow_stochastic",
                                 euler_steps=1))
    assert json.loads(validate_safetensors(path)["lightbooth_preset"])["euler_steps"] == 1
    gen = Generator.load(qwen_dir, loras=[path], device="cpu")
    assert json.loads(gen("a red circle", seed=0)[0].info["lightbooth"])["euler_steps"] == 1


def test_a_cosine_schedule_ends_at_a_tenth_of_both_learning_rates(qwen_dir, tmp_path):
    train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="dmd", fake_updates=2, lr=2e-3, fake_lr=1e-3,
                          lr_schedule="cosine", steps=3))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-00000003.ckpt", map_location="cpu",
                      weights_only=True)
    (sched,) = ckpt["lr_schedulers"]
    assert sched["_last_lr"] == pytest.approx([2e-4, 1e-4])
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == pytest.approx([2e-4, 1e-4])


def test_student_states_follow_the_students_own_euler_steps():
    vel = lambda x, s: x * s.view(-1, 1)  # noqa: E731
    sig = torch.tensor([1.0, 0.5, 0.0])
    out = methods.student_states(vel, torch.ones(2, 3), sig)
    assert len(out) == 2 and torch.equal(out[0], torch.ones(2, 3))
    assert torch.allclose(out[1], torch.full((2, 3), 0.5))  # 1 + (0.5 - 1) * 1 * 1


@pytest.mark.parametrize("states", ["teacher", "student"])
def test_trajectory_distillation_brings_the_few_step_student_toward_the_teacher(states, qwen_dir, tmp_path):
    prompts, seeds = ["a red circle", "三个绿色三角形", "a blue square on the left"], [0, 1]

    def gap(student: Generator, **kw) -> float:
        a = teacher(prompts, seed=seeds, num_images=2, steps=4, guidance=4.0)
        b = student(prompts, seed=seeds, num_images=2, **kw)
        return float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)]))

    teacher = Generator.load(qwen_dir, device="cpu")
    before = gap(teacher, steps=2, guidance=1.0, preset="lightning")
    path = train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", steps=30, lr=1e-3, rank=8,
                                 teacher_guidance=4.0, checkpoint_every=100, seed=1, states=states))
    after = gap(Generator.load(qwen_dir, loras=[str(path)], device="cpu"))
    assert after < 0.8 * before, (before, after)


def test_personalize_then_go_fast_by_stacking_or_by_distilling_the_personalized_teacher(qwen_dir, tmp_path):
    from diffusers import QwenImagePipeline

    from lightbooth.data import shapes
    from lightbooth.training.dreambooth import DreamBoothConfig, train_dreambooth

    inst = tmp_path / "subject"
    inst.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        shapes.render_subject(rng=rng).save(inst / f"{i}.png")
    subject = str(train_dreambooth(DreamBoothConfig(
        instance_dir=str(inst), class_noun="star", out=str(tmp_path / "db"), model=str(qwen_dir), steps=2, lr=1e-2,
        rank=4, prior=False, validation_prompt=[], logger="none")))
    fast = str(train_distill(run_cfg(tmp_path / "fast", model=str(qwen_dir), method="trajectory", lr=1e-2)))

    # 1. stacked, in either order: the distilled LoRA's schedule, and the weights stock diffusers fuses from both
    for loras in ([fast, subject], [subject, fast]):
        gen = Generator.load(qwen_dir, loras=loras, device="cpu")
        assert (gen.settings().preset_name, gen.settings().preset.steps, gen.settings().preset.guidance) == (
            "lora", 2, 1.0)
    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir))
    pipe.load_lora_weights(fast, adapter_name="fast")
    pipe.load_lora_weights(subject, adapter_name="subject")
    pipe.set_adapters(["fast", "subject"])
    pipe.fuse_lora(adapter_names=["fast", "subject"])
    base = dict(Generator.load(qwen_dir, device="cpu").family.denoiser.named_parameters())
    assert max_fused_change(pipe.transformer, gen.family.denoiser, base, atol=1e-5) > 0

    # 2. distilled from the personalized teacher (the subject fused into it): the same run as `fast` but for the
    # teacher ends with other weights, the provenance names the subject, and generation stacks the two files
    personal = train_distill(run_cfg(tmp_path / "pfast", model=str(qwen_dir), method="trajectory", lr=1e-2,
                                     loras=[subject]))
    assert json.loads(validate_safetensors(personal)["lightbooth_distill"])["teacher_loras"] == [subject]
    with safe_open(fast, "pt") as a, safe_open(str(personal), "pt") as b:
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys() if "lora_up" in k)
    gen = Generator.load(qwen_dir, loras=[subject, str(personal)], device="cpu")
    img = gen("a qzx star", seed=0)[0]
    assert json.loads(img.info["lightbooth"])["steps"] == 2


def test_distill_refuses_bad_settings(qwen_dir, sd_dir, tmp_path):
    with pytest.raises(LightboothError, match="student-steps"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), student_steps=3))
    with pytest.raises(LightboothError, match="unknown --states"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", states="both"))
    with pytest.raises(LightboothError, match="applies to --method trajectory only"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="dmd", states="student"))
    with pytest.raises(LightboothError, match="unknown method"):
        train_distill(run_cfg(tmp_path, model=str(sd_dir), method="magic"))
    with pytest.raises(LightboothError, match="unknown --lr-schedule 'linear'"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), lr_schedule="linear"))
    with pytest.raises(LightboothError, match="--fake-warmup applies to --method dmd only"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", fake_warmup=10))
    with pytest.raises(LightboothError, match="--fake-warmup must be 0 or more"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), fake_warmup=-1))
    with pytest.raises(LightboothError, match="--fake-warmup 2 leaves the student no step of --steps 2"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="dmd", fake_warmup=2))
    with pytest.raises(LightboothError, match="--dmd-level-shift applies to --method dmd only"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", dmd_level_shift=1.0))
    with pytest.raises(LightboothError, match="unknown --sampler 'ddim'"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), sampler="ddim"))
    with pytest.raises(LightboothError, match="--sampler flow_stochastic applies to --method dmd only"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", sampler="flow_stochastic"))
    for bad in (dict(euler_steps=2), dict(euler_steps=-1, sampler="flow_stochastic")):
        with pytest.raises(LightboothError, match="--euler-steps .*only with --sampler flow_stochastic"):
            train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="dmd", **bad))
    for bad in (0.0, -1.0):  # NaN: the type checks of every config (below)
        with pytest.raises(LightboothError, match="--dmd-level-shift must be positive"):
            train_distill(run_cfg(tmp_path, model=str(qwen_dir), dmd_level_shift=bad))
    for guidance in (-5.0, 0.5):
        with pytest.raises(LightboothError, match="--teacher-guidance must be 1 or more"):
            train_distill(run_cfg(tmp_path, model=str(qwen_dir), teacher_guidance=guidance))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert can_distill(Generator.load(sd_dir, device="cpu").family) and not can_distill(Family.__new__(Family))


def test_python_configs_get_the_type_checks_of_the_cli(qwen_dir, tmp_path):
    with pytest.raises(LightboothError, match="'shift' of DistillConfig must be a finite number, got nan"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), shift=float("nan")))  # was a NaN loss after the start
    with pytest.raises(LightboothError, match="'steps' of DistillConfig must be a whole number, got '2'"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), steps="2"))
    with pytest.raises(LightboothError, match="none.safetensors does not exist"):  # one LoRA without a list
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), loras=str(tmp_path / "none.safetensors")))
    assert not (tmp_path / "run").exists()


def test_distill_command_line_runs_and_rejects_bad_input_in_one_line(qwen_dir, tmp_path, capsys):
    from lightbooth.cli import main

    run = tmp_path / "cli"
    args = ["distill", "--model", str(qwen_dir), "--out", str(run), "--steps", "1", "--batch-size", "1",
            "--teacher-steps", "2", "--student-steps", "1", "--method", "trajectory", "--logger", "none",
            "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("lora.safetensors") and (run / "lora.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    assert main(args) == 2  # the run folder exists: refused, nothing touched
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main([*args[:-6], "--method", "magic", "--overwrite"]) == 2
    assert "unknown method" in capsys.readouterr().err and (run / "lora.safetensors").is_file()


def test_distill_refuses_bad_prompts_files_starting_loras_and_numbers_before_touching_the_run(qwen_dir, tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("\n  \n")
    binary.write_bytes(b"\xff\xfe a red circle\n")
    refused = [(dict(prompts_file=str(empty)), "has no prompts"), (dict(prompts_file=str(binary)), "UTF-8"),
               (dict(prompts_file=str(tmp_path / "none.txt")), "not found"), (dict(lr=-1.0), "--lr must be 0 or more"),
               (dict(fake_lr=-1.0), "--fake-lr must be 0 or more"), (dict(alpha=-1.0), "--alpha must be positive"),
               (dict(seed=-1), "--seed must be 0 or more"), (dict(threads=-1), "--threads must be 0 or more")]
    for kw, needle in refused:
        with pytest.raises(LightboothError, match=needle):
            train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", **kw))
    first = train_distill(run_cfg(tmp_path, out=str(tmp_path / "first"), model=str(qwen_dir), method="trajectory",
                                  steps=1))
    with pytest.raises(LightboothError, match="has rank 4 but the run trains rank 8; pass --rank 4"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory", rank=8, init_lora=str(first)))
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(LightboothError, match="not a readable training checkpoint"):
        train_distill(run_cfg(tmp_path, model=str(qwen_dir), method="trajectory"),
                      resume=str(tmp_path / "truncated.ckpt"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # --overwrite of a run folder that holds this run's own starting LoRA would delete it: refused, the file kept
    with pytest.raises(LightboothError, match="--overwrite would delete"):
        train_distill(run_cfg(tmp_path, out=str(tmp_path / "first"), model=str(qwen_dir), method="trajectory",
                              init_lora=str(first)), overwrite=True)
    assert first.is_file()
    # a checkpoint of another run (here: of rank 4, into a rank-8 run) is refused, not silently half-loaded
    ckpt = sorted((tmp_path / "first" / "checkpoints").glob("step-*.ckpt"))[-1]
    with pytest.raises(LightboothError, match="holds other weights than this run trains"):
        train_distill(run_cfg(tmp_path, out=str(tmp_path / "other"), model=str(qwen_dir), method="trajectory",
                              rank=8), resume=str(ckpt))
    assert not (tmp_path / "other").exists()  # the refused start leaves no folder that would need --overwrite
    kept = tmp_path / "kept"  # a folder the user made (empty, so only the fresh-folder rule can spare it) stays
    kept.mkdir()
    with pytest.raises(LightboothError, match="holds other weights than this run trains"):
        train_distill(run_cfg(tmp_path, out=str(kept), model=str(qwen_dir), method="trajectory", rank=8),
                      resume=str(ckpt))
    assert kept.is_dir()


# --- Stable Diffusion: the UNet as a rectified flow ------------------------------------------------------------------
def _ddpm_x0(family, out, x, a):
    """The UNet's own clean estimate, written out from the DDPM definitions (Ho et al. eq. 4; Salimans & Ho sec. 4)."""
    if family.prediction == "v_prediction":
        return a**0.5 * x - (1 - a) ** 0.5 * out
    return (x - (1 - a) ** 0.5 * out) / a**0.5


@pytest.mark.parametrize("model", ["sd_dir", "sd_v_dir"])
def test_sd_velocity_is_the_unets_own_prediction_at_the_matching_timestep(model, request):
    gen = Generator.load(request.getfixturevalue(model), device="cpu")
    fam = gen.family
    ts = torch.tensor([999, 500, 37])
    a = fam.ac[ts]
    s = schedules.flow_sigma(a)
    assert torch.allclose(schedules.ddpm_timestep(fam.ac, s), ts.float(), atol=1e-3)
    assert torch.allclose(schedules.vp_alpha(s), a, rtol=1e-5) and abs(float(s[0]) - fam.sigma_max) < 1e-6
    torch.manual_seed(0)
    xt = torch.randn(3, 4, 8, 8)  # DDPM states at the three timesteps
    c3 = Cond(gen.encode(["a red circle"]).embeds.expand(3, -1, -1))
    with torch.no_grad():
        v = fam.velocity(xt / schedules.vp_scale(s).view(-1, 1, 1, 1), c3, s, 16, 16)
        x0_flow = methods.x0_estimate(xt / schedules.vp_scale(s).view(-1, 1, 1, 1), v, s)
        out = fam.denoiser(xt, ts, encoder_hidden_states=c3.embeds, return_dict=False)[0]
    assert torch.allclose(x0_flow, _ddpm_x0(fam, out, xt, a.view(-1, 1, 1, 1)), rtol=1e-4, atol=1e-4)
    # guided: CFG on the UNet output, as the DDIM sampler does it (the velocity is linear in that output)
    unc = Cond.cat([gen.encode([""])] * 3)
    with torch.no_grad():
        vg = fam.velocity(xt / schedules.vp_scale(s).view(-1, 1, 1, 1), c3, s, 16, 16, unc, 5.0)
        vu = fam.velocity(xt / schedules.vp_scale(s).view(-1, 1, 1, 1), unc, s, 16, 16)
    assert torch.allclose(vg, vu + 5.0 * (v - vu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["sd_dir", "sd_v_dir"])
def test_sd_ddim_is_flow_euler_on_its_own_levels_and_a_fine_flow_grid_matches_its_samplers(model, request):
    gen = Generator.load(request.getfixturevalue(model), device="cpu")
    fam = gen.family
    cond, unc, x = gen.encode(["a red circle"]), gen.encode([""]), fam.noise(0, 16, 16)

    def flow(grid):  # the teacher's ODE in flow coordinates from DDPM unit noise, back to DDPM scale at the end
        vel = lambda y, i: fam.velocity(y, cond, grid[i], 16, 16, unc, 3.0)  # noqa: E731
        with torch.inference_mode():
            y = samplers.flow_euler(vel, x / schedules.vp_scale(grid[0]), grid)
        return y * schedules.vp_scale(grid[-1])

    ddim = fam.sample(x, cond, unc, Preset(10, 3.0, "ddim"), 16, 16)
    levels = fam.schedule(Preset(10, 3.0, "ddim"))
    levels[-1] = schedules.flow_sigma(fam.ac[0])  # this DDIM lands on alpha_0 (set_alpha_to_one=False), not 0
    assert torch.allclose(flow(levels), ddim, rtol=1e-4, atol=1e-4)
    # a different discretisation of the same ODE: flow Euler on 200 even levels vs the Euler sampler's 100 steps
    euler = fam.sample(x, cond, unc, Preset(100, 3.0, "euler"), 16, 16)
    fine = flow(torch.linspace(float(fam.schedule(Preset(100, 3.0, "euler"))[0]), 0, 201))
    assert (fine - euler).abs().mean() < 0.02 * euler.abs().mean(), ((fine - euler).abs().mean(), euler.abs().mean())


def test_sd_student_schedule_starts_at_the_top_trained_level(sd_dir):
    fam = Generator.load(sd_dir, device="cpu").family
    sig = fam.schedule(Preset(4, 1.0, "flow_euler", shift=2.0))
    assert torch.allclose(sig, schedules.flow_sigmas(4, shift=2.0) * fam.sigma_max)
    assert torch.allclose(schedules.ddpm_timestep(fam.ac, sig[:-1]), torch.tensor([999.0, 748.0, 507.0, 211.0]),
                          atol=1.0)


@pytest.mark.parametrize("method,model", [("trajectory", "sd_dir"), ("dmd", "sd_v_dir")])
def test_sd_distill_writes_a_kohya_lora_that_generate_and_diffusers_load(method, model, request, tmp_path, capsys):
    model_dir = request.getfixturevalue(model)
    path = train_distill(run_cfg(tmp_path, model=str(model_dir), method=method, student_steps=4, lr=1e-3))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any("_resnets_" in k and k.endswith("_conv1.lora_down.weight") for k in keys)  # LCM-LoRA's conv targets
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {"lora_down", "lora_up",
                                                                                         "alpha"}
    meta = validate_safetensors(path)
    assert json.loads(meta["lightbooth_preset"]) == {"steps": 4, "guidance": 1.0, "sampler": "flow_euler",
                                                     "shift": 3.0}
    from lightbooth.cli import main

    assert main(["generate", "a red circle", "--model", str(model_dir), "--lora", str(path), "--out",
                 str(tmp_path / "img"), "--device", "cpu"]) == 0
    png = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    from PIL import Image

    info = json.loads(Image.open(png).info["lightbooth"])
    assert (info["preset"], info["steps"], info["guidance"], info["sampler"]) == ("lora", 4, 1.0, "flow_euler")
    gen = Generator.load(model_dir, loras=[path], device="cpu")
    assert gen.settings().preset == Preset(4, 1.0, "flow_euler", shift=3.0)
    calls = []
    gen.run([Job("a red circle", 0)], gen.settings(), callback=lambda i, x: calls.append(i))
    assert calls == [0, 1, 2, 3]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    assert max_fused_change(pipe.unet, gen.family.denoiser, base, atol=1e-6) > 1e-4  # the LoRA did change the UNet, and diffusers applied every layer of it


def test_sd_trajectory_distillation_brings_the_few_step_student_toward_the_teacher(sd_v_dir, tmp_path):
    # v prediction: the random eps UNet's x0 = (x - sqrt(1 - a) eps) / sqrt(a) makes a far stiffer field at the top
    prompts, seeds = ["a red circle", "三个绿色三角形", "a blue square on the left"], [0, 1]

    def latents(gen: Generator, preset: Preset) -> torch.Tensor:  # compared where the student is trained
        fam = gen.family
        x = torch.cat([fam.noise(seed, 16, 16) for _ in prompts for seed in seeds])
        uncond = gen.encode([""] * len(x)) if preset.guidance != 1 else None
        return fam.sample(x, gen.encode([p for p in prompts for _ in seeds]), uncond, preset, 16, 16)

    teacher = Generator.load(sd_v_dir, device="cpu")
    target = latents(teacher, Preset(32, 4.0, "flow_euler", shift=1.0))  # the teacher's ODE from the top level
    student = Preset(2, 1.0, "flow_euler", shift=3.0)  # what run_cfg distills into
    before = float((latents(teacher, student) - target).abs().mean())
    path = train_distill(run_cfg(tmp_path, model=str(sd_v_dir), method="trajectory", steps=40, lr=3e-3, rank=8,
                                 teacher_guidance=4.0, teacher_steps=8, checkpoint_every=100, seed=1))
    distilled = Generator.load(sd_v_dir, loras=[str(path)], device="cpu")
    assert distilled.settings().preset == student
    after = float((latents(distilled, student) - target).abs().mean())
    assert after < 0.8 * before, (before, after)
