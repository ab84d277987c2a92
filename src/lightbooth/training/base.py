"""Train the built-in model from scratch on the shapes world: tokenizer -> VAE -> latent cache -> flow matching.

Each stage writes into the run folder and marks itself done, so `--resume` skips finished stages and continues
the running one from its newest good checkpoint. The result is a stock diffusers QwenImagePipeline folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import open_up, write_text_atomic
from ..data import novel, shapes
from ..errors import LightboothError
from ..families.qwen_image import QWEN_PROMPT_TEMPLATE, pack, template_prefix_length


@dataclass
class BaseTrainConfig:
    """Recipe of the built-in model. Defaults are the shipped recipe (about 2 h 48 min from scratch on a 2-core CPU)."""

    seed: int = 0  # everything (data, init, noise) derives from it
    threads: int = 0  # torch CPU threads; 0 = all cores
    # tokenizer and text encoder
    vocab_size: int = 800  # at most; byte-level BPE learnt on the captions; the template prefix must stay 34 tokens
    text_dim: int = 64  # Qwen2.5-VL text model width
    text_layers: int = 2
    # VAE (AutoencoderKLQwenImage), trained on random crops: convolutions do not care about image size
    vae_base_dim: int = 16
    vae_z_dim: int = 16  # latent channels: 4 cannot hold concave outlines at 64 tokens, 16 can (BENCHMARKS.md)
    vae_downsamples: int = 2  # 64x64 images -> 16x16 latents
    vae_steps: int = 6000  # at z 16, 32/32 single, pair and count scenes round-trip (z 4 needed 8,000 for 90-98%)
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_novel: float = 0.0  # share of VAE and decoder training crops with novel colours and textures
    # then the decoder alone learns to decode latents with noise of std up to decoder_noise (normalized units)
    decoder_steps: int = 2000
    decoder_noise: float = 0.15  # 0.3 survives more noise but costs clean pairs (92% -> 73% pass); BENCHMARKS.md
    # after the flow stage, both halves of the VAE learn novel images (data/novel.py) so that DreamBooth can encode,
    # and the decoder draw, a user's subject; on world scenes the decoder keeps decoding the latents the flow model
    # learnt, and the encoder is held near them (MSE, weight vae_extend_anchor, normalized units); 0 steps: off
    vae_extend_steps: int = 0
    vae_extend_novel: float = 0.5  # share of the extension's crops that are novel images
    vae_extend_anchor: float = 1.0
    # transformer (QwenImageTransformer2DModel)
    dim: int = 192  # heads * 32; 128 trains 1.5x faster per step but at equal time draws worse (BENCHMARKS.md)
    layers: int = 4
    latent_cache: int = 20000  # scenes encoded once and reused, captions re-drawn each time
    steps: int = 50000  # about 2 h 15 min at 2 threads (5.2-6.5 steps/s); 30,000 scored single-object prompts
    batch: int = 16  # 38% / 49% strict, 42,000 54% / 62%, 50,000 57% / 66% (BENCHMARKS.md, seventh version)
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty prompt this often, so CFG has an unconditional model
    # the first anchor_steps flow steps train on single-object scenes only, captioned in full with one fixed
    # template per language: with the cell words always at about the same token index the transformer learns
    # positions (it has no absolute position embedding, only rotary offsets to text tokens); on the varied
    # captions alone, or with pairs and counts mixed in, it did not (bench/position_probe.py; BENCHMARKS.md)
    anchor_steps: int = 6000
    train_shift: float = 3.0  # flow shift on training noise levels: layout, colour and place are decided at high noise
    # (1.0 was tried, 12,000 steps: better at low noise, worse backgrounds and colours; BENCHMARKS.md)
    train_uniform: float = 0.0  # share of noise levels drawn uniformly instead (0.3 was worse; BENCHMARKS.md)
    sample_shift: float = 3.0  # the shipped scheduler's fixed shift, likewise spending steps at high noise
    # then a polish stage: polish_steps more flow steps from the flow stage's EMA weights at a low learning rate
    # (warm-up 100, cosine to 10%) with a fast EMA, on captions of which polish_full_captions state every attribute
    # (as `lightbooth eval`'s prompts, and users who say what they want, do); 0 steps: off. 2,500 steps passed 245 /
    # 292 eval prompts (256 per kind, en / zh) where the seventh version passed 211 / 261, the same steps on the
    # recipe's captions 223 / 274 (BENCHMARKS.md, 2026-12-07)
    polish_steps: int = 2500
    polish_lr: float = 5e-5
    polish_ema_decay: float = 0.99
    polish_full_captions: float = 0.5
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # the exported transformer's storage precision: float16 halves the file (the package's model must stay under
    # 25 MB); lightbooth and stock diffusers load it back as float32 unless asked otherwise
    transformer_dtype: str = "float16"  # width 192 is 22 MB in float32
    # defaults written into the model folder (lightbooth.json)
    default_steps: int = 20
    default_guidance: float = 2.0  # from 20,000 steps on, better than 4 on the lenient measures and strict accuracy
    # plain CFG; True: Qwen-Image's own (each token's guided velocity rescaled to the conditional one's norm), which
    # stock diffusers' QwenImagePipeline always applies; plain passed more prompts of every kind (BENCHMARKS.md)
    default_cfg_rescale: bool = False


# may differ on --resume (e.g. train longer); everything else may not
RESUMABLE_CHANGES = {"steps", "polish_steps", "threads", "checkpoint_every", "keep_checkpoints", "default_steps",
                     "default_guidance", "default_cfg_rescale", "sample_shift", "transformer_dtype"}


# --- data ----------------------------------------------------------------------------------------------------
def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def scene_at(seed: int, index: int) -> shapes.Scene:
    """Scene `index` of the training set: recomputed from the seed, so only latents need storing."""
    return shapes.sample_scene(scene_rng(seed, index))


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def caption_corpus(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([seed, 99])
    out = []
    for i in range(n):
        scene = shapes.sample_scene(rng)
        out.append(shapes.caption(scene, "en" if i % 2 else "zh", rng))
    return out


# --- stage 1: tokenizer ----------------------------------------------------------------------------------------
def train_tokenizer(cfg: BaseTrainConfig, folder: Path):
    from transformers import Qwen2Tokenizer

    from ..bpe import train_byte_bpe

    template = [QWEN_PROMPT_TEMPLATE.format("")] * 200  # weight the template so its words become whole tokens
    # each Chinese word is its own training text, so no merge spans two words (see shapes.caption_words)
    words = [w for text in caption_corpus(cfg.seed, 4000) for w in shapes.caption_words(text)]
    vocab, merges = train_byte_bpe(words + template, cfg.vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    n = template_prefix_length(tok)
    if n != 34:
        raise LightboothError(f"the trained tokenizer splits the template prefix into {n} tokens, not 34; "
                              "raise vocab_size so stock diffusers' hard-coded prefix length fits")
    tok.save_pretrained(str(folder))
    return tok


# --- stage 2: VAE ----------------------------------------------------------------------------------------------
def build_vae(cfg: BaseTrainConfig):
    from diffusers import AutoencoderKLQwenImage

    z = cfg.vae_z_dim
    return AutoencoderKLQwenImage(base_dim=cfg.vae_base_dim, z_dim=z, dim_mult=[1] + [2] * cfg.vae_downsamples,
                                  num_res_blocks=1, temperal_downsample=[False] * cfg.vae_downsamples,
                                  latents_mean=[0.0] * z, latents_std=[1.0] * z)


class CropStream(torch.utils.data.IterableDataset):
    """Endless random crops of shapes-world images, aligned to the latent grid; a share `novel` of them from
    images of things the world never shows (data/novel.py), so the VAE can encode a user's subject."""

    def __init__(self, seed: int, crop: int, align: int, novel: float = 0.0, flagged: bool = False):
        self.seed, self.crop, self.align, self.novel, self.flagged = seed, crop, align, novel, flagged

    def __iter__(self):
        rng = np.random.default_rng([self.seed, 7])
        while True:
            is_novel = bool(self.novel and rng.random() < self.novel)  # no draw at 0: old recipes' stream unchanged
            img = novel.render_novel(rng) if is_novel else shapes.render(shapes.sample_scene(rng))
            img = np.asarray(img, dtype=np.float32)
            y, x = (rng.integers(0, (shapes.CANVAS - self.crop) // self.align + 1, 2) * self.align).tolist()
            crop = torch.from_numpy(img[y:y + self.crop, x:x + self.crop]).permute(2, 0, 1) / 127.5 - 1
            yield (crop, is_novel) if self.flagged else crop  # flagged: (crop, whether it is a novel image)


def latent_stats(vae, seed: int, n: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over `n` scenes (the pipeline normalizes with them)."""
    zs = encode_scenes(vae, seed + 1, 0, n, normalize=False)
    return zs.mean(dim=(0, 2, 3)).tolist(), zs.std(dim=(0, 2, 3)).tolist()


@torch.no_grad()
def encode_scenes(vae, seed: int, start: int, n: int, normalize: bool = True, batch: int = 64) -> torch.Tensor:
    """Posterior means (B, z, h, w) of scenes start..start+n, optionally normalized as the pipeline expects."""
    out = []
    for i in range(start, start + n, batch):
        images = [shapes.render(scene_at(seed, k)) for k in range(i, min(i + batch, start + n))]
        z = vae.encode(to_tensor(images)[:, :, None]).latent_dist.mean[:, :, 0]
        out.append(z)
    z = torch.cat(out)
    return normalize_latents(vae, z) if normalize else z


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Posterior means (B, z, h, w) in the pipeline's units: (z - latents_mean) / latents_std per channel."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return (z - mean) / std


# --- stage 3: text encoder and transformer -----------------------------------------------------------------------
def build_text_encoder(cfg: BaseTrainConfig, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    head = 16  # head dim; Qwen's multimodal RoPE splits its half (8) into (time, height, width) sections
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=cfg.text_dim, intermediate_size=cfg.text_dim * 3, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_dim // head, num_key_value_heads=cfg.text_dim // head,
                         vocab_size=n, max_position_embeddings=2048, rope_theta=10000.0,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                         bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=cfg.text_dim),
        vocab_size=n, vision_start_token_id=n + 1, vision_end_token_id=n + 2, vision_token_id=n + 3,
        image_token_id=n + 4, video_token_id=n + 5, tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_transformer(cfg: BaseTrainConfig):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=cfg.vae_z_dim * 4, out_channels=cfg.vae_z_dim,
                                       num_layers=cfg.layers, attention_head_dim=32, num_attention_heads=cfg.dim // 32,
                                       joint_attention_dim=cfg.text_dim, axes_dims_rope=(8, 12, 12))


class LatentCaptions(torch.utils.data.Dataset):
    """Cached latents with a fresh random caption (English or Chinese, random phrasing) each time.

    While `step` (the training step, kept up to date by the trainer) is below `anchor_steps`, every item is a
    single-object scene (index i stands for the i-th one, cyclically) captioned with every attribute in template 0
    of its language (the recipe's anchor phase). `full_share`: the share of the other captions that state every
    attribute (a random template), as `lightbooth eval`'s prompts do; 0 (the recipe) draws no extra random number.
    """

    def __init__(self, latents: torch.Tensor, seed: int, dropout: float, anchor_steps: int = 0,
                 full_share: float = 0.0):
        self.latents, self.seed, self.dropout, self.draws = latents, seed, dropout, 0
        self.full_share = full_share
        self.anchor_steps, self.step = anchor_steps, 0
        # scenes are kept once drawn: redrawing one (placement retries) was 80% of an item's time, ~60 ms per batch of
        # 32 on a 2-core CPU, about a tenth of a one-thread CPU step and a large share of a GPU one
        self._scenes: dict[int, shapes.Scene] = {}
        self.singles = [i for i in range(len(latents)) if self.scene(i).kind == "single"] if anchor_steps else []

    def scene(self, i: int) -> shapes.Scene:
        """`scene_at(seed, i)`, drawn once."""
        if i not in self._scenes:
            self._scenes[i] = scene_at(self.seed, i)
        return self._scenes[i]

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        self.draws += 1
        rng = np.random.default_rng([self.seed, i, self.draws])
        lang = rng.choice(["en", "zh"])
        anchor = self.step < self.anchor_steps and self.singles
        if anchor:
            i = self.singles[i % len(self.singles)]
        if rng.random() < self.dropout:
            text = ""
        elif anchor:
            text = shapes.full_caption(self.scene(i), lang, 0)
        elif self.full_share and rng.random() < self.full_share:
            text = shapes.full_caption(self.scene(i), lang, int(rng.integers(shapes.N_TEMPLATES)))
        else:
            text = shapes.caption(self.scene(i), lang, rng)
        return pack(self.latents[i:i + 1])[0], text


def collate(items):
    return torch.stack([x for x, _ in items]), [t for _, t in items]


def stored_copy(module: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy of `module` in the storage precision; refuses weights that precision cannot hold."""
    out = copy.deepcopy(module).to(getattr(torch, dtype))
    bad = [n for n, t in out.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LightboothError(f"weights such as {bad[0]} overflow {dtype}; set transformer_dtype: bfloat16 or float32")
    return out


def export_pipeline(cfg: BaseTrainConfig, run: Path, tokenizer, vae, text_encoder, transformer) -> Path:
    """Write the trained parts as a stock diffusers QwenImagePipeline folder plus lightbooth.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.sample_shift, use_dynamic_shifting=False)
    transformer = stored_copy(transformer, cfg.transformer_dtype)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    out = run / "model"
    tmp = run / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    settings = {"default_preset": "base", "presets": {"base": {"steps": cfg.default_steps,
                "guidance": cfg.default_guidance, "sampler": "flow_euler", "cfg_rescale": cfg.default_cfg_rescale}},
                "trained_with": dataclasses.asdict(cfg)}
    write_text_atomic(tmp / "lightbooth.json", json.dumps(settings, indent=1))
    open_up(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def prepare_run(run: Path, cfg: BaseTrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless asked; save the resolved config."""
    from .checkpoints import prepare_run_folder

    if cfg.transformer_dtype not in ("float32", "float16", "bfloat16"):
        raise LightboothError(f"transformer_dtype must be float32, float16 or bfloat16 (got {cfg.transformer_dtype!r})")
    for least, keys in ((1, POSITIVE_KEYS), (0, NON_NEGATIVE_KEYS)):
        for key in keys:
            if getattr(cfg, key) < least:
                raise LightboothError(f"{key} must be at least {least} (got {getattr(cfg, key)}); fix it in the "
                                      "config or the flag")
    if not 0 <= cfg.polish_full_captions <= 1:
        raise LightboothError(f"polish_full_captions is a share, from 0 to 1 (got {cfg.polish_full_captions}); fix "
                              "it in the config")
    prepare_run_folder(run, cfg, resume, overwrite, RESUMABLE_CHANGES)


# counts the stages divide by or loop over: checked before anything is trained or written
POSITIVE_KEYS = ("steps", "vae_steps", "vae_batch", "vae_crop", "batch", "checkpoint_every", "keep_checkpoints",
                 "latent_cache", "dim", "layers", "text_dim", "text_layers", "vocab_size", "vae_base_dim", "vae_z_dim",
                 "default_steps")
NON_NEGATIVE_KEYS = ("threads", "decoder_steps", "vae_extend_steps", "anchor_steps", "warmup", "vae_downsamples",
                     "polish_steps")
