"""`train_distill(config)`: turn a model (a personalised one included) into a few-step LoRA.

Reads top to bottom: load the teacher (LoRAs fused in), add the student (and for DMD the fake-score) adapters, fit
with Lightning, write RUN/lora.safetensors in the released Lightning files' key format (kohya lora_down / lora_up /
alpha, dotted module names) with the student's sampling schedule in its metadata, which `lightbooth generate
--lora` picks up by itself.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import LightboothError
from ..common import LOGGERS, trainable_in_fp32

METHODS = ("dmd", "trajectory")
STATES = ("teacher", "student")
SAMPLERS = ("flow_euler", "flow_stochastic")
LR_SCHEDULES = ("constant", "cosine")
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep", "logger", "threads"}


@dataclass
class DistillConfig:
    """A distillation run. Every field is a YAML key and a CLI flag (`student_steps` is `--student-steps`)."""

    out: str = ""  # the run folder
    model: str | None = None  # the teacher: diffusers folder or cached hub id; None: the built-in model
    loras: list[str] = dataclasses.field(default_factory=list)  # fused into the teacher, e.g. a DreamBooth LoRA
    method: str = "dmd"  # dmd (distribution matching, DMD2-style) or trajectory (regression onto teacher ODE steps)
    student_steps: int = 4  # 1, 2, 4 or 8 sampling steps for the student
    shift: float = 3.0  # the student's fixed flow shift (Qwen-Image-Lightning uses 3; sd: 2 puts 4 steps near
    # timesteps 999/750/500/250)
    sampler: str = "flow_euler"  # the student's sampler, written into its preset: flow_euler, or flow_stochastic
    # (DMD only: x0 estimate, then fresh noise at every step, as DMD2 samples); DMD's backward simulation follows it
    euler_steps: int = 0  # flow_stochastic: this many first steps are Euler steps before re-noising starts
    states: str = "teacher"  # trajectory: regress from the teacher's own ODE states, or from the states the
    # student itself reaches at inference ("student": backward distillation, Kohler et al. 2024, Imagine Flash)
    teacher_preset: str | None = None  # the teacher's sampling preset; None: "base" (the plain model, not a fast preset)
    teacher_steps: int | None = None  # override the preset's steps (trajectory targets are solved on this grid)
    teacher_guidance: float | None = None  # override the preset's CFG scale (distilled into the student)
    prompts_file: str | None = None  # one prompt per line; None: shapes-world captions, English and Chinese
    width: int | None = None  # None: the model's default size
    height: int | None = None
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # prompts per step
    lr: float = 1e-4  # student LoRA
    lr_schedule: str = "constant"  # constant, or cosine: decays to a tenth of lr (and of fake_lr) over `steps`
    fake_lr: float = 1e-4  # DMD's fake-score LoRA
    fake_updates: int = 5  # DMD: fake-score updates per student update (DMD2's two time-scale rule)
    dmd_level_shift: float | None = None  # DMD: flow shift of the noise levels at which the teacher's and the fake
    # score are compared (and the fake score trains); None: the student's `shift`. 1 spreads them evenly over [0, 1]
    fake_warmup: int = 0  # DMD: first steps in which only the fake score trains. It starts as the teacher's score,
    # not the student's, so a warm-started student (`init_lora`) would otherwise be pushed by a critic of nothing
    rank: int = 16  # LoRA rank of the student (and of the fake score)
    init_lora: str | None = None  # the student starts from this LoRA file (e.g. the student of the teacher's previous
    # version, or a shorter run) instead of from zero; same targets and rank as this run's
    alpha: float | None = None  # LoRA alpha; None: equal to the rank
    checkpoint_every: int = 100
    keep: int = 2  # checkpoints kept
    logger: str = "tensorboard"  # tensorboard, wandb, mlflow or none
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: all cores


def check_config(cfg: DistillConfig) -> None:
    if not cfg.out:
        raise LightboothError("no run folder given; pass --out RUN")
    if cfg.method not in METHODS:
        raise LightboothError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.states not in STATES:
        raise LightboothError(f"unknown --states {cfg.states!r}; choose one of {', '.join(STATES)}")
    if cfg.states != "teacher" and cfg.method != "trajectory":
        raise LightboothError(f"--states {cfg.states} applies to --method trajectory only (DMD always trains on the "
                              "student's own samples); drop it or pass --method trajectory")
    if cfg.fake_warmup < 0:
        raise LightboothError(f"--fake-warmup must be 0 or more steps (got {cfg.fake_warmup})")
    if cfg.fake_warmup and cfg.method != "dmd":
        raise LightboothError("--fake-warmup applies to --method dmd only (it delays the student behind DMD's fake "
                              "score); drop it or pass --method dmd")
    if cfg.fake_warmup and cfg.fake_warmup >= cfg.steps:
        raise LightboothError(f"--fake-warmup {cfg.fake_warmup} leaves the student no step of --steps {cfg.steps}; "
                              "pass a smaller --fake-warmup or more --steps")
    if cfg.student_steps not in (1, 2, 4, 8):
        raise LightboothError(f"--student-steps must be 1, 2, 4 or 8 (got {cfg.student_steps})")
    for name in ("steps", "batch_size", "rank", "fake_updates", "checkpoint_every", "keep"):
        if getattr(cfg, name) < 1:
            raise LightboothError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.shift <= 0:
        raise LightboothError(f"--shift must be positive (got {cfg.shift})")
    if cfg.dmd_level_shift is not None and cfg.dmd_level_shift <= 0:
        raise LightboothError(f"--dmd-level-shift must be positive (got {cfg.dmd_level_shift}); leave it out to use "
                              "--shift")
    if cfg.sampler not in SAMPLERS:
        raise LightboothError(f"unknown --sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg.sampler == "flow_stochastic" and cfg.method != "dmd":
        raise LightboothError("--sampler flow_stochastic applies to --method dmd only (trajectory regresses Euler "
                              "steps onto the teacher's ODE); drop it or pass --method dmd")
    if cfg.euler_steps < 0 or (cfg.euler_steps and cfg.sampler != "flow_stochastic"):
        raise LightboothError(f"--euler-steps {cfg.euler_steps}: give 0 or more, and only with --sampler "
                              "flow_stochastic (flow_euler takes Euler steps throughout)")
    if cfg.dmd_level_shift is not None and cfg.method != "dmd":
        raise LightboothError("--dmd-level-shift applies to --method dmd only; drop it or pass --method dmd")
    if cfg.teacher_guidance is not None and not cfg.teacher_guidance >= 1:  # NaN too
        raise LightboothError(f"--teacher-guidance must be 1 or more (got {cfg.teacher_guidance}; 1 means no CFG, "
                              "less weakens or reverses the teacher's prompt)")
    for name in ("lr", "fake_lr"):  # 0 is allowed: it exports an --init-lora untouched (under another --alpha)
        if getattr(cfg, name) < 0:
            raise LightboothError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(cfg, name)})")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise LightboothError(f"--alpha must be positive (got {cfg.alpha}); leave it out to use the rank")
    for name in ("seed", "threads"):
        if getattr(cfg, name) < 0:
            raise LightboothError(f"--{name} must be 0 or more (got {getattr(cfg, name)})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise LightboothError(f"unknown --lr-schedule {cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if cfg.logger not in LOGGERS:
        raise LightboothError(f"unknown logger {cfg.logger!r}; use one of {', '.join(LOGGERS)}")
    if cfg.init_lora is not None and not Path(cfg.init_lora).is_file():
        raise LightboothError(f"starting LoRA {cfg.init_lora} not found; pass an existing .safetensors file to "
                              "--init-lora")
    from .module import read_prompts

    read_prompts(cfg.prompts_file)  # a missing, unreadable or empty prompts file fails before anything is loaded


def student_preset(cfg: DistillConfig):
    from ...families.base import Preset

    return Preset(steps=cfg.student_steps, guidance=1.0, sampler=cfg.sampler, shift=cfg.shift,
                  euler_steps=cfg.euler_steps)


def train_distill(cfg: DistillConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run (or resume) a distillation; returns the LoRA file's path."""
    from ...config import checked
    from ...families.base import DISTILL_METHODS, can_distill
    from ...generate import Generator, parse_lora_spec
    from ...models import resolve_model
    from ..checkpoints import (auto_checkpoint, check_checkpoint, check_run_folder, prepare_run_folder,
                               unmade_on_bad_input)

    cfg = checked(cfg)  # a config built in Python gets the checks a YAML file or the CLI gets
    check_config(cfg)
    run = Path(cfg.out)
    check_run_folder(run, bool(resume), overwrite)  # before minutes of loading a large model
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt_path = None
    if resume:
        ckpt_path = auto_checkpoint(run / "checkpoints") if resume == "auto" else Path(resume)
        if resume != "auto":
            check_checkpoint(ckpt_path)
    gen = Generator.load(cfg.model, loras=tuple(cfg.loras), device="cuda" if torch.cuda.is_available() else "cpu",
                         dtype=torch.float32, fast=False,  # fp32, separate Q/K/V: the adapters train on them
                         preset=cfg.teacher_preset or "base")
    family = gen.family
    if not can_distill(family):
        raise LightboothError(f"{family.name} models cannot be distilled: the family has no rectified-flow view "
                              f"({', '.join(DISTILL_METHODS)})")
    teacher = gen.settings(preset=cfg.teacher_preset or "base", steps=cfg.teacher_steps, guidance=cfg.teacher_guidance,
                           width=cfg.width, height=cfg.height)
    start = load_init_lora(cfg, family)  # a bad starting LoRA fails before the run folder is touched
    inputs = [parse_lora_spec(spec)[0] for spec in cfg.loras] + [cfg.init_lora, cfg.prompts_file, cfg.model]
    fresh = prepare_run_folder(run, cfg, bool(resume), overwrite, RESUMABLE_CHANGES, inputs=inputs)
    add_adapters(cfg, family, start)
    # the student's levels as generation will walk them from the LoRA's stored preset (sd: scaled into its range)
    sigmas = family.schedule(student_preset(cfg), family.image_tokens(teacher.width, teacher.height)).float()
    with unmade_on_bad_input(run, fresh):
        fit(cfg, family, teacher.preset, sigmas, (teacher.width, teacher.height), run, ckpt_path)
    return export(cfg, family, resolve_model(cfg.model), teacher, run)


def load_init_lora(cfg: DistillConfig, family):
    """The starting LoRA (`init_lora`), read and checked against the plain model before any adapter wraps its
    layers; None without one."""
    from ...lora import load_lora

    if cfg.init_lora is None:
        return None
    start = load_lora(cfg.init_lora, family.name, {family.denoiser_name: family.denoiser})
    for target, layer in start.items():
        if layer.rank != cfg.rank:
            raise LightboothError(f"LoRA layer {target!r} of {cfg.init_lora} has rank {layer.rank} but the run trains "
                                  f"rank {cfg.rank}; pass --rank {layer.rank}")
    return start


def add_adapters(cfg: DistillConfig, family, start=None) -> None:
    """The student adapter (zero-initialised: it starts as the teacher run without CFG, unless `start`, the loaded
    `init_lora`, gives its starting weights), and DMD's fake score (always zero: it starts as the teacher's score)."""
    from peft import LoraConfig, inject_adapter_in_model

    from ...lora import into_peft_model
    from .module import FAKE, STUDENT

    if start is None:
        start = load_init_lora(cfg, family)
    torch.manual_seed(cfg.seed)
    names = (STUDENT, FAKE) if cfg.method == "dmd" else (STUDENT,)
    targets = family.distill_lora_targets or family.lora_targets
    for name in names:
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, target_modules=list(targets),
                          lora_dropout=0.0, init_lora_weights=True)
        with warnings.catch_warnings():  # DMD's fake score is a second, named adapter by design: peft warns of it
            warnings.filterwarnings("ignore", r"Already found a `peft_config` attribute in the model", UserWarning)
            inject_adapter_in_model(lora, family.denoiser, adapter_name=name)
    if start is not None:
        into_peft_model(family.denoiser_name, family.denoiser, start, adapter_name=STUDENT)
    for n, p in family.denoiser.named_parameters():
        p.requires_grad_(any(f".{name}." in n for name in names))
    trainable_in_fp32(family.denoiser)


def fit(cfg: DistillConfig, family, teacher_preset, sigmas, size, run: Path, ckpt_path: Path | None) -> None:
    import lightning as L

    from ..checkpoints import PeriodicCheckpoint, PlainProgress, run_fit
    from ..common import LossLog, make_logger, quiet_lightning, steps_bar
    from .module import DistillModule

    quiet_lightning()
    ckpt = PeriodicCheckpoint(run / "checkpoints", cfg.checkpoint_every, cfg.keep)
    tty = sys.stderr.isatty()
    trainer = L.Trainer(
        max_steps=cfg.steps, max_epochs=-1, accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1,
        precision="32-true", logger=make_logger(cfg.logger, run),
        callbacks=[ckpt, LossLog(run / "losses.jsonl"), steps_bar() if tty else PlainProgress()],
        gradient_clip_val=1.0, use_distributed_sampler=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=tty, num_sanity_val_steps=0,
        log_every_n_steps=min(50, cfg.steps))
    run_fit(trainer, DistillModule(cfg, family, teacher_preset, sigmas, size), ckpt, ckpt_path)


def export(cfg: DistillConfig, family, model_path: Path, teacher, run: Path) -> Path:
    """RUN/lora.safetensors: the student in kohya keys, its schedule (`lightbooth_preset`) and provenance."""
    from ...lora import from_peft_model, save_lora
    from .module import STUDENT

    weights = from_peft_model(family.denoiser_name, family.denoiser, adapter_name=STUDENT)
    meta = {
        # the schedule only: a distilled LoRA is its own weights, never a preset that fuses another file
        "lightbooth_preset": json.dumps({k: v for k, v in dataclasses.asdict(student_preset(cfg)).items()
                                         if k not in ("lora", "cfg_rescale")  # guidance 1: no CFG to rescale
                                         and (k != "euler_steps" or v)}),
        "lightbooth_distill": json.dumps({
            "method": cfg.method, "states": cfg.states,
            # the built-in model by name: its folder is wherever this package happens to be installed
            "teacher": "built-in" if cfg.model is None else str(model_path), "teacher_loras": cfg.loras,
            "init_lora": cfg.init_lora,
            "teacher_preset": dataclasses.asdict(teacher.preset), "steps": cfg.steps, "seed": cfg.seed}),
    }
    path = run / "lora.safetensors"
    save_lora(path, weights, format="kohya", metadata=meta)
    return path
