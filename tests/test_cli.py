"""The `lightbooth generate` command: files written, resume, several processes, and bad input (exit 2)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lightbooth.cli import main
from lightbooth.images import read_params


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_one_png_per_image_and_prints_paths(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "generate", "a red circle", "黑色背景上有三个绿色三角形", "--out", str(out),
                            "--model", str(qwen_dir), "--seed", "42", "--num-images", "2", "--steps", "2",
                            "--batch-size", "3")
    assert code == 0, err
    paths = stdout.split()
    assert len(paths) == 4 and sorted(paths) == sorted(str(p) for p in out.glob("*.png"))
    meta = [read_params(p) for p in sorted(paths)]
    assert [(m["prompt"], m["seed"]) for m in meta] == [("a red circle", 42), ("a red circle", 43),
                                                        ("黑色背景上有三个绿色三角形", 42), ("黑色背景上有三个绿色三角形", 43)]
    with Image.open(paths[0]) as im:
        assert "Steps: 2" in im.text["parameters"] and im.size == (64, 64)


def test_existing_images_are_never_overwritten(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "0000-a-red-circle-0.png"
    precious.write_bytes(b"user's own file")
    code, stdout, _ = run(capsys, "generate", "a red circle", "--out", str(out), "--model", str(qwen_dir),
                          "--steps", "1")
    assert code == 0 and precious.read_bytes() == b"user's own file"
    assert stdout.split() == [str(out / "0000-a-red-circle-0-1.png")]


def test_prompts_file_resumes_by_skipping_finished_images(qwen_dir, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n\n蓝色正方形\na green star\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["generate", "--prompts-file", str(pf), "--out", str(out), "--model", str(qwen_dir), "--steps", "2",
            "--num-images", "2", "--batch-size", "4"]
    assert run(capsys, *args)[0] == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    before = {p: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in files}
    files[3].unlink()  # as if the first run had been interrupted
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and sorted(out.glob("*.png")) == files
    assert stdout.count("skipped") == 5
    for p in files:
        if p != files[3]:
            assert p.stat().st_mtime_ns == before[p][0]
    assert np.abs(np.asarray(Image.open(files[3])).astype(int) - before[files[3]][1]).max() <= 2


def test_a_rerun_with_other_numerics_is_not_taken_for_done(qwen_dir, tmp_path, capsys):
    # the dtype changes the image, so an image made in float32 must not stand in for a bfloat16 one
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--out", str(out), "--model", str(qwen_dir), "--steps", "1"]
    first = run(capsys, *args)[1].split()
    assert read_params(first[0])["dtype"] == "float32" and read_params(first[0])["fp8"] is False
    code, stdout, _ = run(capsys, *args, "--dtype", "bfloat16")
    assert code == 0 and "skipped" not in stdout and stdout.split()[0] != first[0]
    assert read_params(stdout.split()[0])["dtype"] == "bfloat16"
    assert "skipped" in run(capsys, *args)[1]


@pytest.mark.slow
def test_two_processes_split_the_work_and_match_one(sd_dir, tmp_path):
    # Lightning Fabric spawns 2 CPU processes (gloo); each takes every other image
    pf = tmp_path / "p.txt"
    pf.write_text("a red circle\na blue square\na green star\n")
    common = ["generate", "--prompts-file", str(pf), "--model", str(sd_dir), "--steps", "2", "--num-images", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    two = subprocess.run([sys.executable, "-m", "lightbooth.cli", *common, "--out", str(tmp_path / "two"),
                          "--devices", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    one_files = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert one_files == sorted(p.name for p in (tmp_path / "two").glob("*.png")) and len(one_files) == 6
    assert sorted(two.stdout.split()) == sorted(str(tmp_path / "two" / n) for n in one_files)
    for name in one_files:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "two" / name)).astype(int)
        assert np.abs(a - b).max() <= 2


def _no_traceback(code, err):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["generate", "   "], "empty"),
    (["generate", "x", "--width", "70"], "multiple of 8"),
    (["generate", "x", "--steps", "0"], "steps must be at least 1"),
    (["generate", "x", "--preset", "turbo"], "unknown preset"),
    (["generate", "x", "--sampler", "ddim"], "does not run qwen-image"),
    (["generate", "x", "--euler-steps", "2"], "flow_stochastic sampler only"),
    (["generate", "x", "--sampler", "flow_stochastic", "--euler-steps", "-1"], "0 or more"),
    (["generate", "x", "--num-images", "0"], "at least 1"),
    (["generate", "x", "--guidance", "nan"], "finite"),
    (["generate", "x", "--seed", "-1"], "out of range"),
    (["generate", "x", "--seed", "99999999999999999999"], "out of range"),
    (["generate", "x", "--seed", "18446744073709551615", "--num-images", "2"], "run past"),
    (["generate", "x", "--width", "0"], "multiple of 8"),
    (["generate", "x", "--device", "tpu"], "unknown device"),
    (["generate", "x", "--devices", "-1"], "--devices"),
    (["generate", "x", "--seed", "abc"], "Invalid value for '--seed'"),  # click's own, one line too
    (["generate", "x", "--bogus"], "No such option: --bogus"),
])
def test_bad_settings_are_one_line_exit_2(qwen_dir, tmp_path, capsys, args, needle):
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "o"), "--model", str(qwen_dir))
    assert needle in _no_traceback(code, err)
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_usage_errors_name_the_help_command_and_help_still_exits_0(capsys):
    from lightbooth.cli import main

    assert main(["generate", "x"]) == 2
    assert "Missing option '--out'" in _no_traceback(2, capsys.readouterr().err)
    assert main(["nosuchcommand"]) == 2
    assert "(see 'lightbooth --help')" in _no_traceback(2, capsys.readouterr().err)
    assert main(["generate", "--help"]) == 0 and "--out" in capsys.readouterr().out


def test_rejected_settings_leave_no_new_out_folder(qwen_dir, tmp_path, capsys):
    out = tmp_path / "new" / "o"
    code, _, err = run(capsys, "generate", "x", "--steps", "0", "--out", str(out), "--model", str(qwen_dir))
    assert "steps must be at least 1" in _no_traceback(code, err)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"  # a folder the user already had stays, empty or not
    kept.mkdir()
    code, _, err = run(capsys, "generate", "x", "--width", "70", "--out", str(kept), "--model", str(qwen_dir))
    assert "multiple of 8" in _no_traceback(code, err)
    assert kept.is_dir()


def test_unknown_model_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path), "--model", "nobody/no-such-model")
    line = _no_traceback(code, err)
    assert "nobody/no-such-model" in line and "cache" in line


def test_missing_folder_and_non_diffusers_folder(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none"))
    assert "not found" in _no_traceback(code, err)
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(tmp_path))
    assert "model_index.json" in _no_traceback(code, err)


def test_pickle_only_model_is_refused(sd_dir, tmp_path, capsys):
    bad = tmp_path / "pickled"
    shutil.copytree(sd_dir, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "unpickled"
    # a pickle that would create a file if anything unpickled it
    payload = (b"\x80\x04\x95" + b"\x00" * 8 + b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR.")
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(bad))
    assert "safetensors" in _no_traceback(code, err)
    assert not marker.exists()


def test_truncated_model_weights(sd_dir, tmp_path, capsys):
    bad = tmp_path / "truncated"
    shutil.copytree(sd_dir, bad)
    f = next((bad / "unet").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(bad))
    assert "unet" in _no_traceback(code, err)


def test_out_is_a_file(qwen_dir, tmp_path, capsys):
    f = tmp_path / "file.png"
    f.write_bytes(b"keep me")
    code, _, err = run(capsys, "generate", "x", "--out", str(f), "--model", str(qwen_dir))
    assert "is a file" in _no_traceback(code, err) and f.read_bytes() == b"keep me"


@pytest.mark.parametrize("command", [["distill", "--steps", "1"], ["train-base"],
                                     ["dreambooth", "--class-noun", "star", "--instance-dir", "."]])
def test_run_folder_inside_a_file_is_refused_before_any_model_loads(tmp_path, capsys, command):
    f = tmp_path / "file"
    f.write_bytes(b"keep me")
    code, _, err = run(capsys, *command, "--out", str(f / "run"))
    assert f"{f} is a file" in _no_traceback(code, err) and f.read_bytes() == b"keep me"


def test_usage_error_exits_2(capsys):
    code, _, err = run(capsys, "generate", "x", "--bogus")
    assert code == 2 and "Traceback" not in err


def test_console_script_metadata_params_roundtrip(qwen_dir, tmp_path, capsys):
    code, stdout, _ = run(capsys, "generate", "x y", "--out", str(tmp_path), "--model", str(qwen_dir), "--steps",
                          "1", "--negative", "blurry", "--guidance", "3")
    m = read_params(stdout.split()[0])
    assert m["negative_prompt"] == "blurry" and m["guidance"] == 3.0 and json.dumps(m)


def _random_lora(gen, rank=4, alpha=2.0, seed=0):
    import torch

    from lightbooth.lora import LoraLayer

    torch.manual_seed(seed)
    weights = {}
    for name, mod in gen.family.denoiser.named_modules():
        if name.endswith((".to_q", ".to_v", ".add_k_proj")) and isinstance(mod, torch.nn.Linear):
            weights[f"{gen.family.denoiser_name}.{name}"] = LoraLayer(
                torch.randn(rank, mod.in_features) * 0.3, torch.randn(mod.out_features, rank) * 0.3, alpha)
    return weights


def test_lora_every_format_gives_the_same_images(qwen_gen, qwen_dir, tmp_path, capsys):
    from lightbooth.lora import save_lora

    weights = _random_lora(qwen_gen)
    for fmt in ("peft", "kohya"):
        save_lora(tmp_path / f"{fmt}.safetensors", weights, format=fmt)
    imgs = {}
    for name in ("peft", "kohya", "kohya:0", None):
        args = ["generate", "a red circle", "--out", str(tmp_path / str(name).replace(":", "_")), "--model",
                str(qwen_dir), "--steps", "2", "--seed", "5"]
        if name:
            args += ["--lora", str(tmp_path / name.split(":")[0]) + ".safetensors" + name[len(name.split(":")[0]):]]
        code, stdout, err = run(capsys, *args)
        assert code == 0, err
        imgs[name] = np.asarray(Image.open(stdout.split()[0])).astype(int)
    assert np.abs(imgs["peft"] - imgs["kohya"]).max() <= 1
    assert np.abs(imgs["peft"] - imgs[None]).max() > 5  # the LoRA does something
    assert np.abs(imgs["kohya:0"] - imgs[None]).max() <= 1  # scale 0 is no LoRA
    assert read_params(stdout.split()[0])["loras"] == []


def test_lora_for_another_model_and_corrupt_lora(qwen_dir, sd_gen, tmp_path, capsys):
    from lightbooth.lora import save_lora

    save_lora(tmp_path / "sd.safetensors", _random_lora(sd_gen), format="peft")
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(qwen_dir),
                       "--lora", str(tmp_path / "sd.safetensors"))
    assert "does not match" in _no_traceback(code, err)
    good = tmp_path / "sd.safetensors"
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(qwen_dir),
                       "--lora", str(tmp_path / "cut.safetensors"))
    assert "cut.safetensors" in _no_traceback(code, err)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_unusable_out_prompts_file_model_index_and_lora_scale_are_one_line(qwen_dir, tmp_path, capsys):
    base = ["generate", "x", "--model", str(qwen_dir)]
    (tmp_path / "file").write_bytes(b"keep me")
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "file" / "sub"))
    assert f"cannot create --out folder {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file" in _no_traceback(
        code, err)
    assert (tmp_path / "file").read_bytes() == b"keep me"
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00 not utf-8\n")
    code, _, err = run(capsys, "generate", "--prompts-file", str(tmp_path / "prompts.txt"), "--out",
                       str(tmp_path / "o"), "--model", str(qwen_dir))
    assert "not UTF-8" in _no_traceback(code, err)
    bad = tmp_path / "listed"
    bad.mkdir()
    (bad / "model_index.json").write_text("[1, 2]")
    code, _, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--model", str(bad))
    assert "not a diffusers model index" in _no_traceback(code, err)
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"")  # the scale is checked first: the file's content does not matter
    for spec, needle in ((f"{lora}:abc", "is not a number"), (f"{lora}:nan", "finite")):
        code, _, err = run(capsys, *base, "--out", str(tmp_path / "o"), "--lora", spec)
        assert needle in _no_traceback(code, err)
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_eval_prints_the_expected_variety_when_given_more_than_64_seeds(capsys):
    code, out, _ = run(capsys, "eval", "--n", "1", "--variety-seeds", "65")
    assert code == 0 and "variety over 64 seeds of 'a circle'" in out
    assert "expected over every 64 of 65 seeds:" in out
    code, _, err = run(capsys, "eval", "--variety-seeds", "0")
    assert code == 2 and "--variety-seeds must be at least 1" in err and "Traceback" not in err
