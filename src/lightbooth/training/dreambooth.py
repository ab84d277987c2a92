"""DreamBooth personalization (Ruiz et al. 2023): teach a model one subject from a few photos.

`train_dreambooth(config)` reads top to bottom: check the images, load the model, make or reuse the class images,
cache latents and prompt encodings, add LoRA (or unfreeze the denoiser), fit with Lightning, export. The family
adapter supplies the maths (how to encode, noise and score); nothing here asks which family it holds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import open_up
from ..errors import LightboothError
from .common import LOGGERS, trainable_in_fp32

DEFAULT_TOKEN = "qzx"  # not an English word and rare in any caption corpus; "sks" is a rifle and a common token
EXPORTS = ("kohya",)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16",
              "64", "transformer-engine", "transformer-engine-float16")  # what Lightning's Trainer takes
# keys that may differ when resuming a run: how long and how it is watched, not what it trains on
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep", "validate_every", "validation_prompt", "logger", "export",
                     "devices", "strategy", "threads", "compile", "cuda_graphs"}


@dataclass
class DreamBoothConfig:
    """A DreamBooth run. Every field is a YAML key and a CLI flag (`class_noun` is `--class-noun`)."""

    instance_dir: str = ""  # 3+ images of the subject; an optional name.txt next to name.png is its caption
    class_noun: str = ""  # what the subject is ("dog", "star")
    out: str = ""  # the run folder
    model: str | None = None  # diffusers folder or cached hub id; None: the built-in model
    token: str = DEFAULT_TOKEN  # the rare word that names the subject
    instance_prompt: str = "a {token} {class_noun}"  # for images without a caption file
    class_prompt: str = "a {class_noun}"
    resolution: int | None = None  # buckets hold about resolution^2 pixels; None: the model's default size
    buckets: bool = True  # aspect-ratio buckets; off: every image centre-cropped square
    prior: bool = True  # prior preservation: a class image beside every instance image
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_dir: str | None = None  # None: RUN/../class-images-<hash>, shared by runs with the same settings
    class_preset: str | None = None  # sampling preset for class images; None: "fast" if the model has one, else
    # the model's default (the built-in model's 4-step preset)
    full: bool = False  # fine-tune every denoiser weight (saves a diffusers folder) instead of a LoRA
    train_text_encoder: bool = False  # also train the text encoder (LoRA, or fully with `full`); sd only
    rank: int = 4  # LoRA rank
    alpha: float | None = None  # LoRA alpha; None: equal to the rank
    lora_targets: list[str] | None = None  # module name suffixes; None: the family's `lora_targets`
    steps: int = 400  # optimizer steps
    lr: float = 1e-4
    warmup: int = 0  # linear LR warm-up steps, then constant
    noise_shift: float = 1.0  # shift on training noise levels, on top of the model's own: < 1 trains more at low
    # noise (fine detail, textures), > 1 more at high noise (layout, colour); 1: the model's own distribution
    batch_size: int = 1  # instance images per step (as many class images again with prior preservation)
    grad_accum: int = 1
    precision: str = "auto"  # Lightning precision; auto: bf16-mixed on GPU, 32-true on CPU
    grad_checkpointing: bool = False
    fp8: bool = False  # the frozen denoiser weights in fp8 (e4m3, per-row scales): half their memory; LoRA only
    compile: bool = False  # torch.compile the denoiser (its repeated blocks where it has them): slow first step
    cuda_graphs: bool = False  # replay the denoiser's forward and backward as CUDA graphs (one GPU; no --compile)
    adam8bit: bool = False  # bitsandbytes 8-bit AdamW (GPU)
    checkpoint_every: int = 100
    keep: int = 2  # checkpoints kept
    validate_every: int = 0  # validation images every N steps (0: only at the end)
    validation_prompt: list[str] = field(default_factory=lambda: ["a {token} {class_noun}"])
    validation_steps: int | None = None  # sampling steps of validation images; None: the model's preset
    logger: str = "tensorboard"  # tensorboard, wandb, mlflow or none
    export: list[str] = field(default_factory=list)  # extra LoRA formats: kohya -> RUN/lora_kohya.safetensors
    devices: int = 1  # processes (GPUs, or CPU processes with gloo)
    strategy: str = "auto"  # Lightning strategy; auto: ddp_spawn with several devices
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: all cores


def check_config(cfg: DreamBoothConfig) -> None:
    """One-line errors for settings that cannot work, before anything is loaded or written."""
    for key in ("instance_dir", "class_noun", "out"):
        if not getattr(cfg, key):
            raise LightboothError(f"'{key}' is required (--{key.replace('_', '-')})")
    positive = {"steps": cfg.steps, "rank": cfg.rank, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "checkpoint_every": cfg.checkpoint_every, "keep": cfg.keep, "devices": cfg.devices}
    if cfg.prior:  # without prior preservation no class image is made or read, so 0 is fine there
        positive["num_class_images"] = cfg.num_class_images
    elif cfg.num_class_images < 0:
        raise LightboothError(f"'num_class_images' must be 0 or more (got {cfg.num_class_images})")
    for key, v in positive.items():
        if v < 1:
            raise LightboothError(f"'{key}' must be at least 1 (got {v})")
    if cfg.fp8 and cfg.full:
        raise LightboothError("--fp8 stores frozen weights in fp8, and --full trains every weight; drop one of them")
    if cfg.cuda_graphs and (cfg.compile or cfg.devices > 1 or cfg.train_text_encoder or cfg.grad_accum > 1):
        # one replay per step, its gradients read before the next (accumulating would reuse the graph's buffers)
        raise LightboothError("--cuda-graphs records the denoiser alone on one GPU, one backward per step; drop "
                              "--compile, --train-text-encoder, --grad-accum and --devices, or drop --cuda-graphs")
    if cfg.lr <= 0 or cfg.prior_loss_weight < 0 or cfg.noise_shift <= 0:
        raise LightboothError("'lr' and 'noise_shift' must be positive and 'prior_loss_weight' not negative")
    for key in ("warmup", "validate_every", "seed", "threads"):
        if getattr(cfg, key) < 0:
            raise LightboothError(f"'{key}' must be 0 or more (got {getattr(cfg, key)})")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise LightboothError(f"'alpha' must be positive (got {cfg.alpha}); leave it out to use the rank")
    if cfg.validation_steps is not None and cfg.validation_steps < 1:
        raise LightboothError(f"'validation_steps' must be at least 1 (got {cfg.validation_steps})")
    if cfg.precision not in PRECISIONS:
        raise LightboothError(f"unknown precision {cfg.precision!r}; use auto, 32-true, bf16-mixed or 16-mixed")
    if cfg.strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        if cfg.strategy not in StrategyRegistry:
            raise LightboothError(f"unknown strategy {cfg.strategy!r}; use auto, ddp, ddp_spawn or another "
                                  "Lightning strategy name")
    if cfg.batch_size % cfg.devices:
        raise LightboothError(f"batch_size {cfg.batch_size} must be a multiple of devices {cfg.devices} (each "
                              "process takes an equal share of the global batch)")
    if cfg.logger not in LOGGERS:
        raise LightboothError(f"unknown logger {cfg.logger!r}; use one of {', '.join(LOGGERS)}")
    for fmt in cfg.export:
        if fmt not in EXPORTS:
            raise LightboothError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORTS)}")
    if not cfg.token or any(c.isspace() for c in cfg.token):
        raise LightboothError(f"token {cfg.token!r} must be one word without spaces")
    needs = {"bitsandbytes": cfg.adam8bit, "wandb": cfg.logger == "wandb", "mlflow": cfg.logger == "mlflow"}
    for package, needed in needs.items():
        if needed and importlib.util.find_spec(package) is None:
            raise LightboothError(f"{'--adam8bit' if package == 'bitsandbytes' else '--logger ' + cfg.logger} needs "
                                  f"the {package} package; pip install {package}")


def check_token(tokenizer, token: str) -> None:
    """The token must encode to known vocabulary entries (no unknown-token ids)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise LightboothError(f"the model's tokenizer cannot spell token {token!r}; pick another --token")


def fill(template: str, cfg: DreamBoothConfig) -> str:
    return template.replace("{token}", cfg.token).replace("{class_noun}", cfg.class_noun)


def train_dreambooth(cfg: DreamBoothConfig, resume: str | None = None, overwrite: bool = False,
                     callbacks=()) -> Path:
    """Train; returns RUN/lora.safetensors (or RUN/model with `full`). `resume`: "auto" or a checkpoint path."""
    from ..config import checked
    from ..data.instance import load_instance_images
    from ..generate import Generator
    from ..models import resolve_model
    from .checkpoints import (auto_checkpoint, check_checkpoint, check_run_folder, prepare_run_folder,
                              unmade_on_bad_input)

    cfg = checked(cfg)  # a config built in Python gets the checks a YAML file or the CLI gets
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    check_run_folder(run, resume is not None, overwrite)  # before minutes of loading a large model
    images = load_instance_images(cfg.instance_dir)  # bad input fails before the run folder is touched
    model_path = resolve_model(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # LoRA: the frozen base in the family's dtype (bf16 on GPU), the adapters fp32 (make_trainable); full: fp32
    # fast=False: LoRA targets need the separate Q/K/V projections that CUDA fast paths would fuse
    gen = Generator.load(model_path, device=device, dtype=torch.float32 if cfg.full else None, fast=False,
                         preset="base")  # the plain model: a preset's own LoRA (a shipped distilled one) stays out
    family = gen.family
    if cfg.train_text_encoder and not family.text_lora_targets:
        raise LightboothError(f"--train-text-encoder is not supported for {family.name} models (sd only)")
    check_token(family.components["tokenizer"], cfg.token)
    training_side(cfg, family)
    check_lora_targets(cfg, family)
    ckpt_path = None
    if resume not in (None, "auto"):
        ckpt_path = Path(resume)
        check_checkpoint(ckpt_path)
    if cfg.prior:
        class_preset_name(cfg, family)
    fresh = prepare_run_folder(run, cfg, resume is not None, overwrite, RESUMABLE_CHANGES,
                               inputs=(cfg.instance_dir, cfg.class_dir, cfg.model))
    if resume == "auto":
        ckpt_path = auto_checkpoint(run / "checkpoints")

    with unmade_on_bad_input(run, fresh):
        data = cache_data(cfg, family, images, class_image_paths(cfg, gen, model_path, run) if cfg.prior else [])
        val_conds = release_text_encoder(cfg, family)
        prepare_denoiser(cfg, family)
        fit(cfg, family, data, run, ckpt_path, callbacks, val_conds)
    return export(cfg, family, model_path, run)


def training_side(cfg: DreamBoothConfig, family) -> int:
    """The side of the square training size (buckets keep its area); the model's default unless given."""
    side = cfg.resolution or family.default_size[0]
    if side < family.size_factor or side % family.size_factor:
        raise LightboothError(f"resolution {side} is not a positive multiple of {family.size_factor}, which "
                              f"{family.name} needs")
    return side


def class_preset_name(cfg: DreamBoothConfig, family) -> str:
    name = cfg.class_preset or ("fast" if "fast" in family.presets else family.default_preset)
    if name not in family.presets:
        raise LightboothError(f"unknown class preset {name!r}; choose one of {', '.join(family.presets)}")
    return name


def class_image_paths(cfg: DreamBoothConfig, gen, model_path: Path, run: Path) -> list[Path]:
    """Generate (or reuse) the class images with the base model, before any LoRA touches it."""
    from ..data.class_images import class_settings, default_class_dir, ensure_class_images
    from ..generate import Generator

    fam = gen.family
    name = class_preset_name(cfg, fam)
    preset, side = fam.presets[name], training_side(cfg, fam)
    settings = class_settings(str(model_path.resolve()), fill(cfg.class_prompt, cfg), name, preset.steps,
                              preset.guidance, side, side)
    folder = Path(cfg.class_dir) if cfg.class_dir else default_class_dir(run, settings)
    # a preset with its own LoRA (the built-in model's 4-step one) needs a second copy of the model with it fused
    factory = (lambda: Generator.load(model_path, device=fam.device, preset=name)) if preset.lora else (lambda: gen)
    return ensure_class_images(folder, settings, cfg.num_class_images, cfg.seed, factory)


@torch.no_grad()
def cache_data(cfg: DreamBoothConfig, family, images, class_paths: list[Path]):
    """Latents of every instance image (in its bucket) and class image, and each distinct prompt's encoding."""
    from ..data.instance import bucket_sizes, fit_to, nearest_bucket, open_image
    from .base import to_tensor
    from .dreambooth_module import CachedData

    side = training_side(cfg, family)
    buckets = bucket_sizes(side, family.size_factor) if cfg.buckets else [(side, side)]

    def latents(ims, size):
        return [family.encode_images(to_tensor([fit_to(im, size)]))[0].float().cpu() for im in ims]

    instance = [latents([im.image], nearest_bucket(im.image.size, buckets))[0] for im in images]
    classes = latents([open_image(p) for p in class_paths], (side, side))
    prompts = [fill(im.caption or cfg.instance_prompt, cfg) for im in images]
    class_prompt = fill(cfg.class_prompt, cfg)
    conds = {}
    if not cfg.train_text_encoder:
        for p in dict.fromkeys(prompts + [class_prompt]):
            c = family.encode([p])  # each prompt alone, as generation encodes it
            conds[p] = type(c)(c.embeds.clone().cpu(), None if c.mask is None else c.mask.clone().cpu())
    return CachedData(instance, prompts, classes, class_prompt, conds)


def validation_prompts(cfg: DreamBoothConfig) -> list[str]:
    return [fill(p, cfg) for p in cfg.validation_prompt if p.strip()]  # an empty prompt: no validation


@torch.no_grad()
def release_text_encoder(cfg: DreamBoothConfig, family) -> dict | None:
    """With the prompts cached and the text encoder frozen, training never runs it again: encode the validation
    prompts (and the empty negative prompt) now, then move it to the CPU (Qwen-Image's is 15 GiB of GPU memory).
    Returns those encodings for validation, or None when the text encoder stays (it is being trained)."""
    if cfg.train_text_encoder:
        return None
    conds = {}
    for p in validation_prompts(cfg) + [""]:
        c = family.encode([p])
        conds[p] = type(c)(c.embeds.cpu(), None if c.mask is None else c.mask.cpu())
    family.components["text_encoder"].to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return conds


def prepare_denoiser(cfg: DreamBoothConfig, family) -> None:
    """fp8 frozen weights (before the LoRA, which then wraps the fp8 layers), the LoRA, then compiling."""
    if cfg.fp8:
        from ..accel.fp8 import to_fp8

        to_fp8(family.denoiser, skip=family.fp8_skip)
    make_trainable(cfg, family)
    if cfg.compile:
        family.compile_denoiser()


def check_lora_targets(cfg: DreamBoothConfig, family) -> None:
    """Each --lora-targets suffix names a layer LoRA can wrap in the denoiser, checked before the run folder is made
    (peft's own check, at injection, comes only after it). Matching is peft's: the full name or a '.'-suffix."""
    if cfg.full or not cfg.lora_targets:
        return
    wrappable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    modules = list(family.denoiser.named_modules())
    for target in cfg.lora_targets:
        found = [m for name, m in modules if name == target or name.endswith(f".{target}")]
        if not found:
            raise LightboothError(f"--lora-targets {target!r} matches no module of the {family.name} denoiser; pass "
                                  f"module name suffixes such as {', '.join(family.lora_targets[:4])}")
        if not any(isinstance(m, wrappable) for m in found):
            raise LightboothError(f"--lora-targets {target!r} names {type(found[0]).__name__} modules, which LoRA "
                                  f"cannot wrap; pass linear or conv layers such as "
                                  f"{', '.join(family.lora_targets[:4])}")


def make_trainable(cfg: DreamBoothConfig, family) -> None:
    """LoRA adapters (peft) on the family's target modules, or every denoiser weight with `full`."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(cfg.seed)  # LoRA A matrices are random: same seed, same start
    parts = [(family.denoiser, tuple(cfg.lora_targets or family.lora_targets))]
    if cfg.train_text_encoder:
        parts.append((family.components["text_encoder"], family.text_lora_targets))
    for module, targets in parts:
        if cfg.full:
            module.requires_grad_(True)
            continue
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, target_modules=list(targets),
                          lora_dropout=0.0, init_lora_weights=True)
        try:
            inject_adapter_in_model(lora, module)
        except ValueError as e:
            raise LightboothError(f"LoRA targets {list(targets)} do not match the model: {str(e).splitlines()[0]}")
    if not cfg.full:
        trainable_in_fp32(*(m for m, _ in parts))
    if cfg.grad_checkpointing:
        family.denoiser.enable_gradient_checkpointing()


def fit(cfg: DreamBoothConfig, family, data, run: Path, ckpt_path: Path | None, callbacks=(),
        val_conds: dict | None = None) -> None:
    import lightning as L

    from .checkpoints import PeriodicCheckpoint, PlainProgress, run_fit
    from .common import LossLog, make_logger, quiet_lightning, steps_bar
    from .dreambooth_module import DreamBoothModule, Validation

    quiet_lightning()
    cuda = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp_spawn" if cfg.devices > 1 else "auto")
    ckpt = PeriodicCheckpoint(run / "checkpoints", cfg.checkpoint_every, cfg.keep)
    val_settings = {"steps": cfg.validation_steps} if cfg.validation_steps else {}
    if family.presets[family.default_preset].lora:  # the model trains without the preset's own LoRA: sample it plain
        val_settings["preset"] = "base"
    validation = Validation(run / "validation", validation_prompts(cfg), cfg.validate_every, cfg.seed, val_settings,
                            val_conds)
    tty = sys.stderr.isatty()
    trainer = L.Trainer(
        max_steps=cfg.steps, max_epochs=-1, accelerator="gpu" if cuda else "cpu", devices=cfg.devices,
        strategy=strategy, precision=precision, logger=make_logger(cfg.logger, run),
        callbacks=[ckpt, LossLog(run / "losses.jsonl"), validation, steps_bar() if tty else PlainProgress(),
                   *callbacks],
        accumulate_grad_batches=cfg.grad_accum, gradient_clip_val=1.0, use_distributed_sampler=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=tty, num_sanity_val_steps=0,
        log_every_n_steps=min(50, cfg.steps))
    module = DreamBoothModule(cfg, family, data)
    try:
        run_fit(trainer, module, ckpt, ckpt_path)
    except Exception as e:  # an error in a spawned process arrives as its traceback text
        if type(e).__name__ != "ProcessRaisedException":
            raise
        last = [line for line in str(e).strip().splitlines() if "Error: " in line or "Loss: " in line]
        raise LightboothError(last[-1].split(": ", 1)[1] if last else "a training process failed") from None


def export(cfg: DreamBoothConfig, family, model_path: Path, run: Path) -> Path:
    """RUN/lora.safetensors (+ RUN/lora_kohya.safetensors), or RUN/model, a diffusers folder, with `full`."""
    from ..lora import from_peft_model, save_lora

    te = family.components["text_encoder"] if cfg.train_text_encoder else None
    if cfg.full:
        return export_full(family, te, model_path, run)
    weights = from_peft_model(family.denoiser_name, family.denoiser)
    if te is not None:
        weights.update(from_peft_model("text_encoder", te))
    meta = {"lightbooth_dreambooth": json.dumps({"token": cfg.token, "class_noun": cfg.class_noun,
                                                 "instance_prompt": fill(cfg.instance_prompt, cfg)})}
    path = run / "lora.safetensors"
    save_lora(path, weights, format="peft", metadata=meta)
    if "kohya" in cfg.export:
        save_lora(run / "lora_kohya.safetensors", weights, format="kohya", metadata=meta)
    return path


def export_full(family, text_encoder, model_path: Path, run: Path) -> Path:
    """The base model's folder with the trained components replaced, written beside and renamed into place."""
    names = [family.denoiser_name] + (["text_encoder"] if text_encoder is not None else [])
    out, tmp = run / "model", run / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_path, tmp, ignore=lambda d, files: names if Path(d) == model_path else [])
    family.denoiser.save_pretrained(str(tmp / family.denoiser_name), safe_serialization=True)
    if text_encoder is not None:
        text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    open_up(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
