"""The Lightning side of DreamBooth: a step-indexed batch order, a thin module, and its callbacks.

Everything random in a step (which images, which noise, which noise level) is a pure function of (seed, batch
number, position in the global batch). So a resumed run replays exactly the batches and noise an uninterrupted run
would have seen, and N processes splitting a global batch see the same samples and noise as one process.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ..accel.graphs import GraphedForwardBackward
from ..errors import LightboothError
from ..families.base import Cond
from ..seeds import draw_seed
from .checkpoints import check_checkpoint_weights
from .common import StepEnd, spec_loader, stop_if_not_finite
from .losses import prior_preservation_loss, shifted_sigmas


def draws(seed: int, batch: int, position: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise (shape) and uniform noise-level draw () of sample `position` of global batch `batch`."""
    g = torch.Generator().manual_seed(draw_seed(seed, batch, position))
    return torch.randn(shape, generator=g), torch.rand((), generator=g).clamp(1e-4, 1 - 1e-4)


@dataclass
class CachedData:
    """Latents (C, h, w) and prompts of every training sample, computed once before training."""

    instance: list[torch.Tensor]
    instance_prompts: list[str]
    classes: list[torch.Tensor]
    class_prompt: str
    conds: dict[str, Cond]  # prompt -> encoding (1, L, D); empty when the text encoder trains

    def groups(self) -> list[list[int]]:
        """Instance indices grouped by latent shape (aspect-ratio bucket), in a fixed order."""
        by: dict[tuple, list[int]] = {}
        for i, z in enumerate(self.instance):
            by.setdefault(tuple(z.shape), []).append(i)
        return [by[k] for k in sorted(by)]

    def sample(self, kind: str, index: int) -> tuple[torch.Tensor, str]:
        if kind == "class":
            return self.classes[index], self.class_prompt
        return self.instance[index], self.instance_prompts[index]


class StepBatches(torch.utils.data.Sampler):
    """Endless batch specs starting at global batch `start`; each is this rank's share of the global batch.

    A global batch is `batch` instance images from one bucket (an epoch visits every image once, buckets padded
    with repeats) plus, with prior preservation, `batch` class images (cycling through seeded permutations).
    Rank r of `world` takes slice r of each half, so the halves stay together in every process.
    """

    def __init__(self, groups: list[list[int]], n_class: int, batch: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.groups, self.n_class, self.batch, self.seed = groups, n_class, batch, seed
        self.start, self.rank, self.world = start, rank, world
        self.per_epoch = sum(-(-len(g) // batch) for g in groups)

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, 1, epoch])
        chunks = []
        for group in self.groups:
            order = [group[i] for i in rng.permutation(len(group))]
            pad = -len(order) % self.batch
            order += [group[i] for i in rng.integers(0, len(group), pad)]
            chunks += [order[i:i + self.batch] for i in range(0, len(order), self.batch)]
        return [chunks[i] for i in rng.permutation(len(chunks))]

    @lru_cache(maxsize=4)
    def _class_perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, epoch]).permutation(self.n_class)

    def global_batch(self, g: int) -> list[tuple[str, int, int]]:
        """(kind, index, position) of every sample of global batch `g`."""
        items = [("instance", i, p) for p, i in enumerate(self._epoch(g // self.per_epoch)[g % self.per_epoch])]
        for j in range(self.batch if self.n_class else 0):
            k = g * self.batch + j
            items.append(("class", int(self._class_perm(k // self.n_class)[k % self.n_class]), self.batch + j))
        return items

    def local_batch(self, g: int) -> list[tuple[str, int, int]]:
        items, share = self.global_batch(g), self.batch // self.world
        inst = [it for it in items if it[0] == "instance"][self.rank * share:(self.rank + 1) * share]
        cls = [it for it in items if it[0] == "class"][self.rank * share:(self.rank + 1) * share]
        return inst + cls

    def __iter__(self):
        g = self.start
        while True:
            yield [(g, self.local_batch(g))]
            g += 1


class DreamBoothModule(L.LightningModule):
    """LoRA or full fine-tuning of the family's denoiser (and optionally text encoder) on cached latents."""

    def __init__(self, cfg, family, data: CachedData):
        super().__init__()
        self.cfg, self.family, self.data = cfg, family, data
        self.denoiser = family.denoiser.train()
        self.text_encoder = family.components["text_encoder"].train() if cfg.train_text_encoder else None
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.last_loss: torch.Tensor | None = None
        # a plain object, not a submodule: the denoiser's weights must appear once in checkpoints
        self.graphed = GraphedForwardBackward(self.denoiser) if cfg.cuda_graphs else None

    def train_dataloader(self):
        t = self.trainer  # called after a checkpoint is restored: global_step is where training continues
        sampler = StepBatches(self.data.groups(), len(self.data.classes), self.cfg.batch_size, self.cfg.seed,
                              start=t.global_step * t.accumulate_grad_batches, rank=t.global_rank,
                              world=t.world_size)
        return spec_loader(sampler)

    def encode(self, prompts: list[str]) -> Cond:
        if self.text_encoder is not None:
            return self.family.encode_text(prompts, self.text_encoder)
        cond = Cond.cat([self.data.conds[p] for p in prompts])
        return Cond(cond.embeds.to(self.device), None if cond.mask is None else cond.mask.to(self.device))

    def training_step(self, spec, _):
        g, items = spec
        shapes: dict[tuple, list] = {}  # one forward per latent shape: instance buckets may differ from class
        for kind, index, pos in items:
            z, prompt = self.data.sample(kind, index)
            shapes.setdefault(tuple(z.shape), []).append((z, prompt, pos, kind == "class"))
        losses, is_class = [], []
        denoiser = self.graphed if self.graphed is not None else self.denoiser
        for group in shapes.values():
            x0 = torch.stack([z for z, *_ in group]).to(self.device)  # (b, C, h, w)
            noise, u = zip(*(draws(self.cfg.seed, g, pos, x0.shape[1:]) for _, _, pos, _ in group))
            u = shifted_sigmas(torch.stack(u), self.cfg.noise_shift)  # shifts compose: the family's comes on top
            losses.append(self.family.training_loss(denoiser, x0, self.encode([p for _, p, _, _ in group]),
                                                    torch.stack(noise).to(x0), u.to(self.device)))
            is_class += [c for *_, c in group]
        loss = prior_preservation_loss(torch.cat(losses), torch.tensor(is_class, device=self.device),
                                       self.cfg.prior_loss_weight)
        stop_if_not_finite(self, loss, Path(self.cfg.out))
        self.last_loss = loss.detach()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.adam8bit:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=self.cfg.lr, weight_decay=1e-2)
        else:
            opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=1e-2)
        warmup = max(1, self.cfg.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint):
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["dreambooth"] = {  # plain types only: checkpoints are read with weights_only=True
            "seed": self.cfg.seed, "batches": self.global_step * self.trainer.accumulate_grad_batches,
            "rng": {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                    "python": list(random.getstate()[1]),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def on_load_checkpoint(self, checkpoint):
        check_checkpoint_weights(self, checkpoint)
        state = checkpoint.get("dreambooth", {})
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise LightboothError("the checkpoint was made with another seed; resume with the run's own config")
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            keys, pos, has_gauss, gauss = state["rng"]["numpy"]
            np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
            random.setstate((3, tuple(state["rng"]["python"]), None))
            if state["rng"].get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])


class Validation(StepEnd):
    """Images of the validation prompts every `every` steps and at the end: RUN/validation/step-N/, TensorBoard."""

    def __init__(self, folder: Path, prompts: list[str], every: int, seed: int, settings: dict,
                 conds: dict | None = None):
        super().__init__()
        self.folder, self.prompts, self.every, self.seed, self.settings = folder, prompts, every, seed, settings
        self.conds = conds  # prompt -> encoding made before the text encoder left the GPU; None: encode here

    def on_step(self, trainer, pl_module):
        if self.every and trainer.global_step % self.every == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.render(trainer, pl_module)

    def render(self, trainer, pl_module):
        from ..generate import Generator
        from ..images import save_png

        if not trainer.is_global_zero or not self.prompts:
            return
        step, modules = trainer.global_step, [m for m in (pl_module.denoiser, pl_module.text_encoder) if m]
        out = self.folder / f"step-{step:08d}"
        if out.exists():
            return
        for m in modules:
            m.eval()
        try:
            gen = Generator(pl_module.family, "dreambooth", [])
            gen.remember(self.conds or {})
            images = gen(self.prompts, seed=self.seed, **self.settings)
        finally:
            for m in modules:
                m.train()
        for i, im in enumerate(images):
            save_png(im, out, f"{i:02d}")
            if hasattr(trainer.logger, "experiment") and hasattr(trainer.logger.experiment, "add_image"):
                trainer.logger.experiment.add_image(f"validation/{i}", np.asarray(im), step, dataformats="HWC")
        print(f"step {step}: validation images in {out}", file=sys.stderr, flush=True)
