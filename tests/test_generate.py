"""Generation on tiny random models of both families: equal to stock diffusers, seeded, batch-independent."""

import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, QwenImagePipeline, StableDiffusionPipeline

from lightbooth.errors import LightboothError
from lightbooth.families.base import Cond, guided
from lightbooth.families.qwen_image import QWEN_PROMPT_TEMPLATE, template_prefix_length
from lightbooth.generate import Generator
from lightbooth.sampling import guidance
from lightbooth.tiny import tiny_qwen_tokenizer

PROMPTS = ["a large red circle on the left, white background", "蓝色正方形在黄色五角星的左边"]


def arr(images):
    return np.stack([np.asarray(i) for i in images]).astype(np.int16)


def test_qwen_matches_stock_pipeline_with_true_cfg(qwen_gen, qwen_dir):
    # stock diffusers runs CFG as two forwards; lightbooth batches them into one: the images must agree
    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.prompt_template_encode_start_idx = qwen_gen.family.prefix_len
    gens = [torch.Generator("cpu").manual_seed(s) for s in (7, 7)]
    ref = pipe(PROMPTS, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=6, height=64, width=64,
               generator=gens, output_type="np").images
    ours = arr(qwen_gen(PROMPTS, negative_prompt=" ", guidance=4.0, seed=7, steps=6, width=64, height=64))
    assert np.abs(ours - np.round(ref * 255)).max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("model", ["sd_dir", "sd_v_dir"])
def test_sd_matches_stock_pipeline(model, sampler, request):
    path = request.getfixturevalue(model)
    gen = Generator.load(path, device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if sampler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 3)]
    ref = pipe(PROMPTS, negative_prompt=["blurry"] * 2, guidance_scale=7.5, num_inference_steps=8, height=16,
               width=16, generator=gens, output_type="np").images
    ours = arr(gen(PROMPTS, negative_prompt="blurry", seed=3, steps=8, sampler=sampler))
    assert np.abs(ours - np.round(ref * 255)).max() <= 1


def test_batched_cfg_equals_two_passes(qwen_gen):
    fam = qwen_gen.family
    cond, uncond = fam.encode(["a red circle on a black background"]), fam.encode([""])
    assert cond.embeds.shape[1] != uncond.embeds.shape[1]  # different lengths: the batch needs padding + mask
    x = fam.noise(1, 64, 64)
    calls = []
    fwd = lambda xx, c: calls.append(xx.shape[0]) or fam._forward(xx, c, torch.tensor(0.7), (1, 8, 8))  # noqa
    with torch.inference_mode():
        one = guided(fwd, guidance.cfg_norm_rescale, x, cond, uncond, 4.0)
        two = guidance.cfg_norm_rescale(fwd(x, cond), fwd(x, uncond), 4.0)
    assert calls == [2, 1, 1]  # one batched forward, then the reference's two
    assert torch.allclose(one, two, atol=1e-5)


def test_cfg_rescale_off_is_plain_cfg_and_travels_with_the_image(qwen_gen):
    fam = qwen_gen.family
    cond, uncond = fam.encode(["a red circle on a black background"]), fam.encode([""])
    x, s = fam.noise(1, 64, 64), torch.tensor(0.7)
    with torch.inference_mode():
        c, u = fam.velocity(x, cond, s, 64, 64), fam.velocity(x, uncond, s, 64, 64)
        plain = fam.velocity(x, cond, s, 64, 64, uncond, 4.0, rescale=False)
        rescaled = fam.velocity(x, cond, s, 64, 64, uncond, 4.0)
    assert torch.allclose(plain, guidance.cfg(c, u, 4.0), atol=1e-5)
    assert torch.allclose(rescaled, guidance.cfg_norm_rescale(c, u, 4.0), atol=1e-5)
    assert not torch.allclose(plain, rescaled, atol=1e-3)
    kw = dict(seed=3, steps=3, guidance=4.0)
    on, off = qwen_gen("a red circle", **kw)[0], qwen_gen("a red circle", cfg_rescale=False, **kw)[0]
    assert json.loads(on.info["lightbooth"])["cfg_rescale"] is True
    assert json.loads(off.info["lightbooth"])["cfg_rescale"] is False
    assert np.abs(np.asarray(on, dtype=int) - np.asarray(off, dtype=int)).max() > 0


def test_a_model_preset_may_turn_the_cfg_rescale_off(qwen_dir, tmp_path, capsys):
    import shutil

    from lightbooth.cli import main
    from lightbooth.images import read_params

    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model)
    plain = {"steps": 3, "guidance": 4.0, "sampler": "flow_euler", "cfg_rescale": False}
    (model / "lightbooth.json").write_text(json.dumps({"default_preset": "plain", "presets": {"plain": plain}}))
    gen = Generator.load(model, device="cpu")
    assert gen.settings().preset.cfg_rescale is False and gen.settings(cfg_rescale=True).preset.cfg_rescale is True
    a = gen("a red circle", seed=3)[0]
    b = Generator.load(qwen_dir, device="cpu")("a red circle", seed=3, steps=3, guidance=4.0, cfg_rescale=False)[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() == 0
    # the command line's switch reaches the image
    assert main(["generate", "a red circle", "--out", str(tmp_path / "o"), "--model", str(model), "--cfg-rescale"]) == 0
    png = capsys.readouterr().out.split()[0]
    assert read_params(png)["cfg_rescale"] is True


def test_image_is_the_same_alone_or_in_any_batch(qwen_gen, sd_gen):
    for gen, size in ((qwen_gen, 64), (sd_gen, 16)):
        alone = arr(gen("a red circle", seed=11, steps=4, width=size, height=size))
        batch = gen(["a blue star above a green square, black background", "a red circle", "三个"], seed=10,
                    num_images=2, steps=4, width=size, height=size, batch_size=6)
        match = [im for im in batch if json.loads(im.info["lightbooth"]) ["prompt"] == "a red circle"
                 and json.loads(im.info["lightbooth"])["seed"] == 11]
        assert len(match) == 1
        assert np.abs(arr(match) - alone).max() <= 2
        # and a different seed gives a different image
        assert np.abs(arr(batch[:1]) - alone).max() > 10


def test_the_stochastic_sampler_draws_each_images_fresh_noise_from_its_own_seed(qwen_gen, sd_gen):
    for gen, size in ((qwen_gen, 64), (sd_gen, 16)):
        kw = dict(steps=4, width=size, height=size, sampler="flow_stochastic")
        alone = gen("a red circle", seed=11, **kw)
        assert json.loads(alone[0].info["lightbooth"])["sampler"] == "flow_stochastic"
        batch = gen(["a blue star above a green square, black background", "a red circle"], seed=10,
                    num_images=2, batch_size=4, **kw)
        assert np.abs(arr(batch[3:]) - arr(alone)).max() <= 2  # "a red circle", seed 11, in a batch of four
        euler = gen("a red circle", seed=11, **{**kw, "sampler": "flow_euler"})
        assert np.abs(arr(euler) - arr(alone)).max() > 10  # the fresh noise matters


def test_euler_steps_keep_the_stochastic_samplers_first_steps_deterministic(qwen_gen):
    kw = dict(seed=11, steps=4, sampler="flow_stochastic")
    euler = arr(qwen_gen("a red circle", seed=11, steps=4, sampler="flow_euler"))
    assert np.abs(arr(qwen_gen("a red circle", euler_steps=4, **kw)) - euler).max() <= 2  # all four: Euler
    half = qwen_gen("a red circle", euler_steps=2, **kw)
    assert json.loads(half[0].info["lightbooth"])["euler_steps"] == 2  # the PNG says how to draw it again
    for other in (euler, arr(qwen_gen("a red circle", **kw))):
        assert np.abs(arr(half) - other).max() > 10
    with pytest.raises(LightboothError, match="flow_stochastic sampler only"):
        qwen_gen.settings(steps=4, sampler="flow_euler", euler_steps=2)


def test_seeds_and_metadata(qwen_gen):
    images = qwen_gen(["a", "b"], seed=42, num_images=3, steps=2)
    meta = [json.loads(im.info["lightbooth"]) for im in images]
    assert [(m["prompt"], m["seed"]) for m in meta] == [(p, s) for p in "ab" for s in (42, 43, 44)]
    m = meta[0]
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "model", "loras",
                "preset", "sampler"):
        assert key in m
    assert m["steps"] == 2 and m["preset"] == "base" and m["sampler"] == "flow_euler"
    assert images[0].info["parameters"].startswith("a\n") and "Seed: 42" in images[0].info["parameters"]
    explicit = qwen_gen("a", seed=[42, 44], steps=2)
    assert np.array_equal(arr(explicit[:1]), arr(images[:1])) and np.array_equal(arr(explicit[1:]), arr(images[2:3]))


def test_chinese_prompt_changes_the_image(qwen_gen):
    zh = arr(qwen_gen("白色背景上，左边有一个大的红色圆形", seed=1, steps=3))
    en = arr(qwen_gen("a large red circle on the left, white background", seed=1, steps=3))
    assert zh.shape == en.shape and np.abs(zh - en).max() > 0


def test_prompt_prefix_length_is_derived_from_the_tokenizer():
    tok = tiny_qwen_tokenizer()
    n = template_prefix_length(tok)
    assert n == len(tok(QWEN_PROMPT_TEMPLATE.split("{}")[0])["input_ids"])
    # a tokenizer with fewer merges splits the same prefix into more tokens: the length follows it
    small = tiny_qwen_tokenizer(vocab_size=300)
    assert template_prefix_length(small) > n


def test_qwen_encoding_keeps_only_the_user_tokens(qwen_gen):
    fam = qwen_gen.family
    tok = fam.components["tokenizer"]
    for prompt in ("a red circle", "红色圆形在左边"):
        full = tok(QWEN_PROMPT_TEMPLATE.format(prompt))["input_ids"]
        assert fam.encode([prompt]).embeds.shape[1] == len(full) - fam.prefix_len


def test_lightning_preset_runs_one_forward_per_step_on_shift3(qwen_gen):
    fam = qwen_gen.family
    batches = []
    hook = fam.denoiser.register_forward_hook(lambda m, a, kw, out: batches.append(kw["hidden_states"].shape[0]),
                                              with_kwargs=True)
    try:
        qwen_gen("a red circle", seed=0, preset="lightning")
        qwen_gen("a red circle", seed=0, preset="lightning-4")
        qwen_gen("a red circle", seed=0, steps=3, guidance=4.0)
    finally:
        hook.remove()
    assert batches == [1] * 8 + [1] * 4 + [2] * 3  # guidance 1: no unconditional pass; CFG: one batch of 2
    s = qwen_gen.settings(preset="lightning")
    assert (s.preset.steps, s.preset.guidance, s.preset.shift) == (8, 1.0, 3.0)


def test_cond_cat_pads_and_masks():
    a, b = Cond(torch.ones(1, 3, 2)), Cond(torch.ones(1, 5, 2))
    c = Cond.cat([a, b])
    assert c.embeds.shape == (2, 5, 2) and c.mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert c.embeds[0, 3:].abs().sum() == 0
    assert Cond.cat([b, b]).mask is None


def test_a_preset_can_fuse_a_lora_shipped_in_the_model_folder(qwen_dir, tmp_path):
    # the built-in model's 4- and 8-step presets work this way: the default preset fuses its own LoRA at load
    import shutil

    from lightbooth.errors import LightboothError
    from lightbooth.lora import LoraLayer, save_lora

    model = tmp_path / "m"
    shutil.copytree(qwen_dir, model)
    g = torch.Generator().manual_seed(3)
    layer = Generator.load(model, device="cpu").family.denoiser.transformer_blocks[0].attn.to_q
    weights = {"transformer.transformer_blocks.0.attn.to_q": LoraLayer(
        torch.randn(4, layer.in_features, generator=g), torch.randn(layer.out_features, 4, generator=g), 4.0)}
    (model / "fast").mkdir()
    save_lora(model / "fast" / "four.safetensors", weights, format="kohya")
    four = {"steps": 4, "guidance": 1.0, "sampler": "flow_euler", "shift": 3.0, "lora": "fast/four.safetensors"}
    (model / "lightbooth.json").write_text(json.dumps({"default_preset": "four", "presets": {"four": four}}))

    fast = Generator.load(model, device="cpu")
    images = fast("a red circle", seed=[0, 1])
    assert json.loads(images[0].info["lightbooth"])["preset"] == "four"
    # the same as fusing that file by hand and sampling on the same schedule
    by_hand = Generator.load(model, loras=[model / "fast" / "four.safetensors"], device="cpu", preset="lightning-4")
    assert np.abs(arr(images) - arr(by_hand("a red circle", seed=[0, 1]))).max() == 0
    plain = Generator.load(model, device="cpu", preset="base")
    assert np.abs(arr(images) - arr(plain("a red circle", seed=[0, 1], preset="lightning-4"))).max() > 0  # the LoRA
    with pytest.raises(LightboothError, match="--preset base"):
        fast("a red circle", preset="base")  # loaded with the LoRA fused: the plain model needs loading anew
    with pytest.raises(LightboothError, match="--preset four"):
        plain("a red circle", preset="four")
    (model / "fast" / "four.safetensors").unlink()
    with pytest.raises(LightboothError, match="missing"):
        Generator.load(model, device="cpu")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomically_written_files_get_the_mode_of_ordinary_new_files(umask, tmp_path):
    """mkstemp's 0600 must not leak into images, LoRAs and configs (other users of a shared folder read them)."""
    import os

    from PIL import Image

    from lightbooth.atomic import write_text_atomic
    from lightbooth.images import save_png
    from lightbooth.safeload import save_safetensors_atomic

    old = os.umask(umask)
    try:
        files = [save_png(Image.new("RGB", (4, 4)), tmp_path, "img"), tmp_path / "lora.safetensors",
                 tmp_path / "config.yaml"]
        save_safetensors_atomic({"w": torch.zeros(2)}, files[1])
        write_text_atomic(files[2], "a: 1\n")
    finally:
        os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(0o666 & ~umask)] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "img.png", "lora.safetensors"]


def test_bad_api_arguments_are_lightbooth_errors(qwen_gen):
    from lightbooth.errors import LightboothError

    one = arr(qwen_gen("a red circle", seed=3, steps=2))
    assert (arr(qwen_gen("a red circle", seed=np.int64(3), steps=2)) == one).all()  # numpy seeds are seeds
    for kwargs, needle in ((dict(seed="42"), "not a whole number"),  # not seeds 4 and 2
                           (dict(seed=1.5), "not a whole number"), (dict(seed=[]), "seed list is empty"),
                           (dict(seed=2 ** 64), "out of range"), (dict(width=0), "multiple"),
                           (dict(batch_size=0), "batch size"), (dict(guidance=float("inf")), "finite")):
        with pytest.raises(LightboothError, match=needle):
            qwen_gen("a red circle", steps=2, **kwargs)
    for kwargs, needle in ((dict(dtype="junk"), "not a torch dtype"), (dict(device="tpu"), "unknown device"),
                           (dict(loras=[("x.safetensors", float("nan"))]), "finite")):
        with pytest.raises(LightboothError, match=needle):
            Generator.load(qwen_gen.family.path, **kwargs)


def test_tiny_models_have_ordinary_file_modes(qwen_dir, sd_dir):
    from lightbooth.atomic import new_file_mode

    modes = {f.stat().st_mode & 0o777 for d in (qwen_dir, sd_dir) for f in d.rglob("*.safetensors")}
    assert modes == {new_file_mode()}  # save_pretrained alone leaves weights 0600
