"""Pieces every trainer shares (DreamBooth, distillation): loss checks, loss log, progress, loggers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch

from ..errors import LightboothError

LOGGERS = ("tensorboard", "wandb", "mlflow", "none")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% at step `total`."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class NonFiniteLoss(LightboothError):
    """The loss became NaN or infinite: training stops, the last good checkpoint stays."""


def stop_if_not_finite(module: L.LightningModule, loss: torch.Tensor, run: Path) -> None:
    """Raise NonFiniteLoss in every process when the loss is NaN or infinite in any (before the optimizer step, so
    the checkpoints written so far stay good)."""
    if bool(module.all_gather(~torch.isfinite(loss.detach())).any()):
        raise NonFiniteLoss(f"the loss became {float(loss.detach())} at step {module.global_step + 1}; training "
                            f"stopped and the checkpoints in {run / 'checkpoints'} are kept; lower --lr and start "
                            "again with --overwrite")


def trainable_in_fp32(*modules: torch.nn.Module) -> None:
    """Trainable parameters (LoRA adapters) in fp32, whatever the frozen base's dtype (peft makes adapters in the
    base's dtype). bf16 has 8 bits of mantissa: an Adam step of about lr on a weight rounds away, so bf16-mixed
    training needs fp32 weights to step; autocast still runs the adapters' products in bf16."""
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()


class _Specs(torch.utils.data.Dataset):
    def __getitem__(self, spec):
        return spec


def _first(items):
    return items[0]


def spec_loader(sampler: torch.utils.data.Sampler) -> torch.utils.data.DataLoader:
    """A loader that hands each item `sampler` yields (a one-item list: a step's spec) to training_step as is.

    The trainers compute their batches from the step number, so the loader only paces them; a resumed run
    starts its sampler at the restored step.
    """
    return torch.utils.data.DataLoader(_Specs(), batch_sampler=sampler, collate_fn=_first)


class StepEnd(L.Callback):
    """Calls `on_step` once per optimizer step (a step spans `accumulate_grad_batches` batches)."""

    def __init__(self):
        self._last = 0

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.on_step(trainer, pl_module)

    def on_step(self, trainer, pl_module):
        raise NotImplementedError


class LossLog(StepEnd):
    """RUN/losses.jsonl: the loss of every optimizer step (mean over micro-batches and processes)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.micro = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.micro.append(pl_module.last_loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_step(self, trainer, pl_module):
        loss = trainer.strategy.reduce(torch.stack(self.micro).mean(), reduce_op="mean")
        self.micro = []
        if trainer.is_global_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")


def make_logger(name: str, run: Path):
    from lightning.pytorch import loggers

    if name == "tensorboard":
        return loggers.TensorBoardLogger(str(run), name="logs", version="")
    if name == "wandb":
        return loggers.WandbLogger(save_dir=str(run), project="lightbooth", name=run.name)
    if name == "mlflow":
        return loggers.MLFlowLogger(experiment_name="lightbooth", run_name=run.name,
                                    tracking_uri=(run / "mlruns").resolve().as_uri())
    return False


def steps_bar():
    """Lightning's progress bar counting toward max_steps (the batch stream is endless), with loss and ETA."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class StepsBar(TQDMProgressBar):
        @property
        def total_train_batches(self):
            return self.trainer.max_steps * self.trainer.accumulate_grad_batches

    return StepsBar()


def quiet_lightning() -> None:
    """Keep a training run's stderr to its progress and its own messages: Lightning's info logs, its few-workers
    hint (the data is cached in memory) and torch's LeafSpec deprecation, which Lightning's own _pytree raises on
    every batch (theirs to fix), are filtered by message, category and origin."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                            r"lightning\.pytorch\.utilities\._pytree")
