"""The built-in model ships in the package, loads offline with lightbooth and with stock diffusers."""

import json
import math

import numpy as np
import pytest
import torch

from lightbooth import builtin_model_path
from lightbooth.cli import main
from lightbooth.images import read_params


def test_builtin_model_is_a_small_diffusers_folder():
    path = builtin_model_path()
    assert (path / "model_index.json").is_file()
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024, size
    assert not [f for f in path.rglob("*") if f.suffix in (".bin", ".pt", ".ckpt", ".pth")]


def test_generate_without_model_uses_the_builtin(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "a large red circle in the center, white background", "--out", str(tmp_path),
                 "--steps", "4"]) == 0
    path = capsys.readouterr().out.split()[0]
    meta = read_params(path)
    assert meta["model"] == "builtin" and meta["width"] == 64 and meta["family"] == "qwen-image"


def test_stock_diffusers_runs_the_builtin_model():
    from diffusers import QwenImagePipeline

    from lightbooth import Generator

    pipe = QwenImagePipeline.from_pretrained(builtin_model_path())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a blue square", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4, height=64,
               width=64, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    gen = Generator.load(device="cpu", preset="base")
    assert not gen.settings().preset.cfg_rescale  # the built-in teacher's own CFG is plain (BENCHMARKS.md)
    ours = gen("a blue square", negative_prompt=" ", guidance=4.0, steps=4, seed=3, cfg_rescale=True)[0]  # stock's
    assert np.abs(np.asarray(ours).astype(int) - np.round(ref * 255)).max() <= 1


def test_the_builtin_default_is_a_shipped_4_step_lora_that_stock_diffusers_runs_too():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from lightbooth import Generator

    path = builtin_model_path()
    settings = json.loads((path / "lightbooth.json").read_text())
    preset = settings["presets"][settings["default_preset"]]
    assert (preset["steps"], preset["guidance"], preset["shift"], preset["sampler"]) == (4, 1.0, 3.0, "flow_stochastic")
    assert {p["steps"] for p in settings["presets"].values() if p.get("lora")} == {4, 8}
    pipe = QwenImagePipeline.from_pretrained(path)
    # the released Lightning LoRAs' scheduler: shift 3 as exponential shifting with mu = log(3)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, base_shift=math.log(3), max_shift=math.log(3), shift=1.0, shift_terminal=None,
        time_shift_type="exponential", use_dynamic_shifting=True)
    pipe.set_progress_bar_config(disable=True)

    def stock():
        return np.round(pipe("a blue square", true_cfg_scale=1.0, num_inference_steps=4, height=64, width=64,
                             generator=torch.Generator().manual_seed(3), output_type="np").images[0] * 255)

    plain = stock()
    pipe.load_lora_weights(str(path / preset["lora"]))
    pipe.fuse_lora()
    ref = stock()
    gen = Generator.load(device="cpu")
    assert gen.settings().preset.steps == 4
    # the preset re-noises with fresh noise (stock: stochastic_sampling=True, whose steps test_sampling checks);
    # on stock's own Euler steps the same fused weights draw what stock draws
    ours = np.asarray(gen("a blue square", seed=3, sampler="flow_euler")[0]).astype(int)
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - plain).max() > 10  # the LoRA did change the drawing


@pytest.mark.parametrize("name,steps,k", [("4step", 4, 1), ("8step", 8, 4)])
def test_the_few_step_presets_re_noise_after_their_first_euler_steps(name, steps, k):
    from lightbooth import Generator

    gen = Generator.load(device="cpu", preset=name)
    p = gen.settings().preset
    assert (p.steps, p.sampler, p.euler_steps) == (steps, "flow_stochastic", k)  # what BENCHMARKS.md measured
    shipped = np.asarray(gen("a star", seed=8)[0]).astype(int)
    said = np.asarray(gen("a star", seed=8, sampler="flow_stochastic", euler_steps=k)[0]).astype(int)
    euler = np.asarray(gen("a star", seed=8, sampler="flow_euler")[0]).astype(int)
    fresh = np.asarray(gen("a star", seed=8, sampler="flow_stochastic", euler_steps=0)[0]).astype(int)
    assert np.array_equal(shipped, said) and np.abs(shipped - euler).max() > 10 and np.abs(shipped - fresh).max() > 10


@pytest.mark.parametrize("name", ["4step", "8step"])
def test_a_shipped_lora_passed_by_path_samples_as_its_preset_does(name):
    """`--lora lightning/NAME.safetensors` (on this or a copied model) reads the file's own schedule: the preset's."""
    from dataclasses import replace

    from lightbooth import Generator

    by_preset = Generator.load(device="cpu", preset=name)
    file = builtin_model_path() / by_preset.settings().preset.lora
    by_path = Generator.load(device="cpu", loras=[str(file)])  # the file's schedule only, no preset fused
    assert by_path.preset is None and by_path.settings().preset == replace(by_preset.settings().preset, lora=None)
    assert np.array_equal(np.asarray(by_path("a star", seed=8)[0]), np.asarray(by_preset("a star", seed=8)[0]))


def test_a_dreambooth_lora_stacks_on_the_default_4_step_preset(tmp_path):
    """Personalize, then go fast, on the built-in model: a LoRA without a schedule keeps the 4-step preset, and the
    fused weights are the base plus both LoRAs' deltas."""
    from lightbooth import Generator
    from lightbooth.data import shapes
    from lightbooth.training.dreambooth import DreamBoothConfig, train_dreambooth

    inst = tmp_path / "subject"
    inst.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        shapes.render_subject(rng=rng).save(inst / f"{i}.png")
    lora = str(train_dreambooth(DreamBoothConfig(instance_dir=str(inst), class_noun="star", out=str(tmp_path / "db"),
                                                 steps=2, lr=1e-2, rank=2, prior=False, validation_prompt=[],
                                                 logger="none")))

    def weights(**kw):
        gen = Generator.load(device="cpu", **kw)
        return gen, {n: p.detach().clone() for n, p in gen.family.denoiser.named_parameters()}

    fast, both = weights(), weights(loras=[lora])[1]
    assert (fast[0].settings().preset_name, fast[0].settings().preset.steps) == ("4step", 4)
    base, personal = weights(preset="base")[1], weights(preset="base", loras=[lora])[1]
    fast = fast[1]
    moved = [n for n in base if not torch.equal(personal[n], base[n])]
    assert moved and any(not torch.equal(fast[n], base[n]) for n in moved)
    for n in base:
        assert torch.allclose(both[n] - fast[n], personal[n] - base[n], atol=1e-6), n


def test_a_lora_distilled_from_the_builtin_model_names_it_not_its_install_folder(tmp_path):
    from lightbooth.safeload import validate_safetensors
    from lightbooth.training.distill.run import DistillConfig, train_distill

    path = train_distill(DistillConfig(out=str(tmp_path / "run"), method="trajectory", steps=1, batch_size=1, rank=2,
                                       teacher_steps=2, student_steps=1, logger="none"))
    assert json.loads(validate_safetensors(path)["lightbooth_distill"])["teacher"] == "built-in"


def test_shipping_with_another_sampler_rewrites_the_lora_files_schedule_too(tmp_path):
    """tools/ship_builtin.py --sampler: lightbooth.json and the LoRA file's own metadata say the same thing."""
    import importlib.util
    from pathlib import Path

    from lightbooth.safeload import validate_safetensors

    tool = Path(__file__).parents[1] / "tools" / "ship_builtin.py"
    spec = importlib.util.spec_from_file_location("ship_builtin", tool)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    dest = tmp_path / "model"
    assert ship.main(["--model", str(builtin_model_path()), "--dest", str(dest), "--sampler", "4step=flow_euler",
                      "--sampler", "8step=flow_stochastic:2", "--default", "4step"]) == 0
    presets = json.loads((dest / "lightbooth.json").read_text())["presets"]
    asked = {"4step": {"sampler": "flow_euler"}, "8step": {"sampler": "flow_stochastic", "euler_steps": 2}}
    for name, want in asked.items():
        schedule = json.loads(validate_safetensors(dest / presets[name]["lora"])["lightbooth_preset"])
        assert schedule == {k: v for k, v in presets[name].items() if k != "lora"} and schedule.items() >= want.items()
        assert name != "4step" or "euler_steps" not in schedule
    shipped = validate_safetensors(builtin_model_path() / "lightning/4step.safetensors")["lightbooth_preset"]
    assert json.loads(shipped)["sampler"] == "flow_stochastic"  # the package's own files are untouched
