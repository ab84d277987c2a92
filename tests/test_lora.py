"""LoRA key formats, fusing and safe loading, on tiny real diffusers/transformers components.

The writers below spell each third-party key format independently of lightbooth's own `save_lora`, so a bug in the
reader cannot be hidden by the same bug in the writer. Stock diffusers (`load_lora_weights` + `fuse_lora`) is the
oracle for what a file means.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from lightbooth import lora as L
from lightbooth.errors import LightboothError
from lightbooth.safeload import load_safetensors, save_safetensors_atomic

# ----------------------------------------------------------------------------------------------------------------
# Tiny components
# ----------------------------------------------------------------------------------------------------------------


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
        in_channels=4, out_channels=4, norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def qwen():
    return {"transformer": tiny_qwen()}


@pytest.fixture(scope="module")
def sd():
    return {"unet": tiny_unet(), "text_encoder": tiny_clip()}


def fresh(components):
    return {k: copy.deepcopy(v) for k, v in components.items()}


# (rank, alpha) per target. Ranks 4/8 (and Lightning's 64/8), alphas != rank. The SD text encoder has q/k/v/out:
# diffusers only renames kohya text-encoder attention keys when an out_proj LoRA is present.
QWEN_SPEC = {
    "transformer.transformer_blocks.0.attn.to_q": (4, 2.0),
    "transformer.transformer_blocks.0.attn.to_k": (8, 5.0),
    "transformer.transformer_blocks.1.attn.add_q_proj": (4, 1.5),
    "transformer.transformer_blocks.1.attn.to_out.0": (8, 3.0),
    "transformer.transformer_blocks.1.attn.to_add_out": (4, 2.0),
    "transformer.transformer_blocks.0.img_mlp.net.0.proj": (4, 2.0),
    "transformer.transformer_blocks.1.img_mlp.net.2": (64, 8.0),
}
SD_SPEC = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 5.0),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (4, 1.0),
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v": (8, 2.0),
    "unet.down_blocks.0.attentions.0.proj_in": (4, 3.0),  # 1x1 conv
    "unet.down_blocks.0.resnets.0.conv1": (4, 6.0),  # 3x3 conv (LoCon)
    "text_encoder.encoder.layers.0.self_attn.q_proj": (4, 2.0),
    "text_encoder.encoder.layers.0.self_attn.k_proj": (4, 2.0),
    "text_encoder.encoder.layers.0.self_attn.v_proj": (8, 3.0),
    "text_encoder.encoder.layers.0.self_attn.out_proj": (8, 2.0),
    "text_encoder.encoder.layers.1.mlp.fc1": (4, 1.0),
}


def random_lora(components, spec, seed=1, uniform_alpha=None) -> L.LoraWeights:
    """Random factors scaled so deltas are O(1) and fp32 comparisons at 1e-5 are meaningful."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for target, (r, alpha) in spec.items():
        comp, _, path = target.partition(".")
        w = components[comp].get_submodule(path).weight
        down_shape = (r, *w.shape[1:])
        up_shape = (w.shape[0], r, 1, 1) if w.ndim == 4 else (w.shape[0], r)
        out[target] = L.LoraLayer(
            down=torch.randn(down_shape, generator=g) * 0.2,
            up=torch.randn(up_shape, generator=g) * 0.2,
            alpha=uniform_alpha if uniform_alpha is not None else alpha,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Third-party format writers (independent of lightbooth.save_lora)
# ----------------------------------------------------------------------------------------------------------------


def _split(target):
    comp, _, path = target.partition(".")
    return comp, path


def _flat(target):
    comp, path = _split(target)
    if comp == "unet" or comp == "transformer":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_" + ("text_model." + path).replace(".", "_")


def _old_diffusers_stem(target):
    """Pre-PEFT attention-processor names where they existed, `.lora` elsewhere."""
    comp, path = _split(target)
    head, _, last = path.rpartition(".")
    proc = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v"}
    if comp == "unet" and last in proc:
        return f"{comp}.{head}.processor.{last}_lora", "."
    if comp == "text_encoder" and last in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[last]
        return f"{comp}.text_model.{head}.{name}_lora", "."
    if comp == "text_encoder":
        return f"{comp}.text_model.{path}.lora_linear_layer", "."
    return f"{comp}.{path}.lora", "."


def write_format(weights: L.LoraWeights, fmt: str) -> tuple[dict, dict | None]:
    sd, meta = {}, None
    for target, layer in weights.items():
        comp, path = _split(target)
        alpha = torch.tensor(layer.alpha)
        if fmt == "peft_alpha":
            stem, a, b = target, ".lora_A.weight", ".lora_B.weight"
        elif fmt == "peft_noprefix":
            stem, a, b = path, ".lora_A.weight", ".lora_B.weight"
        elif fmt == "peft_metadata":
            stem, a, b, alpha = target, ".lora_A.weight", ".lora_B.weight", None
        elif fmt == "diffusers_old":
            stem, dot = _old_diffusers_stem(target)
            a, b = f"{dot}down.weight", f"{dot}up.weight"
        elif fmt == "kohya":
            stem, a, b = _flat(target), ".lora_down.weight", ".lora_up.weight"
        elif fmt == "kohya_te1":
            stem, a, b = _flat(target).replace("lora_te_", "lora_te1_"), ".lora_down.weight", ".lora_up.weight"
        elif fmt == "lightning":
            stem, a, b, alpha = path, ".lora_down.weight", ".lora_up.weight", alpha.to(torch.bfloat16)
        elif fmt == "comfyui":
            stem, a, b = f"diffusion_model.{path}", ".lora_down.weight", ".lora_up.weight"
        elif fmt == "comfyui_ab":
            stem, a, b = f"diffusion_model.{path}", ".lora_A.weight", ".lora_B.weight"
        else:
            raise AssertionError(fmt)
        sd[stem + a], sd[stem + b] = layer.down, layer.up
        if alpha is not None:  # old diffusers files had no alpha; when present it sits on the module path
            sd[f"{target if fmt == 'diffusers_old' else stem}.alpha"] = alpha
    if fmt == "peft_metadata":  # what diffusers' save_lora_weights(..., *_lora_adapter_metadata=...) writes
        cfg = {}
        for comp in {t.partition(".")[0] for t in weights}:
            layers = {t.partition(".")[2]: l for t, l in weights.items() if t.startswith(comp + ".")}
            common = Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
            cfg[f"{comp}.lora_alpha"] = common
            cfg[f"{comp}.r"] = 4
            cfg[f"{comp}.alpha_pattern"] = {m: l.alpha for m, l in layers.items() if l.alpha != common}
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}
    return sd, meta


def assert_same_weights(a: L.LoraWeights, b: L.LoraWeights):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].down, b[k].down), k
        assert torch.equal(a[k].up, b[k].up), k
        assert a[k].alpha == pytest.approx(b[k].alpha, rel=1e-6), k


def assert_same_models(a: dict, b: dict, atol=1e-6):
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-5, msg=lambda m: f"{name}.{k}: {m}")


def fused(components, weights):
    out = fresh(components)
    L.fuse(out, weights)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Formats -> one canonical form
# ----------------------------------------------------------------------------------------------------------------

QWEN_FORMATS = {
    "peft_alpha": "peft", "peft_noprefix": "peft", "peft_metadata": "peft", "diffusers_old": "diffusers_old",
    "kohya": "kohya", "lightning": "comfyui", "comfyui": "comfyui", "comfyui_ab": "comfyui",
}
SD_FORMATS = {
    "peft_alpha": "peft", "peft_noprefix": "peft", "peft_metadata": "peft", "diffusers_old": "diffusers_old",
    "kohya": "kohya", "kohya_te1": "kohya",
}


@pytest.mark.parametrize("family", ["qwen-image", "sd"])
def test_every_format_loads_to_the_same_weights(family, qwen, sd, tmp_path):
    components, spec, formats = (qwen, QWEN_SPEC, QWEN_FORMATS) if family == "qwen-image" else (sd, SD_SPEC, SD_FORMATS)
    reference = random_lora(components, spec)
    ref_model = fused(components, reference)
    for fmt, detected in formats.items():
        state_dict, meta = write_format(reference, fmt)
        assert L.detect_format(state_dict) == detected, fmt
        path = tmp_path / f"{fmt}.safetensors"
        save_file(state_dict, str(path), metadata=meta)
        loaded = L.load_lora(path, family, components)
        assert_same_weights(loaded, reference)
        assert_same_models(fused(components, loaded), ref_model)


@pytest.mark.parametrize("family", ["qwen-image", "sd"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_save_load_round_trip(family, fmt, qwen, sd, tmp_path):
    components, spec = (qwen, QWEN_SPEC) if family == "qwen-image" else (sd, SD_SPEC)
    weights = random_lora(components, spec, seed=3)
    path = tmp_path / "out.safetensors"
    L.save_lora(path, weights, format=fmt, metadata={"lightbooth.note": "hi"})
    assert L.load_lora(path, family, components).keys() == weights.keys()
    assert_same_weights(L.load_lora(path, family, components), weights)
    assert load_safetensors(path)[1]["lightbooth.note"] == "hi"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temp file left behind


def test_unfuse_restores_weights(qwen):
    weights = random_lora(qwen, QWEN_SPEC)
    model = fresh(qwen)
    L.fuse(model, weights, scale=0.7)
    L.unfuse(model, weights, scale=0.7)
    assert_same_models(model, qwen, atol=1e-6)


def test_fuse_keeps_dtype_and_computes_in_fp32(qwen):
    weights = random_lora(qwen, QWEN_SPEC)
    model = {"transformer": copy.deepcopy(qwen["transformer"]).to(torch.bfloat16)}
    L.fuse(model, weights)
    ref = fused(qwen, weights)["transformer"].get_submodule("transformer_blocks.0.attn.to_q").weight
    got = model["transformer"].get_submodule("transformer_blocks.0.attn.to_q").weight
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Stock diffusers as the oracle
# ----------------------------------------------------------------------------------------------------------------


def diffusers_fused(family, components, path):
    """Load `path` with stock diffusers `load_lora_weights` + `fuse_lora` and return the fused components."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        StableDiffusionPipeline,
    )

    parts = fresh(components)
    if family == "qwen-image":
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
            transformer=parts["transformer"],
        )
        names = ["transformer"]
    else:
        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=parts["text_encoder"], tokenizer=None, unet=parts["unet"],
            scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        names = ["unet", "text_encoder"]
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA wrappers so state dicts line up
    return parts


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_qwen_matches_stock_diffusers(fmt, qwen, tmp_path):
    weights = random_lora(qwen, QWEN_SPEC, seed=5)
    path = tmp_path / f"{fmt}.safetensors"
    L.save_lora(path, weights, format=fmt)
    ours = fused(qwen, L.load_lora(path, "qwen-image", qwen))
    assert_same_models(diffusers_fused("qwen-image", qwen, path), ours, atol=1e-5)


def test_qwen_lightning_file_matches_stock_diffusers(qwen, tmp_path):
    weights = random_lora(qwen, QWEN_SPEC, seed=6)
    state_dict, _ = write_format(weights, "lightning")
    path = tmp_path / "lightning.safetensors"
    save_file(state_dict, str(path))
    ours = fused(qwen, L.load_lora(path, "qwen-image", qwen))
    assert_same_models(diffusers_fused("qwen-image", qwen, path), ours, atol=1e-5)


def test_sd_peft_matches_stock_diffusers(sd, tmp_path):
    """Mixed ranks and per-module alphas: exact in diffusers through the lora_adapter_metadata we write."""
    weights = random_lora(sd, SD_SPEC, seed=7)
    path = tmp_path / "peft.safetensors"
    L.save_lora(path, weights, format="peft")
    assert_same_models(diffusers_fused("sd", sd, path), fused(sd, weights), atol=1e-5)


def test_sd_kohya_matches_stock_diffusers(sd, tmp_path):
    """One alpha (!= rank) for all layers, mixed ranks.

    diffusers 0.42 turns kohya per-layer alphas into `alpha_pattern` keys that match no module for SD, so it applies
    the most common alpha everywhere; kohya-ss, A1111 and ComfyUI honour each `.alpha`. A file with one alpha is
    read identically by all of them, which is what this checks.
    """
    weights = random_lora(sd, SD_SPEC, seed=8, uniform_alpha=3.0)
    path = tmp_path / "kohya.safetensors"
    L.save_lora(path, weights, format="kohya")
    assert_same_models(diffusers_fused("sd", sd, path), fused(sd, weights), atol=1e-5)


def test_from_peft_model_matches_peft_merge(qwen, tmp_path):
    """Also reads the file diffusers itself writes for that adapter (alphas only in lora_adapter_metadata)."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(qwen["transformer"])
    config = LoraConfig(
        r=4, lora_alpha=2, target_modules=["to_q", "to_k", "add_v_proj"],
        rank_pattern={"^transformer_blocks.1.attn.to_k": 8}, alpha_pattern={"^transformer_blocks.0.attn.to_q": 6},
    )
    model.add_adapter(config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    weights = L.from_peft_model("transformer", model)
    assert weights["transformer.transformer_blocks.0.attn.to_q"].alpha == 6
    assert weights["transformer.transformer_blocks.1.attn.to_k"].rank == 8
    QwenImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(), weight_name="d.safetensors",
    )
    assert_same_weights(L.load_lora(tmp_path / "d.safetensors", "qwen-image", qwen), weights)
    ours = fused(qwen, weights)
    model.fuse_lora()
    model.unload_lora()
    assert_same_models({"transformer": model}, ours, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def _error(fn, *args) -> str:
    with pytest.raises(LightboothError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


class _Trap:
    """Unpickling this creates a marker file: proof that the loader never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    for name, write in {
        "trap.bin": lambda p: p.write_bytes(pickle.dumps({"x": _Trap(str(marker))}, protocol=4)),
        "zip.pt": lambda p: torch.save({"x": torch.zeros(2)}, p),
        "legacy.ckpt": lambda p: torch.save({"x": torch.zeros(2)}, p, _use_new_zipfile_serialization=False),
    }.items():
        path = tmp_path / name
        write(path)
        msg = _error(load_safetensors, path)
        assert name in msg and "pickle" in msg and "safetensors" in msg
    assert not marker.exists()


def _valid_bytes():
    from safetensors.torch import save

    return save({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)})


def _entry(dtype, shape, offsets) -> dict:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "name,content,expect",
    [
        ("truncated.safetensors", lambda: _valid_bytes()[:-20], "past the end"),
        ("tiny.safetensors", lambda: b"\x01\x02", "truncated"),
        ("garbage.safetensors", lambda: b"this is not a tensor file at all", "runs past the end"),
        ("badjson.safetensors", lambda: struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
        ("offsets.safetensors", lambda: _with_header(_entry("F32", [2], [0, 8]), b"\0" * 4), "past the end"),
        ("size.safetensors", lambda: _with_header(_entry("F32", [3], [0, 8]), b"\0" * 8), "does not match"),
        ("dtype.safetensors", lambda: _with_header(_entry("X9", [2], [0, 8]), b"\0" * 8), "dtype"),
        ("garbage.bin", lambda: b"\x00" * 64, "checkpoint"),
    ],
)
def test_corrupt_files_give_one_line_errors(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content())
    msg = _error(load_safetensors, path)
    assert name in msg and expect in msg


def test_missing_file_and_directory(tmp_path):
    assert "does not exist" in _error(load_safetensors, tmp_path / "nope.safetensors")
    assert "directory" in _error(load_safetensors, tmp_path)


def test_atomic_save_overwrites_and_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors_atomic({"a": torch.zeros(3)}, path, {"k": "v"})
    save_safetensors_atomic({"a": torch.ones(3)}, path, {"k": "w"})
    tensors, meta = load_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta["k"] == "w"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_sd_lora_on_qwen_is_a_mismatch(qwen, sd, tmp_path):
    path = tmp_path / "sd.safetensors"
    L.save_lora(path, random_lora(sd, SD_SPEC), format="kohya")
    msg = _error(L.load_lora, path, "qwen-image", qwen)
    assert "does not match this model" in msg and "lora_" in msg
    L.save_lora(path, random_lora(sd, {k: v for k, v in SD_SPEC.items() if k.startswith("unet")}), format="peft")
    assert "does not match this model" in _error(L.load_lora, path, "qwen-image", qwen)


def test_qwen_lora_on_sd_is_a_mismatch(qwen, sd, tmp_path):
    path = tmp_path / "q.safetensors"
    state_dict, _ = write_format(random_lora(qwen, QWEN_SPEC), "lightning")
    save_file(state_dict, str(path))
    assert "does not match this model" in _error(L.load_lora, path, "sd", sd)


def test_shape_mismatch_names_the_layer(qwen, tmp_path):
    """A LoRA for a wider model (e.g. another size) has the right names but the wrong shapes."""
    path = tmp_path / "wide.safetensors"
    target = "transformer_blocks.0.attn.to_q"
    wide = {f"{target}.lora_down.weight": torch.zeros(4, 64), f"{target}.lora_up.weight": torch.zeros(64, 4)}
    save_file(wide, str(path))
    msg = _error(L.load_lora, path, "qwen-image", qwen)
    assert target in msg and "does not match this model" in msg


def test_unknown_keys_and_incomplete_pairs(qwen):
    modules = L.modules_of(qwen)
    down = torch.zeros(4, 32)
    msg = _error(L.to_canonical, {"transformer_blocks.0.attn.to_q.hada_w1_a": down}, "qwen-image", modules)
    assert "hada_w1_a" in msg
    msg = _error(L.to_canonical, {"transformer_blocks.0.attn.to_q.lora_A.weight": down}, "qwen-image", modules)
    assert "lora_B" in msg
    msg = _error(L.to_canonical, {"transformer_blocks.9.attn.to_q.lora_A.weight": down}, "qwen-image", modules)
    assert "transformer_blocks.9" in msg and "does not match" in msg


def test_fuse_changes_nothing_when_a_layer_is_bad(qwen):
    weights = random_lora(qwen, QWEN_SPEC)
    weights["transformer.transformer_blocks.1.attn.to_v"] = L.LoraLayer(torch.zeros(4, 31), torch.zeros(32, 4), 4.0)
    model = fresh(qwen)
    _error(L.fuse, model, weights)
    assert_same_models(model, qwen, atol=0)
