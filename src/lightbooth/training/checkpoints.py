"""Checkpoints: periodic, atomic, keep the last K, and resume from the newest one that loads.

Lightning writes the full state (weights, optimizer, LR scheduler, step, loop state); we add atomic writes (temp
file + rename, so a crash never leaves a half-written newest checkpoint), pruning, and a save on Ctrl-C / SIGTERM.
Checkpoints are our own files, still read with `weights_only=True` so nothing but tensors and plain data unpickles.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import lightning as L
import torch

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


def save_atomic(trainer: L.Trainer, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    trainer.save_checkpoint(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PeriodicCheckpoint(L.Callback):
    """Save every `every` optimizer steps, at the end, and on interruption; keep the newest `keep`."""

    def __init__(self, folder: Path, every: int, keep: int = 2):
        self.folder, self.every, self.keep = Path(folder), every, max(1, keep)
        self.saved_on_exit: Path | None = None

    def _save(self, trainer: L.Trainer) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{trainer.global_step:08d}.ckpt"
        if trainer.is_global_zero:
            save_atomic(trainer, path)
            for _, old in checkpoint_steps(self.folder)[self.keep:]:
                old.unlink(missing_ok=True)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, (KeyboardInterrupt, SystemExit)) or type(exception).__name__ == "SIGTERMException":
            self.saved_on_exit = self._save(trainer)


class PlainProgress(L.Callback):
    """One line every `every` steps with loss, speed and ETA: readable in log files, unlike a live bar."""

    def __init__(self, every: int = 50):
        self.every, self.t0, self.s0 = every, None, 0

    def on_train_start(self, trainer, pl_module):
        import time

        self.t0, self.s0 = time.time(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        eta = (trainer.max_steps - step) / max(rate, 1e-9)
        print(f"step {step}/{trainer.max_steps} loss {loss:.4f} {rate:.2f} steps/s eta {eta / 60:.1f} min",
              file=sys.stderr, flush=True)
