"""The `lightbooth` command: parses flags and calls library functions; nothing heavy at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import LightboothError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast, personalized text-to-image generation.")


@app.callback()
def _root() -> None:
    """Fast, personalized text-to-image generation."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts (English or Chinese)."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs; existing files are never overwritten."),
    model: Optional[str] = typer.Option(None, help="Diffusers folder or cached hub id (default: built-in model)."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file, optionally PATH:SCALE; repeat for several."),
    preset: Optional[str] = typer.Option(None, help="Sampling preset: base, lightning, lightning-4; built-in "
                                         "model: 4step (default), 8step, base."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the preset's)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale; 1 disables the unconditional pass."),
    cfg_rescale: Optional[bool] = typer.Option(None, "--cfg-rescale/--no-cfg-rescale", help="qwen-image: rescale "
                                               "the guided velocity per token, as Qwen-Image does (default: the "
                                               "preset's, else on); sd: no effect."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt for CFG."),
    sampler: Optional[str] = typer.Option(None, help="Sampler (qwen-image: flow_euler, flow_stochastic; sd: ddim, "
                                          "euler, flow_euler, flow_stochastic)."),
    euler_steps: Optional[int] = typer.Option(None, "--euler-steps", help="flow_stochastic: take this many first "
                                              "steps as Euler steps, then re-noise (default: the preset's, else 0)."),
    seed: int = typer.Option(0, help="Seed of the first image; image i of each prompt uses seed + i."),
    num_images: int = typer.Option(1, "--num-images", help="Images per prompt."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
    width: Optional[int] = typer.Option(None, help="Width in pixels (multiple of the family's factor)."),
    height: Optional[int] = typer.Option(None, help="Height in pixels (multiple of the family's factor)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line; resumable."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 (default: bf16 on GPU)."),
    devices: int = typer.Option(0, help="Processes for --prompts-file (default: every GPU, else 1)."),
    fp8: bool = typer.Option(False, "--fp8", help="Denoiser weights in fp8: half the memory, faster on Hopper GPUs."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser: slow first call, then faster."),
):
    """Generate images: one PNG per prompt x seed in OUT, each path printed as it is written."""
    from .batch import generate_distributed, prompt_lines, report_line, stream_jobs, write_images
    from .generate import Generator, check_prompts, expand_jobs, out_dir_ready

    if prompts and prompts_file:
        _fail("give prompts on the command line or --prompts-file, not both")
    if prompts_file is None:
        check_prompts(prompts or [])
    elif not any(True for _ in prompt_lines(prompts_file)):
        _fail(f"prompts file {prompts_file} has no prompts; put one prompt per line")
    if num_images < 1 or batch_size < 1:
        _fail("--num-images and --batch-size must be at least 1")
    if devices < 0:
        _fail(f"--devices must be 0 (every GPU, else 1) or more (got {devices})")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        _fail(f"--dtype {dtype} is not supported; use float32, bfloat16 or float16")
    expand_jobs(["seeds"], seed, num_images)  # a seed out of range fails here, before the model loads
    with out_dir_ready(out):  # a run rejected after this point leaves no new, empty --out folder behind
        load_kwargs = dict(model=model, loras=tuple(lora), dtype=dtype, preset=preset, fp8=fp8, compile=compile)
        settings_kwargs = dict(preset=preset, steps=steps, guidance=guidance, sampler=sampler, width=width,
                               height=height, negative_prompt=negative, cfg_rescale=cfg_rescale,
                               euler_steps=euler_steps)
        n_dev, accel = _devices(devices, device)
        if n_dev > 1:
            gen = Generator.load(device="cpu", **load_kwargs)  # validate model, LoRAs and settings before spawning
            gen.settings(**settings_kwargs)
            del gen
            generate_distributed(n_dev, accel, load_kwargs=load_kwargs, prompts=prompts, prompts_file=prompts_file,
                                 seed=seed, num_images=num_images, settings_kwargs=settings_kwargs, out=str(out),
                                 batch_size=batch_size)
            return
        gen = Generator.load(device=device, **load_kwargs)
        s = gen.settings(**settings_kwargs)
        source = prompt_lines(prompts_file) if prompts_file else prompts
        total = (sum(1 for _ in prompt_lines(prompts_file)) if prompts_file else len(prompts)) * num_images
        with _progress(total) as advance:
            def report(path, skipped):
                typer.echo(report_line(path, skipped))
                advance()

            write_images(gen, stream_jobs(source, seed, num_images), s, out, batch_size, report=report)


@app.command("train-base")
def train_base(
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (keys of BaseTrainConfig)."),
    out: Path = typer.Option(Path("runs/base"), "--out", help="Run folder (checkpoints, logs, the model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete OUT and start again."),
    steps: Optional[int] = typer.Option(None, help="Override the recipe's transformer steps."),
):
    """Train the built-in model from scratch on the shapes world (resumable; Ctrl-C saves a checkpoint)."""
    from .config import load_config
    from .training.base import BaseTrainConfig
    from .training.base_run import train_base as run

    saved = out / "config.yaml"
    source = config if config is not None or not (resume and saved.exists()) else saved
    cfg = load_config(BaseTrainConfig, source, {"steps": steps})
    path = run(cfg, out, resume=resume, overwrite=overwrite)
    typer.echo(str(path))


@app.command("dreambooth")
def dreambooth(
    config: Optional[Path] = typer.Option(None, "--config", help="Run YAML (keys of DreamBoothConfig, as the flags)."),
    instance_dir: Optional[str] = typer.Option(None, "--instance-dir", help="3+ images of the subject."),
    class_noun: Optional[str] = typer.Option(None, "--class-noun", help="What the subject is: dog, star, ..."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (config, checkpoints, logs, the LoRA)."),
    model: Optional[str] = typer.Option(None, help="Diffusers folder or cached hub id (default: built-in model)."),
    token: Optional[str] = typer.Option(None, help="Rare word naming the subject (default: qzx)."),
    instance_prompt: Optional[str] = typer.Option(None, "--instance-prompt", help="Default: 'a {token} {class_noun}'."),
    class_prompt: Optional[str] = typer.Option(None, "--class-prompt", help="Default: 'a {class_noun}'."),
    resolution: Optional[int] = typer.Option(None, help="Training side in pixels (default: the model's)."),
    prior: Optional[bool] = typer.Option(None, "--prior/--no-prior", help="Prior preservation (default on)."),
    prior_loss_weight: Optional[float] = typer.Option(None, "--prior-loss-weight", help="Default 1.0."),
    num_class_images: Optional[int] = typer.Option(None, "--num-class-images", help="Default 100."),
    class_dir: Optional[str] = typer.Option(None, "--class-dir", help="Class image cache folder."),
    buckets: Optional[bool] = typer.Option(None, "--buckets/--no-buckets", help="Aspect-ratio buckets (default on)."),
    class_preset: Optional[str] = typer.Option(None, "--class-preset", help="Preset for class images."),
    full: Optional[bool] = typer.Option(None, "--full", help="Full fine-tune; saves a diffusers folder."),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder", help="Also train it (sd)."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default 4)."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default: the rank)."),
    lora_targets: Optional[List[str]] = typer.Option(None, "--lora-targets", help="Module suffix; repeat."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 400)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 1e-4)."),
    warmup: Optional[int] = typer.Option(None, help="Linear LR warm-up steps."),
    noise_shift: Optional[float] = typer.Option(None, "--noise-shift",
                                                help="Shift on training noise levels: < 1 more low noise (detail)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Instance images per step."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation batches."),
    precision: Optional[str] = typer.Option(None, help="32-true, bf16-mixed, 16-mixed (default: auto)."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing", help="Trade compute for memory."),
    fp8: Optional[bool] = typer.Option(None, "--fp8", help="Frozen denoiser weights in fp8 (half the memory; LoRA)."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the denoiser (slow first step)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs", help="Replay the denoiser as CUDA graphs."),
    adam8bit: Optional[bool] = typer.Option(None, "--adam8bit", help="bitsandbytes 8-bit AdamW."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
    keep: Optional[int] = typer.Option(None, help="Checkpoints kept (default 2)."),
    validate_every: Optional[int] = typer.Option(None, "--validate-every", help="Steps between validation images."),
    validation_prompt: Optional[List[str]] = typer.Option(None, "--validation-prompt", help="Repeat for several."),
    validation_steps: Optional[int] = typer.Option(None, "--validation-steps", help="Sampling steps for them."),
    logger: Optional[str] = typer.Option(None, help="tensorboard (default), wandb, mlflow or none."),
    export: Optional[List[str]] = typer.Option(None, "--export", help="Also write this LoRA format: kohya."),
    devices: Optional[int] = typer.Option(None, help="Processes (GPUs, or CPU processes)."),
    strategy: Optional[str] = typer.Option(None, help="Lightning strategy (default: ddp_spawn if devices > 1)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    seed: Optional[int] = typer.Option(None, help="Seed of everything (default 0)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto (newest checkpoint in OUT) or a .ckpt path."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete OUT and start again."),
):
    """Personalize a model on a subject from a few images (LoRA by default); writes OUT/lora.safetensors."""

    from .training.dreambooth import DreamBoothConfig, train_dreambooth

    cfg = _run_config(DreamBoothConfig, locals(), ("validation_prompt", "export", "lora_targets"), out, config, resume)
    typer.echo(str(train_dreambooth(cfg, resume=resume, overwrite=overwrite)))


@app.command("distill")
def distill(
    config: Optional[Path] = typer.Option(None, "--config", help="Run YAML (keys of DistillConfig, as the flags)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (config, checkpoints, logs, the LoRA)."),
    model: Optional[str] = typer.Option(None, help="Teacher: diffusers folder or cached hub id (default: built-in)."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA fused into the teacher, PATH[:SCALE]; repeat."),
    method: Optional[str] = typer.Option(None, help="dmd (default) or trajectory."),
    states: Optional[str] = typer.Option(None, help="trajectory: regress from the teacher's ODE states (default) "
                                         "or from the student's own (student)."),
    student_steps: Optional[int] = typer.Option(None, "--student-steps", help="1, 2, 4 (default) or 8."),
    shift: Optional[float] = typer.Option(None, help="The student's fixed flow shift (default 3)."),
    sampler: Optional[str] = typer.Option(None, help="The student's sampler: flow_euler (default) or "
                                          "flow_stochastic (dmd: fresh noise at every step, as DMD2)."),
    euler_steps: Optional[int] = typer.Option(None, "--euler-steps", help="flow_stochastic: this many first steps "
                                              "are Euler steps, then fresh noise (default 0)."),
    teacher_preset: Optional[str] = typer.Option(None, "--teacher-preset", help="Teacher sampling preset."),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="Teacher sampling steps."),
    teacher_guidance: Optional[float] = typer.Option(None, "--teacher-guidance", help="Teacher CFG scale."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="Prompts, one per line (default: "
                                               "shapes-world captions)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's)."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 1000)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per step (default 8)."),
    lr: Optional[float] = typer.Option(None, help="Student learning rate (default 1e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant (default) or cosine (decays "
                                              "to a tenth of the learning rates over --steps)."),
    fake_lr: Optional[float] = typer.Option(None, "--fake-lr", help="DMD fake-score learning rate."),
    fake_updates: Optional[int] = typer.Option(None, "--fake-updates", help="DMD critic updates per student update."),
    dmd_level_shift: Optional[float] = typer.Option(None, "--dmd-level-shift", help="DMD: flow shift of the noise "
                                                    "levels the scores are compared at (default: --shift)."),
    fake_warmup: Optional[int] = typer.Option(None, "--fake-warmup", help="DMD: first steps that train only the "
                                              "critic (default 0; for a warm-started student)."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default 16)."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default: the rank)."),
    init_lora: Optional[str] = typer.Option(None, "--init-lora", help="Start the student from this LoRA (e.g. the "
                                            "student of an earlier teacher) instead of from zero."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
    keep: Optional[int] = typer.Option(None, help="Checkpoints kept (default 2)."),
    logger: Optional[str] = typer.Option(None, help="tensorboard (default), wandb, mlflow or none."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    seed: Optional[int] = typer.Option(None, help="Seed of everything (default 0)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto (newest checkpoint in OUT) or a .ckpt path."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete OUT and start again."),
):
    """Distill a model (a personalized one too) into a few-step LoRA; writes OUT/lora.safetensors."""
    from .training.distill.run import DistillConfig, train_distill

    given = dict(locals(), loras=lora)
    cfg = _run_config(DistillConfig, given, ("loras",), out, config, resume)
    typer.echo(str(train_distill(cfg, resume=resume, overwrite=overwrite)))


def _run_config(cls, given: dict, list_keys: tuple[str, ...], out: str | None, config: Path | None,
                resume: str | None):
    """A trainer's config from its flags (those given override) over --config, or over the run's own saved config
    when resuming without one."""
    import dataclasses

    from .config import load_config

    flags = {f.name: given.get(f.name) for f in dataclasses.fields(cls)}
    for key in list_keys:  # a list option left out arrives empty
        flags[key] = list(flags[key]) if flags[key] else None
    saved = Path(out) / "config.yaml" if out else None
    source = config if config is not None or not (resume and saved and saved.exists()) else saved
    return load_config(cls, source, flags)


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, help="Model to score (default: the built-in model)."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file(s) to apply, PATH[:SCALE]."),
    n: int = typer.Option(32, "--n", help="Prompts per scene kind and language."),
    preset: Optional[str] = typer.Option(None, help="Sampling preset."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale."),
    variety_seeds: int = typer.Option(64, "--variety-seeds", help="Seeds of 'a circle' for variety: the first 64 "
                                      "are read alone; more add the expected count over every 64 of them."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
):
    """Score prompt adherence on the shapes world: strict accuracy per scene kind and language."""
    from .eval.quality import evaluate
    from .generate import Generator

    if n < 1:
        _fail("--n must be at least 1")
    if variety_seeds < 1:
        _fail("--variety-seeds must be at least 1")
    gen = Generator.load(model, loras=tuple(lora), device=device, preset=preset)
    report = evaluate(gen, n=n, variety_seeds=variety_seeds, preset=preset, steps=steps, guidance=guidance)
    for line in report.lines():
        typer.echo(line)


def _devices(devices: int, device: str | None) -> tuple[int, str]:
    import torch

    if device is not None and devices > 1:
        _fail("--device picks one device; use --devices N alone to spread over several")
    gpus = torch.cuda.device_count()
    if devices == 0:
        return (gpus, "cuda") if gpus > 1 and device is None else (1, "auto")
    return devices, ("cuda" if gpus else "cpu")


class _progress:
    """A rich progress bar on stderr (stdout carries only the image paths)."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        if not sys.stderr.isatty():  # a log file or a pipe: no bar (it would leave a blank line in the log)
            self.bar = None
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("gen", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback.

    Usage errors (unknown flag, a value of the wrong type, a missing option) are click's, on one line too; no
    arguments at all prints the help, as before.
    """
    try:
        rv = app(args=argv, prog_name="lightbooth", standalone_mode=False)
    except LightboothError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except typer.TyperException as e:  # click's usage errors (typer vendors click; this is their public base)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help(), err=True)
        else:
            message = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
            typer.echo(f"error: {message} (see '{ctx.command_path if ctx else 'lightbooth'} --help')", err=True)
        return getattr(e, "exit_code", 2)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
