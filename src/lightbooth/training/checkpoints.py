"""Checkpoints: periodic, atomic, keep the last K, and resume from the newest one that loads.

Lightning writes the full state (weights, optimizer, LR scheduler, step, loop state); we add atomic writes (temp
file + rename, so a crash never leaves a half-written newest checkpoint), pruning, and a save on Ctrl-C / SIGTERM.
Checkpoints are our own files, still read with `weights_only=True` so nothing but tensors and plain data unpickles.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from ..atomic import why_unmakeable

_NAME = re.compile(r"step-(\d+)\.ckpt$")


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `folder`, newest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.ckpt") if (m := _NAME.search(p.name))]
    return sorted(found, reverse=True)


def newest_valid_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that loads completely; corrupt ones are reported and skipped, never half-loaded."""
    for _, path in checkpoint_steps(folder):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:  # truncated zip, bad pickle opcode, disallowed global: all mean "do not use"
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); using an older one",
                  file=sys.stderr)
    return None


def auto_checkpoint(folder: Path) -> Path | None:
    """`--resume auto`: the newest readable checkpoint in `folder`, or None (said on stderr: the run starts at
    step 0, so a mistyped --out does not pass for a resumed run)."""
    path = newest_valid_checkpoint(folder)
    if path is None:
        print(f"note: --resume auto found no checkpoint in {folder}; starting at step 0", file=sys.stderr)
    return path


def check_checkpoint(path: Path) -> None:
    """`--resume PATH`: a one-line error unless `path` is a readable training checkpoint (read as tensors and plain
    data only, memory-mapped, so nothing in it runs and a large one costs no memory)."""
    from ..errors import LightboothError

    hint = "pass a step-*.ckpt file from a run's checkpoints folder, or --resume auto"
    if not path.is_file():
        raise LightboothError(f"checkpoint {path} not found; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch zip, truncated, or holding objects other than tensors and plain data
        raise LightboothError(f"{path} is not a readable training checkpoint ({type(e).__name__}); {hint}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "global_step"} <= set(ckpt):
        raise LightboothError(f"{path} is not a training checkpoint (no training state in it); {hint}")


def check_checkpoint_weights(module: L.LightningModule, checkpoint: dict) -> None:
    """In `on_load_checkpoint` (before any weight is loaded): the checkpoint must hold exactly the weights this run
    trains, name for name and shape for shape, not another kind of run's or another rank's."""
    from ..errors import LightboothError

    own = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    got = checkpoint.get("state_dict", {})
    if set(got) != set(own) or any(tuple(v.shape) != own[k] for k, v in got.items()):
        raise LightboothError("the checkpoint holds other weights than this run trains (another kind of run, or "
                              "another --rank, --lora-targets or model); resume from this run's own checkpoints")


def save_atomic(trainer: L.Trainer, path: Path) -> None:
    """Every process must call this (saving is a collective in Lightning); the global-zero process writes."""
    tmp = path.with_name(f".tmp-{path.name}")
    trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimizer, schedulers, callbacks, loops
    if trainer.is_global_zero:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class PeriodicCheckpoint(L.Callback):
    """Save every `every` optimizer steps, at the end, and on interruption; keep the newest `keep`."""

    def __init__(self, folder: Path, every: int, keep: int = 2):
        self.folder, self.every, self.keep = Path(folder), every, max(1, keep)
        self.saved_on_exit: Path | None = None
        self._last: int | None = None  # step of the last save: with gradient accumulation a step spans batches

    def _save(self, trainer: L.Trainer) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{trainer.global_step:08d}.ckpt"
        if self._last != trainer.global_step:
            save_atomic(trainer, path)
            for _, old in checkpoint_steps(self.folder)[self.keep:] if trainer.is_global_zero else ():
                old.unlink(missing_ok=True)
        self._last = trainer.global_step
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if not is_interrupt(exception):
            return
        # Only between optimizer steps is the state whole: mid-accumulation gradients are not in a checkpoint.
        if trainer.fit_loop.epoch_loop.batch_progress.total.processed % trainer.accumulate_grad_batches == 0:
            self.saved_on_exit = self._save(trainer)
        else:
            newest = checkpoint_steps(self.folder)
            self.saved_on_exit = newest[0][1] if newest else None


def is_interrupt(e: BaseException) -> bool:
    """Ctrl-C, SIGTERM (Lightning raises SIGTERMException) or Lightning's exit after catching Ctrl-C."""
    return isinstance(e, (KeyboardInterrupt, SystemExit)) or type(e).__name__ == "SIGTERMException"


def run_fit(trainer: L.Trainer, module: L.LightningModule, ckpt: PeriodicCheckpoint, resume: Path | None,
            **loaders) -> None:
    """`trainer.fit`, resuming from `resume`; Ctrl-C / SIGTERM save a checkpoint and exit with code 130."""
    import signal

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C; give it back after
    try:
        # weights_only: the checkpoint is read without unpickling code, as newest_valid_checkpoint checked it
        trainer.fit(module, ckpt_path=str(resume) if resume else None, weights_only=True, **loaders)
    except BaseException as e:
        if is_interrupt(e):
            where = ckpt.saved_on_exit or ckpt.folder
            print(f"interrupted: checkpoint saved in {where}; rerun with --resume to continue", file=sys.stderr)
            raise SystemExit(130) from None
        raise
    finally:
        signal.signal(signal.SIGINT, handler)
    if trainer.interrupted:
        raise SystemExit(130)


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """What prepare_run_folder refuses, checked without writing anything: cheap enough to run before a model
    loads, so a mistyped --out fails in a second, not after minutes of loading."""
    from ..errors import LightboothError

    if run.exists() and not run.is_dir():
        raise LightboothError(f"run folder {run} is a file; pass a folder for the run")
    if run.exists() and any(run.iterdir()) and not (resume or overwrite):
        raise LightboothError(f"run folder {run} already exists; pass --resume to continue it or --overwrite to "
                              "start again")
    if why := why_unmakeable(run):
        raise LightboothError(f"cannot create run folder {run}: {why}; pass a folder you can write to")


def prepare_run_folder(run: Path, cfg, resume: bool, overwrite: bool, may_change: frozenset[str] | set[str],
                       inputs=()) -> bool:
    """Refuse to touch an existing run unless asked; on resume the saved config must agree except `may_change`;
    save the resolved config as run/config.yaml. `inputs`: paths the run reads (images, LoRAs, a model), which
    --overwrite must not delete with the old run. True when this call makes the folder (--overwrite included)."""
    import dataclasses

    from ..config import load_config, save_config
    from ..errors import LightboothError

    check_run_folder(run, resume, overwrite)
    if run.exists() and any(run.iterdir()):
        for p in inputs if overwrite and not resume else ():
            if p and Path(p).exists() and Path(p).resolve().is_relative_to(run.resolve()):
                raise LightboothError(f"--overwrite would delete {p}, which this run reads, with the old run in "
                                      f"{run}; move it out of the run folder first or pick another --out")
        if overwrite and not resume:
            shutil.rmtree(run)
    fresh = not run.exists()  # made by this command (or emptied by --overwrite, as asked), not the user's own
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "config.yaml"
    if resume and saved.exists():
        old = load_config(type(cfg), saved)
        # `out` is this folder: a run copied or moved elsewhere resumes where it now is
        changed = [f.name for f in dataclasses.fields(cfg) if f.name != "out"
                   and getattr(old, f.name) != getattr(cfg, f.name) and f.name not in may_change]
        if changed:
            raise LightboothError(f"{saved} differs from the config given in '{changed[0]}'; resume with the same "
                                  "config (or none, to reuse the saved one)")
    save_config(cfg, saved)
    return fresh


# what a trainer writes into its run folder before and during its first steps
_TRAINER_FILES = frozenset({"config.yaml", "losses.jsonl", "checkpoints", "logs", "validation", "wandb", "mlruns"})


@contextmanager
def unmade_on_bad_input(run: Path, fresh: bool):
    """A new run that bad input stops before its first training step (a checkpoint of another kind of run, say)
    leaves no folder behind, so the corrected command needs no --overwrite. Only a folder this command made and
    that holds nothing but the trainer's own files, no checkpoint and no logged step, is removed."""
    from ..errors import LightboothError
    from .common import NonFiniteLoss

    try:
        yield
    except LightboothError as e:
        if (fresh and not isinstance(e, NonFiniteLoss) and run.is_dir() and not (run / "losses.jsonl").exists()
                and not checkpoint_steps(run / "checkpoints") and {p.name for p in run.iterdir()} <= _TRAINER_FILES):
            shutil.rmtree(run, ignore_errors=True)
        raise


class PlainProgress(L.Callback):
    """One line every `every` steps with loss, speed and ETA: readable in log files, unlike a live bar."""

    def __init__(self, every: int = 50):
        self.every, self.t0, self.s0 = every, None, 0
        self.shown = None  # with gradient accumulation a step spans several batches: one line per step

    def on_train_start(self, trainer, pl_module):
        import time

        self.t0, self.s0 = time.time(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        step = trainer.global_step
        if step % self.every or step in (self.s0, self.shown) or not trainer.is_global_zero:
            return
        self.shown = step
        rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        eta = (trainer.max_steps - step) / max(rate, 1e-9)
        print(f"step {step}/{trainer.max_steps} loss {loss:.4f} {rate:.2f} steps/s eta {eta / 60:.1f} min",
              file=sys.stderr, flush=True)
