"""Tiny random models of the real architectures, built in code, written as diffusers folders.

Tests and CPU benchmarks use these: they exercise the same diffusers / transformers classes a real checkpoint
loads into, at a size that runs in milliseconds, with no download. Nothing here is used at generation time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import open_up
from .bpe import train_byte_bpe
from .families.qwen_image import QWEN_PROMPT_TEMPLATE

# Text the tiny tokenizers learn their merges from: the prompt template and a few bilingual captions.
_CORPUS = [
    QWEN_PROMPT_TEMPLATE.format(""),
    "a large red circle on the left, white background",
    "a blue square to the left of a yellow star",
    "three green triangles on a black background",
    "白色背景上，左边有一个大的红色圆形",
    "蓝色正方形在黄色五角星的左边",
    "黑色背景上有三个绿色三角形",
]


def tiny_qwen_tokenizer(texts=_CORPUS, vocab_size: int = 500):
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_bpe(texts * 8, vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def tiny_clip_tokenizer(texts=_CORPUS, vocab_size: int = 400):
    """A CLIP tokenizer (lower-cased BPE with end-of-word markers) with a vocabulary learnt from `texts`."""
    from transformers import CLIPTokenizer

    alphabet = sorted({c for t in texts for c in t.lower() if not c.isspace()})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w for t in texts for w in t.lower().split()}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1 and len(vocab) < vocab_size:
            a, b = parts[0], parts[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            parts = [a + b] + parts[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """A split of a head's RoPE dims over (frame, height, width), all even: (4, 6, 6) for the tests' 16."""
    t = head_dim // 8 * 2
    return t, (head_dim - t) // 2, (head_dim - t) // 2


def tiny_qwen_components(seed: int = 0, hidden: int = 32, layers: int = 2) -> dict:
    """Random QwenImage transformer, Qwen VAE and Qwen2.5-VL text encoder, a few hundred thousand weights each."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    text_dim = 32
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_dim),
        vocab_size=len(tokenizer),
        vision_start_token_id=len(tokenizer) + 1, vision_end_token_id=len(tokenizer) + 2,
        vision_token_id=len(tokenizer) + 3, image_token_id=len(tokenizer) + 4, video_token_id=len(tokenizer) + 5,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=hidden // 2,
        num_attention_heads=2, joint_attention_dim=text_dim, axes_dims_rope=rope_axes(hidden // 2),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.1, 0.9, 1.3, 1.0]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon", block_out_channels=(32, 64),
                       sample_size: int = 8) -> dict:
    """Random SD 1.x-shaped UNet, VAE and CLIP text encoder (the layout of diffusers' own tiny test models).

    `block_out_channels` and `sample_size` (latent side) widen the UNet for benchmarks; the defaults are the tests'.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), layers_per_block=1, sample_size=sample_size, in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, pad_token_id=1,
    )).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_pipeline(family: str, components: dict, path: str | Path) -> Path:
    """Write components as a diffusers folder through the stock pipeline class (so the layout is diffusers')."""
    from diffusers import QwenImagePipeline, StableDiffusionPipeline

    if family == "qwen-image":
        pipe = QwenImagePipeline(**components)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    open_up(path)  # save_pretrained leaves its weights 0600
    return Path(path)


def build_tiny_model(family: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and save a tiny random model of `family` ("qwen-image" or "sd") at `path`."""
    builder = tiny_qwen_components if family == "qwen-image" else tiny_sd_components
    return save_pipeline(family, builder(seed=seed, **kwargs), path)
