"""`lightbooth dreambooth` end to end on tiny real models: files written, LoRAs that load in lightbooth and stock
diffusers, full fine-tunes, bitwise resume after an interruption, 2 processes = 1, and bad input (exit 2)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightbooth.atomic import new_file_mode
from lightbooth.cli import main
from lightbooth.data import shapes
from lightbooth.training.checkpoints import checkpoint_steps
from lightbooth.training.dreambooth import DEFAULT_TOKEN, DreamBoothConfig, check_token, train_dreambooth
from lightbooth.training.dreambooth_module import StepBatches
from lightbooth.training.losses import ddpm_noisy, ddpm_target, prior_preservation_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train as fast on one thread, and one thread does not stall when another process holds a core."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    for i in range(4):
        shapes.render_subject(rng=rng).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")  # runs in one folder share their class-image cache


def db(capsys, *args):
    code = main(["dreambooth", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def fast(model, instance_dir, out, *extra):
    return ["--model", model, "--instance-dir", instance_dir, "--class-noun", "star", "--out", out,
            "--num-class-images", 2, "--class-preset", "lightning-4" if "qwen" in str(model) else "base",
            "--validation-steps", 2, "--logger", "none", *extra]


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------------


def test_default_token_is_a_rare_non_word_every_tokenizer_spells(qwen_gen, sd_gen):
    assert DEFAULT_TOKEN != "sks"
    assert not set(DEFAULT_TOKEN) & set("aeiouy")  # no vowel: not an English word (no dictionary needed)
    words = Path("/usr/share/dict/words")
    if words.exists():
        assert DEFAULT_TOKEN.lower() not in {w.strip().lower() for w in words.read_text(errors="ignore").split()}
    for gen in (qwen_gen, sd_gen):
        check_token(gen.family.components["tokenizer"], DEFAULT_TOKEN)


def test_losses_match_their_definitions():
    x0, eps, a = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.9, 0.5, 0.1])
    xt = ddpm_noisy(x0, eps, a)
    v = ddpm_target(x0, eps, a, "v_prediction")
    s = a.sqrt()[:, None]
    torch.testing.assert_close(s * xt - (1 - s**2).sqrt() * v, x0)  # x0 = sqrt(a) x_t - sqrt(1-a) v
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert prior_preservation_loss(per, torch.tensor([False, False, True, True]), 0.5) == 2.0 + 0.5 * 15.0


def test_batches_split_over_ranks_and_cover_every_image_each_epoch():
    sampler = StepBatches([[0, 1, 2], [3, 4]], n_class=5, batch=2, seed=0)
    assert sampler.per_epoch == 3
    seen = [i for g in range(3) for kind, i, _ in sampler.global_batch(g) if kind == "instance"]
    assert set(seen) == {0, 1, 2, 3, 4}
    for g in range(5):
        halves = [StepBatches([[0, 1, 2], [3, 4]], 5, 2, 0, rank=r, world=2).local_batch(g) for r in range(2)]
        assert sorted(halves[0] + halves[1]) == sorted(sampler.global_batch(g))
        assert all(sum(k == "class" for k, *_ in h) == 1 for h in halves)  # each rank: one instance, one class


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


def stock_fused(family, model_dir, lora):
    from diffusers import QwenImagePipeline, StableDiffusionPipeline

    cls = QwenImagePipeline if family == "qwen-image" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir, **({} if family == "qwen-image" else {"safety_checker": None}))
    pipe.load_lora_weights(str(lora))
    names = ["transformer"] if family == "qwen-image" else ["unet", "text_encoder"]
    pipe.fuse_lora(components=names)
    pipe.unload_lora_weights()
    return {n: getattr(pipe, n).state_dict() for n in names}


def assert_same_weights(ours: dict, ref: dict, base: dict):
    changed = 0
    for name, sd in ref.items():
        mine = ours[name].state_dict()
        for key, w in sd.items():
            torch.testing.assert_close(mine[key].float(), w.float(), atol=1e-6, rtol=1e-5)
            changed += not torch.equal(w, base[name][key])
    assert changed > 0  # the LoRA did something


def test_lora_adapters_train_in_fp32_on_a_bf16_base(sd_dir):
    """peft makes adapters in the base's dtype; bf16 weights would round Adam's small steps away."""
    from lightbooth.families.base import Cond
    from lightbooth.generate import Generator
    from lightbooth.training.dreambooth import make_trainable

    family = Generator.load(sd_dir, device="cpu", dtype=torch.bfloat16, fast=False).family
    make_trainable(DreamBoothConfig(instance_dir="i", class_noun="star", out="o", rank=4), family)
    trainable = {n: p.dtype for n, p in family.denoiser.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in family.denoiser.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32} and frozen == {torch.bfloat16}
    x0 = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 7, family.denoiser.config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed runs
        loss = family.training_loss(family.denoiser, x0, Cond(emb), torch.randn_like(x0), torch.rand(2)).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in family.denoiser.parameters() if p.requires_grad)


def test_qwen_lora_run_writes_its_files_and_loads_in_lightbooth_and_diffusers(qwen_dir, instance_dir, runs, capsys):
    from lightbooth import Generator

    run = runs / "qwen"
    code, out, err = db(capsys, *fast(qwen_dir, instance_dir, run, "--steps", 4, "--checkpoint-every", 2,
                                      "--lr", 1e-2, "--export", "kohya", "--logger", "tensorboard",
                                      "--validate-every", 3))
    assert code == 0, err
    assert out.strip() == str(run / "lora.safetensors")
    for part in ("config.yaml", "lora.safetensors", "lora_kohya.safetensors", "losses.jsonl",
                 "validation/step-00000003/00.png", "validation/step-00000004/00.png"):
        assert (run / part).exists(), part
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert [s for s, _ in checkpoint_steps(run / "checkpoints")] == [4, 2]
    assert [x["step"] for x in lines(run / "losses.jsonl")] == [1, 2, 3, 4]
    manifest = json.loads(next(runs.glob("class-images-*/manifest.json")).read_text())
    assert manifest["settings"]["prompt"] == "a star" and len(manifest["files"]) == 2
    base = {"transformer": Generator.load(qwen_dir, device="cpu").family.denoiser.state_dict()}
    ref = stock_fused("qwen-image", qwen_dir, run / "lora.safetensors")
    for lora in ("lora.safetensors", "lora_kohya.safetensors"):
        ours = Generator.load(qwen_dir, loras=[str(run / lora)], device="cpu").family.components
        assert_same_weights(ours, ref, base)


def test_fp8_compiled_lora_run_never_runs_the_text_encoder_after_caching_and_loads_in_diffusers(qwen_dir, instance_dir,
                                                                                               runs):
    import lightning as L

    from lightbooth import Generator
    from lightbooth.accel.fp8 import Fp8Linear
    from lightbooth.config import load_config

    class Watch(L.Callback):  # counts text encoder calls from the first training step to the end (validation too)
        calls, fp8_layers, compiled = 0, 0, False

        def on_train_start(self, trainer, pl_module):
            te = pl_module.family.components["text_encoder"]
            te.register_forward_pre_hook(lambda *a: setattr(Watch, "calls", Watch.calls + 1))
            Watch.fp8_layers = sum(isinstance(m, Fp8Linear) for m in pl_module.denoiser.modules())
            Watch.compiled = all(b._compiled_call_impl is not None for b in pl_module.denoiser.transformer_blocks)

    run = runs / "qwen-fp8"
    cfg = load_config(DreamBoothConfig, None, dict(
        model=str(qwen_dir), instance_dir=str(instance_dir), class_noun="star", out=str(run), num_class_images=2,
        class_preset="lightning-4", validation_steps=2, logger="none", steps=3, lr=1e-2, fp8=True, compile=True))
    lora = train_dreambooth(cfg, callbacks=[Watch()])
    assert Watch.fp8_layers > 0 and Watch.compiled
    assert Watch.calls == 0 and (run / "validation/step-00000003/00.png").exists()
    assert all(math.isfinite(x["loss"]) for x in lines(run / "losses.jsonl"))
    base = {"transformer": Generator.load(qwen_dir, device="cpu").family.denoiser.state_dict()}
    ours = Generator.load(qwen_dir, loras=[str(lora)], device="cpu").family.components
    assert_same_weights(ours, stock_fused("qwen-image", qwen_dir, lora), base)


def test_sd_lora_with_text_encoder_loads_in_lightbooth_and_diffusers(sd_dir, instance_dir, runs, capsys):
    from lightbooth import Generator

    run = runs / "sd"
    code, _, err = db(capsys, *fast(sd_dir, instance_dir, run, "--steps", 3, "--train-text-encoder", "--lr", 1e-2,
                                    "--batch-size", 2, "--grad-accum", 2, "--export", "kohya"))
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(run / "lora.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    with safe_open(run / "lora_kohya.safetensors", "pt") as f:  # the kohya / A1111 / ComfyUI names
        kohya = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_") for k in kohya)
    assert {k.rsplit(".", 2)[-2] for k in kohya if k.endswith(".weight")} == {"lora_down", "lora_up"}
    g = Generator.load(sd_dir, device="cpu")
    base = {n: g.family.components[n].state_dict() for n in ("unet", "text_encoder")}
    for lora in ("lora.safetensors", "lora_kohya.safetensors"):
        ours = Generator.load(sd_dir, loras=[str(run / lora)], device="cpu").family.components
        assert_same_weights(ours, stock_fused("sd", sd_dir, run / lora), base)


def test_full_finetune_saves_a_diffusers_folder(sd_dir, instance_dir, runs, capsys):
    from lightbooth import Generator

    run = runs / "full"
    code, out, err = db(capsys, *fast(sd_dir, instance_dir, run, "--steps", 2, "--full", "--no-prior", "--lr", 1e-3))
    assert code == 0, err
    assert out.strip() == str(run / "model") and not (run / "lora.safetensors").exists()
    assert {f.stat().st_mode & 0o777 for f in (run / "model").rglob("*.safetensors")} == {new_file_mode()}
    tuned = Generator.load(run / "model", device="cpu")
    base = Generator.load(sd_dir, device="cpu")
    w = dict(tuned.family.denoiser.named_parameters())
    assert any(not torch.equal(w[n], p) for n, p in base.family.denoiser.named_parameters())
    assert tuned(["a qzx star"], steps=2)[0].size == (16, 16)
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=True)
    assert all(k.startswith("denoiser.") for k in ckpt["state_dict"])  # trainable weights only


class Interrupt:
    """Ctrl-C after optimizer step `at` (as a Lightning callback)."""

    def __new__(cls, at):
        import lightning as L

        class _Interrupt(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == at:
                    raise KeyboardInterrupt

        return _Interrupt()


def test_resume_after_interruption_matches_an_uninterrupted_run_bitwise(qwen_dir, instance_dir, runs):
    from lightbooth.safeload import load_safetensors

    def cfg(name):
        return DreamBoothConfig(instance_dir=str(instance_dir), class_noun="star", out=str(runs / name),
                                model=str(qwen_dir), steps=6, checkpoint_every=2, lr=1e-2, batch_size=2,
                                grad_accum=2, num_class_images=2, class_preset="lightning-4", validation_prompt=[],
                                logger="none", seed=3)

    whole = train_dreambooth(cfg("whole"))
    with pytest.raises(SystemExit) as e:
        train_dreambooth(cfg("cut"), callbacks=[Interrupt(at=3)])
    assert e.value.code == 130
    assert [s for s, _ in checkpoint_steps(runs / "cut" / "checkpoints")] == [3, 2]
    assert not (runs / "cut" / "lora.safetensors").exists()
    resumed = train_dreambooth(cfg("cut"), resume="auto")
    a, b = load_safetensors(whole)[0], load_safetensors(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = {x["step"]: x["loss"] for x in lines(runs / "cut" / "losses.jsonl")}  # steps 1-3, then 4-6
    assert curve == {x["step"]: x["loss"] for x in lines(runs / "whole" / "losses.jsonl")}


def test_training_lowers_the_loss_on_the_instance_images(qwen_dir, instance_dir, runs):
    """The LoRA learns: the denoising loss on the instance latents, at fixed noise, drops well below the base's."""
    from lightbooth import Generator
    from lightbooth.data.instance import load_instance_images
    from lightbooth.training.base import to_tensor

    cfg = DreamBoothConfig(instance_dir=str(instance_dir), class_noun="star", out=str(runs / "learn"),
                           model=str(qwen_dir), steps=20, lr=3e-2, rank=8, prior=False, validation_prompt=[],
                           logger="none")
    lora = train_dreambooth(cfg)

    def loss(gen):
        fam = gen.family
        x0 = fam.encode_images(to_tensor([im.image for im in load_instance_images(instance_dir)]))
        cond = fam.encode(["a qzx star"] * len(x0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(sum(fam.training_loss(fam.denoiser, x0, cond, torch.randn(x0.shape, generator=g),
                                               torch.full((len(x0),), u)).mean() for u in (0.2, 0.5, 0.8)))

    before = loss(Generator.load(qwen_dir, device="cpu"))
    assert loss(Generator.load(qwen_dir, loras=[str(lora)], device="cpu")) < 0.8 * before


def test_sigterm_saves_a_checkpoint_and_resume_auto_finishes(qwen_dir, instance_dir, runs, capsys):
    import signal
    import time

    run = runs / "sigterm"
    args = fast(qwen_dir, instance_dir, run, "--steps", 100000, "--checkpoint-every", 5, "--validation-prompt", "",
                "--threads", 1)
    proc = subprocess.Popen([sys.executable, "-m", "lightbooth.cli", "dreambooth", *map(str, args)],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not checkpoint_steps(run / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint saved" in err and "Traceback" not in err
    step = checkpoint_steps(run / "checkpoints")[0][0]
    assert step >= 5 and not (run / "lora.safetensors").exists()
    # resume with no flags but the run folder: the saved config is reused, --steps overrides it
    code, out, err = db(capsys, "--out", run, "--resume", "auto", "--steps", step + 2)
    assert code == 0, err
    assert [x["step"] for x in lines(run / "losses.jsonl")][-3:] == [step, step + 1, step + 2]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(sd_dir, instance_dir, runs):
    from lightbooth.safeload import load_safetensors

    common = fast(sd_dir, instance_dir, None, "--steps", 3, "--batch-size", 2, "--lr", 1e-2, "--validation-prompt",
                  "", "--threads", 1)
    common = [str(a) for a in common if a is not None]
    i = common.index("--out")
    del common[i:i + 1]  # the --out placeholder
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    two = subprocess.run([sys.executable, "-m", "lightbooth.cli", "dreambooth", *common, "--out",
                          str(runs / "ddp2"), "--devices", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["dreambooth", *common, "--out", str(runs / "ddp1")]) == 0
    a = load_safetensors(runs / "ddp1" / "lora.safetensors")[0]
    b = load_safetensors(runs / "ddp2" / "lora.safetensors")[0]
    assert a.keys() == b.keys()
    # all-reduced gradients differ from one process's in the last bits; Adam divides by |g|, so a weight whose
    # gradient is ~0 can move by a few percent of one step (lr 1e-2) differently: allow 1% of lr
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)
    la, lb = lines(runs / "ddp1" / "losses.jsonl"), lines(runs / "ddp2" / "losses.jsonl")
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2, 3]
    np.testing.assert_allclose([x["loss"] for x in la], [x["loss"] for x in lb], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing lost
# ----------------------------------------------------------------------------------------------------------------


def one_line(code, err):
    assert code == 2, err
    assert "Traceback" not in err
    last = [x for x in err.strip().splitlines() if x.strip()][-1]
    assert last.startswith("error: "), err
    return last


def test_bad_instance_folders_are_one_line_errors(qwen_dir, tmp_path, capsys):
    from PIL import Image

    from test_instance_data import fake_png_header

    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 32 if i == 1 else 64), (i * 50, 0, 0)).save(small / f"{i}.png")
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    fake_png_header(bomb / "huge.png", 30000, 30000)
    for folder, needle in ((empty, "has no images"), (tmp_path / "none", "does not exist"), (small, "1.png (64x32)"),
                           (bomb, "decompression bomb")):
        code, _, err = db(capsys, *fast(qwen_dir, folder, tmp_path / "run"))
        assert needle in one_line(code, err)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--steps", 0], "'steps' must be at least 1"),
    (["--num-class-images", 0], "'num_class_images' must be at least 1"),
    (["--no-prior", "--num-class-images", -1], "'num_class_images' must be 0 or more"),
    (["--logger", "comet"], "unknown logger"),
    (["--export", "ckpt"], "unknown export format"),
    (["--batch-size", 3, "--devices", 2], "multiple of devices"),
    (["--token", "two words"], "without spaces"),
    (["--train-text-encoder"], "sd only"),
    (["--fp8", "--full"], "drop one of them"),
    (["--cuda-graphs", "--compile"], "drop --compile"),
    (["--cuda-graphs", "--grad-accum", 2], "one backward per step"),
    (["--resolution", 60], "multiple of 8"),
    (["--noise-shift", 0], "'noise_shift' must be positive"),
    (["--threads", -1], "'threads' must be 0 or more"),
    (["--seed", -1], "'seed' must be 0 or more"),
    (["--warmup", -1], "'warmup' must be 0 or more"),
    (["--alpha", -2], "'alpha' must be positive"),
    (["--validation-steps", 0], "'validation_steps' must be at least 1"),
    (["--precision", "fp17"], "unknown precision 'fp17'"),
    (["--strategy", "magic"], "unknown strategy 'magic'"),
    (["--class-preset", "nope"], "unknown class preset 'nope'"),
])
def test_bad_settings_are_one_line_errors(qwen_dir, instance_dir, tmp_path, capsys, args, needle):
    code, _, err = db(capsys, *fast(qwen_dir, instance_dir, tmp_path / "run", *args))
    assert needle in one_line(code, err)
    assert not (tmp_path / "run").exists()


def test_no_class_images_are_fine_without_prior_preservation(tmp_path):
    from lightbooth.training.dreambooth import check_config

    check_config(DreamBoothConfig(instance_dir=str(tmp_path), class_noun="star", out=str(tmp_path / "run"),
                                  prior=False, num_class_images=0))  # was refused although none is made


def test_lora_targets_are_checked_before_the_run_folder_is_made(qwen_dir, instance_dir, tmp_path, capsys):
    for targets, needle in ((["to_q", "nonexistent"], "'nonexistent' matches no module"),
                            (["transformer_blocks"], "which LoRA cannot wrap")):
        args = [x for t in targets for x in ("--lora-targets", t)]
        code, _, err = db(capsys, *fast(qwen_dir, instance_dir, tmp_path / "run", *args))
        assert needle in one_line(code, err)
        assert not (tmp_path / "run").exists()


def test_python_configs_get_the_type_checks_of_the_cli_and_take_path_objects(qwen_dir, instance_dir, tmp_path):
    from lightbooth.errors import LightboothError

    base = dict(instance_dir=str(instance_dir), class_noun="star", out=str(tmp_path / "bad"), model=str(qwen_dir))
    with pytest.raises(LightboothError, match="'lr' of DreamBoothConfig must be a number, got 'fast'"):
        train_dreambooth(DreamBoothConfig(**base, lr="fast"))  # was a TypeError traceback
    with pytest.raises(LightboothError, match="'rank' of DreamBoothConfig must be a whole number"):
        train_dreambooth(DreamBoothConfig(**base, rank=4.5))
    assert not (tmp_path / "bad").exists()
    # Path objects (a yaml RepresenterError before) and one export format without a list (was read as 'k', 'o', ...)
    lora = train_dreambooth(DreamBoothConfig(instance_dir=instance_dir, class_noun="star", out=tmp_path / "run",
                                             model=qwen_dir, steps=1, prior=False, validation_prompt=[],
                                             logger="none", export="kohya"))
    assert lora == tmp_path / "run" / "lora.safetensors" and (tmp_path / "run" / "lora_kohya.safetensors").exists()


def test_unknown_config_key_and_existing_run_folder(qwen_dir, instance_dir, tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("stepz: 3\n")
    code, _, err = db(capsys, "--config", bad, *fast(qwen_dir, instance_dir, tmp_path / "r"))
    assert "stepz" in one_line(code, err)
    run = tmp_path / "existing"
    run.mkdir()
    (run / "precious.txt").write_text("keep")
    code, _, err = db(capsys, *fast(qwen_dir, instance_dir, run))
    assert "--resume" in one_line(code, err)
    assert (run / "precious.txt").read_text() == "keep" and len(list(run.iterdir())) == 1
    code, _, err = db(capsys, *fast(qwen_dir, instance_dir, run, "--resume", tmp_path / "step-00000009.ckpt"))
    assert "not found" in one_line(code, err)
    assert (run / "precious.txt").read_text() == "keep" and len(list(run.iterdir())) == 1


def test_config_values_are_type_checked_and_yaml_1_1_floats_read_as_numbers():
    from lightbooth.config import from_dict
    from lightbooth.errors import LightboothError

    base = dict(instance_dir="i", class_noun="star", out="o")
    for bad, needle in ((dict(alpha="abc"), "'alpha' of DreamBoothConfig must be a number"),
                        (dict(resolution="abc"), "'resolution' of DreamBoothConfig must be a whole number"),
                        (dict(steps=True), "'steps' of DreamBoothConfig must be a whole number"),
                        (dict(lr=float("nan")), "'lr' of DreamBoothConfig must be a finite number"),
                        (dict(steps=None), "'steps' of DreamBoothConfig must be a value"),
                        (dict(export=[3]), "'export' of DreamBoothConfig must be text")):
        with pytest.raises(LightboothError, match=needle):
            from_dict(DreamBoothConfig, {**base, **bad})
    cfg = from_dict(DreamBoothConfig, {**base, "lr": "1e-4", "export": "kohya", "validation_prompt": "a qzx star",
                                       "alpha": 2, "resolution": None})
    assert (cfg.lr, cfg.export, cfg.validation_prompt, cfg.alpha, cfg.resolution) == (
        1e-4, ["kohya"], ["a qzx star"], 2.0, None)


def test_bad_config_files_captions_and_checkpoints_are_one_line_errors(qwen_dir, instance_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    for name, text in (("binary.yaml", b"\xff\xfe\x00steps"), ("list.yaml", b"- steps\n- 3\n")):
        (tmp_path / name).write_bytes(text)
        code, _, err = db(capsys, "--config", tmp_path / name, *fast(qwen_dir, instance_dir, run))
        assert name in one_line(code, err)
    captioned = tmp_path / "captioned"
    shutil.copytree(instance_dir, captioned)
    (captioned / "0.txt").write_bytes(b"\xffa qzx star")
    code, _, err = db(capsys, *fast(qwen_dir, captioned, run))
    assert "cannot read caption" in one_line(code, err)
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    torch.save({"x": torch.zeros(1), "run": os.system}, tmp_path / "code.ckpt")  # unpickling it would import code
    torch.save({"x": torch.zeros(1)}, tmp_path / "tensors.ckpt")
    for name, needle in (("truncated.ckpt", "not a readable training checkpoint"),
                         ("code.ckpt", "not a readable training checkpoint"),
                         ("tensors.ckpt", "not a training checkpoint")):
        code, _, err = db(capsys, *fast(qwen_dir, instance_dir, run, "--resume", tmp_path / name))
        assert needle in one_line(code, err)
    assert not run.exists()  # refused before the run folder was made


def test_resume_from_another_runs_checkpoint_and_overwrite_of_its_own_inputs_are_refused(qwen_dir, tmp_path,
                                                                                         capsys):
    run = tmp_path / "run"
    images = run / "images"  # the user keeps the photos inside the run folder
    images.mkdir(parents=True)
    for i in range(3):
        shapes.render_subject(rng=np.random.default_rng(i)).save(images / f"{i}.png")
    code, _, err = db(capsys, *fast(qwen_dir, images, run, "--overwrite", "--steps", 1, "--no-prior"))
    assert "--overwrite would delete" in one_line(code, err)
    assert sorted(p.name for p in images.iterdir()) == ["0.png", "1.png", "2.png"]
    first = tmp_path / "first"
    code, _, err = db(capsys, *fast(qwen_dir, images, first, "--steps", 1, "--no-prior", "--validation-prompt", ""))
    assert code == 0, err
    (ckpt,) = [p for _, p in checkpoint_steps(first / "checkpoints")]
    code, _, err = db(capsys, *fast(qwen_dir, images, tmp_path / "other", "--steps", 2, "--no-prior", "--rank", 2,
                                    "--validation-prompt", "", "--resume", ckpt))
    assert "holds other weights than this run trains" in one_line(code, err)
    assert not (tmp_path / "other").exists()  # the refused start leaves no folder that would need --overwrite


def test_the_builtin_model_validates_with_its_plain_preset(instance_dir, tmp_path, capsys):
    """The built-in model's default preset fuses a distilled LoRA, which the trained model does not have."""
    run = tmp_path / "run"
    code, _, err = db(capsys, "--instance-dir", instance_dir, "--class-noun", "star", "--out", run, "--steps", 1,
                      "--no-prior", "--logger", "none", "--validation-steps", 1)
    assert code == 0, err
    assert (run / "lora.safetensors").is_file() and (run / "validation/step-00000001/00.png").is_file()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(qwen_dir, instance_dir, runs, capsys):
    run = runs / "nan"
    code, _, err = db(capsys, *fast(qwen_dir, instance_dir, run, "--steps", 6, "--checkpoint-every", 1, "--lr", 1e30,
                                    "--no-prior"))
    line = one_line(code, err)
    assert "nan" in line.lower() or "inf" in line.lower()
    assert checkpoint_steps(run / "checkpoints") and not (run / "lora.safetensors").exists()
    for _, path in checkpoint_steps(run / "checkpoints"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_shipped_config_lists_every_key_with_its_default():
    import dataclasses

    from lightbooth.config import load_config

    shipped = load_config(DreamBoothConfig, Path(__file__).parents[1] / "configs" / "dreambooth.yaml")
    assert shipped == DreamBoothConfig(instance_dir="", class_noun="", out="")
    text = (Path(__file__).parents[1] / "configs" / "dreambooth.yaml").read_text()
    missing = [f.name for f in dataclasses.fields(DreamBoothConfig)
               if f.name not in ("instance_dir", "class_noun", "out") and f"\n{f.name}:" not in text]
    assert not missing
