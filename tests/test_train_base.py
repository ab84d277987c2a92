"""`lightbooth train-base` on a seconds-long recipe: stages, export, stock-diffusers loading, resume, refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightbooth.atomic import new_file_mode
from lightbooth.cli import main
from lightbooth.training.checkpoints import checkpoint_steps, newest_valid_checkpoint

TINY = Path(__file__).parents[1] / "configs" / "tiny-base.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    assert main(["train-base", "--config", str(TINY), "--out", str(run)]) == 0
    return run


def test_run_folder_holds_every_stage_and_a_diffusers_model(tiny_run):
    for part in ("config.yaml", "tokenizer/tokenizer.json", "vae/DONE", "vae/final/config.json", "decoder/DONE",
                 "decoder/final/config.json", "flow/DONE", "polish/DONE",
                 "latents.safetensors", "model/model_index.json", "model/lightbooth.json"):
        assert (tiny_run / part).exists(), part
    assert [s for s, _ in checkpoint_steps(tiny_run / "flow")] == [6, 3]  # every 3 steps, keep 2
    assert [s for s, _ in checkpoint_steps(tiny_run / "polish")] == [3]
    settings = json.loads((tiny_run / "model" / "lightbooth.json").read_text())
    assert settings["presets"]["base"]["steps"] == 20 and settings["default_preset"] == "base"
    modes = {f.relative_to(tiny_run).as_posix(): f.stat().st_mode & 0o777
             for part in ("model", "vae/final", "decoder/final") for f in (tiny_run / part).rglob("*.*")}
    assert modes["model/transformer/diffusion_pytorch_model.safetensors"] == new_file_mode()  # save_pretrained: 0600
    assert modes["decoder/final/diffusion_pytorch_model.safetensors"] == new_file_mode()
    assert set(modes.values()) == {new_file_mode()}, modes


def test_the_polish_stage_trains_on_from_the_flow_stages_ema_and_is_what_is_exported(tiny_run):
    from safetensors.torch import load_file

    def ema(stage):
        state = torch.load(newest_valid_checkpoint(tiny_run / stage), map_location="cpu", weights_only=True)
        return {k[len("ema.module.transformer."):]: v for k, v in state["state_dict"].items()
                if k.startswith("ema.module.transformer.")}

    flow, polish = ema("flow"), ema("polish")
    exported = load_file(str(tiny_run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(polish) == set(flow)
    assert all(torch.equal(exported[k], v.to(exported[k].dtype)) for k, v in polish.items())
    moved = [(polish[k] - v).abs().max().item() for k, v in flow.items()]
    assert max(moved) > 0 and max(moved) < 0.05  # trained on, at polish_lr, from the flow stage's weights


def test_stock_diffusers_generates_from_the_exported_model(tiny_run):
    from diffusers import QwenImagePipeline

    from lightbooth import Generator

    pipe = QwenImagePipeline.from_pretrained(tiny_run / "model")  # stock pipeline, hard-coded prefix 34
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    gen = Generator.load(tiny_run / "model", device="cpu")
    assert gen.family.prefix_len == 34
    ours = gen("a red circle", negative_prompt=" ", steps=3, seed=0, cfg_rescale=True)[0]  # stock's CFG
    assert np.abs(np.asarray(ours).astype(int) - np.round(ref * 255)).max() <= 1
    preset = gen.settings().preset
    assert preset.steps == 20 and not preset.cfg_rescale  # the model's own defaults from lightbooth.json
    plain = gen("a red circle", negative_prompt=" ", steps=3, seed=0)[0]
    assert np.abs(np.asarray(plain).astype(int) - np.asarray(ours)).max() > 0


def test_existing_run_is_refused_without_resume_or_overwrite(tiny_run, capsys):
    before = sorted(p.name for p in (tiny_run / "flow").iterdir())
    assert main(["train-base", "--config", str(TINY), "--out", str(tiny_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (tiny_run / "flow").iterdir()) == before


def test_resume_continues_from_the_newest_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-base", "--config", str(TINY), "--out", str(run), "--steps", "3"]) == 0
    (run / "flow" / "DONE").unlink()  # as if stopped after step 3
    # a corrupt newest checkpoint must be skipped, never half-loaded
    (run / "flow" / "step-00000004.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert newest_valid_checkpoint(run / "flow").name == "step-00000003.ckpt"
    assert main(["train-base", "--out", str(run), "--resume", "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "unreadable" in err
    state = torch.load(run / "flow" / "step-00000006.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6


def test_resume_with_more_steps_trains_a_finished_run_on(tmp_path):
    run = tmp_path / "run"
    assert main(["train-base", "--config", str(TINY), "--out", str(run), "--steps", "3"]) == 0
    from safetensors.torch import load_file

    path = run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = lambda: load_file(str(path))  # noqa: E731
    before = weights()
    assert main(["train-base", "--out", str(run), "--resume", "--steps", "3"]) == 0  # nothing more asked
    assert [s for s, _ in checkpoint_steps(run / "flow")] == [3]
    assert all(torch.equal(before[k], v) for k, v in weights().items())
    polished = (run / "polish" / "step-00000003.ckpt").read_bytes()
    assert main(["train-base", "--out", str(run), "--resume", "--steps", "6"]) == 0
    assert [s for s, _ in checkpoint_steps(run / "flow")] == [6, 3] and (run / "flow" / "DONE").exists()
    assert (run / "polish" / "step-00000003.ckpt").read_bytes() != polished  # polished again, from the new weights
    assert not all(torch.equal(before[k], v) for k, v in weights().items())


def test_the_transformer_can_be_stored_in_half_precision_and_loads_back_as_float32(tmp_path, capsys):
    from safetensors.torch import load_file

    from lightbooth import Generator

    run, full_cfg, half_cfg = tmp_path / "run", tmp_path / "full.yaml", tmp_path / "half.yaml"
    full_cfg.write_text(TINY.read_text() + "transformer_dtype: float32\n")
    half_cfg.write_text(TINY.read_text() + "transformer_dtype: float16\n")  # the recipe's default
    assert main(["train-base", "--config", str(full_cfg), "--out", str(run), "--steps", "3"]) == 0
    path = run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    full, full_size = load_file(str(path)), path.stat().st_size
    assert all(v.dtype == torch.float32 for v in full.values())
    assert main(["train-base", "--config", str(half_cfg), "--out", str(run), "--resume", "--steps", "3"]) == 0
    half = load_file(str(path))  # a re-export of the same weights, rounded
    assert all(v.dtype == torch.float16 and torch.equal(full[k].half(), v) for k, v in half.items())
    assert path.stat().st_size < 0.6 * full_size
    gen = Generator.load(run / "model", device="cpu")
    assert next(gen.family.denoiser.parameters()).dtype == torch.float32
    assert np.asarray(gen("a red circle", steps=2, seed=0)[0]).shape == (64, 64, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("transformer_dtype: int8\n")
    assert main(["train-base", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "transformer_dtype" in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_storage_precision_refuses_weights_it_cannot_hold():
    from lightbooth.errors import LightboothError
    from lightbooth.training.base import stored_copy

    layer = torch.nn.Linear(2, 2)
    assert stored_copy(layer, "float16").weight.dtype == torch.float16 and layer.weight.dtype == torch.float32
    with torch.no_grad():
        layer.weight[0, 0] = 1e6  # beyond float16's 65504
    with pytest.raises(LightboothError, match="bfloat16"):
        stored_copy(layer, "float16")
    assert torch.isfinite(stored_copy(layer, "bfloat16").weight).all()


def test_unknown_config_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 5\n")
    assert main(["train-base", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_invalid_yaml_names_the_problem_and_where(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 5\nlr: 1e-4\nexport: [kohya\nseed: 3\n")
    assert main(["train-base", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"config file {bad} is not valid YAML: expected ',' or ']'" in lines[0], err
    assert "at line 4, column 5; fix the file" in lines[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("line,says", [("polish_steps: -1", "at least 0"),
                                       ("polish_full_captions: 1.5", "from 0 to 1")])
def test_polish_settings_out_of_range_are_refused_before_anything_runs(tmp_path, capsys, line, says):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text().replace("polish_steps: 3", line))
    assert main(["train-base", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert [says in line for line in err.splitlines() if line.strip()] == [True] and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", [["--steps", "0"], ["--steps", "-5"]])
def test_counts_below_their_minimum_are_refused_before_anything_runs(tmp_path, capsys, override):
    zero = tmp_path / "zero.yaml"
    zero.write_text(TINY.read_text().replace("checkpoint_every: 3", "checkpoint_every: 0"))
    for config, extra in ((TINY, override), (zero, [])):
        assert main(["train-base", "--config", str(config), "--out", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "at least" in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "r").exists()


def test_anchor_phase_is_single_scenes_captioned_in_full_with_one_template_then_everything():
    from lightbooth.data import shapes
    from lightbooth.families.qwen_image import pack
    from lightbooth.training.base import LatentCaptions, scene_at

    latents = torch.randn(60, 4, 4, 4)
    captions = LatentCaptions(latents, seed=3, dropout=0.0, anchor_steps=10)
    singles = [i for i in range(60) if scene_at(3, i).kind == "single"]
    assert 5 < len(singles) < 40
    captions.step = 9
    for i in range(60):
        x, text = captions[i]
        k = singles[i % len(singles)]  # every item is a single scene, its latent and caption agree
        assert torch.equal(x, pack(latents[k:k + 1])[0])
        assert text in {shapes.full_caption(scene_at(3, k), lang, 0) for lang in ("en", "zh")}
    texts = [captions[i][1] for i in range(60)]
    assert {any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts} == {True, False}  # both languages
    captions.step = 10
    items = [captions[i] for i in range(60)]
    assert all(torch.equal(x, pack(latents[i:i + 1])[0]) for i, (x, _) in enumerate(items))  # all kinds again
    full = [{shapes.full_caption(scene_at(3, i), lang, 0) for lang in ("en", "zh")} for i in range(60)]
    assert sum(t not in f for (_, t), f in zip(items, full)) > 30  # other templates, attributes left out
    assert all(captions.scene(i) == scene_at(3, i) for i in range(60))  # the kept scenes are the recomputed ones


def test_a_full_caption_share_states_every_attribute_and_zero_leaves_the_recipe_as_it_was():
    from lightbooth.data import shapes
    from lightbooth.training.base import LatentCaptions, scene_at

    latents = torch.randn(60, 4, 4, 4)
    full = [{shapes.full_caption(scene_at(3, i), lang, t) for lang in ("en", "zh") for t in range(shapes.N_TEMPLATES)}
            for i in range(60)]
    every = LatentCaptions(latents, seed=3, dropout=0.0, full_share=1.0)
    texts = [every[i][1] for i in range(60)]
    assert all(t in f for t, f in zip(texts, full))
    assert len({next(k for k in range(shapes.N_TEMPLATES) if t in {shapes.full_caption(scene_at(3, i), lang, k)
                                                                   for lang in ("en", "zh")})
                 for i, t in enumerate(texts)}) == shapes.N_TEMPLATES  # every template, not only the anchor's
    half = [LatentCaptions(latents, seed=3, dropout=0.0, full_share=0.5)[i][1] for i in range(60)]
    assert 10 < sum(t in f for t, f in zip(half, full)) < 55
    zero = LatentCaptions(latents, seed=3, dropout=0.1, full_share=0.0)
    recipe = []  # what the recipe's captions were before the share existed: the same random numbers, none extra
    for i in range(60):
        rng = np.random.default_rng([3, i, i + 1])
        lang = rng.choice(["en", "zh"])
        recipe.append("" if rng.random() < 0.1 else shapes.caption(scene_at(3, i), lang, rng))
    assert [zero[i][1] for i in range(60)] == recipe
    assert sum(t in f for t, f in zip(recipe, full)) < sum(t in f for t, f in zip(half, full))


def test_a_uniform_share_of_noise_levels_reaches_the_low_noise_end():
    from lightbooth.training.losses import mixed_sigmas

    g = torch.Generator().manual_seed(0)
    shifted = mixed_sigmas(20000, 3.0, 0.0, g)
    mixed = mixed_sigmas(20000, 3.0, 0.3, g)
    assert bool(((shifted > 0) & (shifted < 1)).all() and ((mixed > 0) & (mixed < 1)).all())
    low = lambda s: float((s < 0.3).float().mean())  # noqa: E731
    # shift 3 leaves about 2.6% of levels below 0.3; a 30% uniform share adds 0.3 * 0.3 = 9 points
    assert abs(low(shifted) - 0.026) < 0.01 and abs(low(mixed) - (0.7 * 0.026 + 0.09)) < 0.015


def test_the_decoder_stage_changes_the_decoder_only(tiny_run):
    """The noise-robust decoder fine-tune must leave the encoder, and so the cached latents, exactly as they were;
    the exported model carries the fine-tuned decoder."""
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    before, after = load_file(str(tiny_run / "vae/final" / name)), load_file(str(tiny_run / "decoder/final" / name))
    exported = load_file(str(tiny_run / "model/vae" / name))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert all(torch.equal(exported[k], after[k]) for k in after)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def _extend(vae_dir: Path, run: Path, anchor: float, steps: int = 12):
    import dataclasses

    from lightbooth.config import load_config
    from lightbooth.training import base as B
    from lightbooth.training import base_run as R

    torch.manual_seed(0)
    cfg = dataclasses.replace(load_config(B.BaseTrainConfig, TINY), vae_extend_steps=steps, vae_extend_anchor=anchor,
                              checkpoint_every=100)
    return R.extend_stage(cfg, run, R.load_vae(vae_dir))


def _world_latents(vae, n: int = 16) -> torch.Tensor:
    from lightbooth.training import base as B

    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return B.encode_scenes(vae, 123, 0, n, normalize=False) / std


def test_the_extend_stage_trains_both_halves_and_anchors_the_world_latents(tiny_run, tmp_path):
    """After the flow stage, the VAE learns novel images (so DreamBooth can encode a subject the world never shows)
    while the encoder's latents of world scenes stay near those the flow model learnt: with the anchor they move
    far less than without it, and the stage's result is saved and reused."""
    from safetensors.torch import load_file

    from lightbooth.training.base_run import load_vae

    name = "diffusion_pytorch_model.safetensors"
    source = tiny_run / "decoder" / "final"
    anchored = _extend(source, tmp_path / "anchored", anchor=100.0)
    free = _extend(source, tmp_path / "free", anchor=0.0)
    assert (tmp_path / "anchored" / "extend" / "DONE").exists()
    before, after = load_file(str(source / name)), load_file(str(tmp_path / "anchored/extend/final" / name))
    for part in ("encoder.", "decoder."):
        assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part
    original = _world_latents(load_vae(source))
    drift = lambda vae: float((_world_latents(vae) - original).pow(2).mean().sqrt())  # noqa: E731
    assert drift(anchored) < 0.5 * drift(free)
    again = _extend(source, tmp_path / "anchored", anchor=100.0)  # done: loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), anchored.state_dict().values()))


def test_chinese_captions_are_cut_into_words():
    from lightbooth.data.shapes import caption_words

    assert caption_words("灰色背景上有一个右上角的小的青色十字，在中间") == [
        "灰色", "背景", "上", "有", "一个", "右上角", "的", "小", "的", "青色", "十字", "，", "在", "中间"]
    assert caption_words("图片中有三个正方形") == ["图片", "中", "有", "三个", "正方形"]
    assert caption_words("a large red circle, white background") == ["a large red circle, white background"]


def test_the_built_in_tokenizer_keeps_chinese_words_whole(tmp_path):
    from lightbooth.data.shapes import caption_words
    from lightbooth.families.qwen_image import template_prefix_length
    from lightbooth.training.base import BaseTrainConfig, caption_corpus, train_tokenizer

    tok = train_tokenizer(BaseTrainConfig(), tmp_path / "tok")
    assert template_prefix_length(tok) == 34  # stock diffusers' hard-coded prefix
    held_out = [c for c in caption_corpus(123, 400) if any("\u4e00" <= ch <= "\u9fff" for ch in c)]
    assert len(held_out) == 200
    for text in held_out:  # Qwen2's pre-tokenizer sees the whole Chinese run; no merge may cross a word
        pieces = [tok.decode([t]) for t in tok(text)["input_ids"]]
        assert "".join(pieces) == text
        assert set(np.cumsum([len(p) for p in pieces])) <= set(np.cumsum([len(w) for w in caption_words(text)]))
    assert tok.tokenize("小的黄色正方形") == tok.tokenize("小") + tok.tokenize("的") + tok.tokenize("黄色") \
        + tok.tokenize("正方形")
    assert len(tok.tokenize("正方形")) == 1 and len(tok.tokenize(" square")) == 1
