"""The Lightning side of distillation: prompts per step, adapter switching, and the two methods' training steps.

One denoiser carries the frozen teacher (its base weights, personalisation LoRAs already fused in) and peft LoRA
adapters: "student" (what is trained and shipped) and, for DMD, "fake" (the score of the student's own samples).
Which one a forward pass uses is switched without touching `requires_grad`, so one backward pass can reach both
(their losses never share a path: each sees only detached outputs of the other). Everything random in step g is
a pure function of (seed, g), so a resumed run replays the uninterrupted one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ...families.base import Cond
from ...sampling import schedules
from ...seeds import draw_seed
from ..checkpoints import check_checkpoint_weights
from ..common import lr_lambda, spec_loader, stop_if_not_finite
from ..losses import flow_matching_loss, mse, shifted_sigmas
from . import methods

STUDENT, FAKE = "student", "fake"


@contextlib.contextmanager
def adapter(model: torch.nn.Module, name: str | None):
    """Run `model` with only adapter `name` active (None: no adapter, the teacher), restoring the previous state.

    peft's own `set_adapter` also flips `requires_grad`, which would drop gradients already recorded for the
    other adapter in this step; here only the routing changes.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        m._disable_adapters = name is None
        if name is not None:
            m._active_adapter = [name]
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


class PromptSource:
    """The prompts of step g: drawn from a list (a prompts file) or made by the shapes-world captioner."""

    def __init__(self, prompts: list[str] | None, seed: int):
        self.prompts, self.seed = prompts, seed

    def batch(self, g: int, n: int) -> list[str]:
        rng = np.random.default_rng([self.seed, 7, g])
        if self.prompts:
            return [self.prompts[int(i)] for i in rng.integers(0, len(self.prompts), n)]
        from ...data import shapes

        return [shapes.caption(shapes.sample_scene(rng), "en" if rng.random() < 0.5 else "zh", rng) for _ in range(n)]


class Iterations(torch.utils.data.Sampler):
    """Endless step numbers from `start` (a resumed run continues the sequence)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        g = self.start
        while True:
            yield [g]
            g += 1


class DistillModule(L.LightningModule):
    """Trains the student adapter of `family.denoiser` by `cfg.method` ("trajectory" or "dmd")."""

    def __init__(self, cfg, family, teacher_preset, student_sigmas: torch.Tensor, size: tuple[int, int]):
        super().__init__()
        self.cfg, self.family, self.teacher = cfg, family, teacher_preset
        self.denoiser = family.denoiser.train()
        self.student_sigmas, (self.width, self.height) = student_sigmas, size
        self.prompts = PromptSource(read_prompts(cfg.prompts_file), cfg.seed)
        self.strict_loading = False  # checkpoints hold only the adapters
        self.last_loss: torch.Tensor | None = None
        self._encoded: dict[str, Cond] = {}  # the negative prompt, and a prompts file's prompts (a finite set)

    def train_dataloader(self):
        return spec_loader(Iterations(self.trainer.global_step))

    # --- pieces ------------------------------------------------------------------------------------------------
    def conds(self, prompts: list[str]) -> tuple[Cond, Cond | None]:
        """Prompt and negative-prompt encodings, each prompt encoded alone as generation does it (plain tensors,
        usable under autograd). Generated captions are rarely seen twice, so only a finite set is cached."""
        def encode(p: str) -> Cond:
            if p in self._encoded:
                return self._encoded[p]
            c = self.family.encode([p])
            c = Cond(c.embeds.clone(), None if c.mask is None else c.mask.clone())
            if p == "" or self.prompts.prompts:
                self._encoded[p] = c
            return c

        cond = Cond.cat([encode(p) for p in prompts])
        uncond = Cond.cat([encode("")] * len(prompts)) if self.teacher.guidance != 1 else None
        return cond, uncond

    def velocity(self, cond: Cond, uncond: Cond | None = None, guidance: float = 1.0):
        """A velocity function of the denoiser as currently routed (see `adapter`)."""
        return lambda x, s: self.family.velocity(x, cond, s, self.width, self.height, uncond, guidance,
                                                 rescale=self.teacher.cfg_rescale)

    def noise(self, g: int, n: int, stream: int) -> torch.Tensor:
        return torch.cat([self.family.noise(draw_seed(self.cfg.seed, g, stream, i), self.width, self.height)
                          for i in range(n)]).float().to(self.device)

    def start(self, g: int, n: int) -> torch.Tensor:
        """The students' (and the teacher's) starting states at the first student level: the family's unit noise
        in flow coordinates (itself at level 1; sd starts below 1, where DDPM's unit noise is rescaled)."""
        return self.noise(g, n, 0) / schedules.vp_scale(self.student_sigmas[0]).to(self.device)

    def renoise(self, g: int, n: int):
        """The fresh noise of the student's re-noising sampler ("flow_stochastic") after step i; None for Euler."""
        if self.cfg.sampler != "flow_stochastic":
            return None
        return lambda i: self.noise(g, n, 3 + i)

    def levels(self, g: int, n: int, stream: int) -> torch.Tensor:
        """DMD's noise levels for re-noising, spread by `dmd_level_shift` (default: the student's shift), within the
        range the student starts from (all of [0, 1] for flow models, up to the top level sd was trained on)."""
        u = torch.rand(n, generator=torch.Generator().manual_seed(draw_seed(self.cfg.seed, g, stream)))
        shift = self.cfg.shift if self.cfg.dmd_level_shift is None else self.cfg.dmd_level_shift
        return (shifted_sigmas(u.clamp(0.02, 0.98), shift=shift) * self.student_sigmas[0]).to(self.device)

    # --- the methods -------------------------------------------------------------------------------------------
    def trajectory_step(self, g: int, cond: Cond, uncond: Cond | None) -> torch.Tensor:
        """Teacher ODE (its own sampler grid, CFG) over each segment of the student's schedule; the student's one
        Euler step over the segment regresses onto it. The segments start from the teacher's own states, or with
        `states: student` from where the student's own sampling (no gradients) has got to."""
        n, k, sig = len(cond.embeds), len(self.student_sigmas) - 1, self.student_sigmas
        grid, where = methods.merged_schedule(self.teacher_sigmas(), sig)
        grid, teacher = grid.to(self.device), self.velocity(cond, uncond, self.teacher.guidance)
        if self.cfg.states == "student":
            with adapter(self.denoiser, STUDENT), torch.no_grad():
                starts = methods.student_states(self.velocity(cond), self.start(g, n), sig.to(self.device))
            with adapter(self.denoiser, None):
                ends = [methods.ode_states(teacher, x, grid[where[i]:where[i + 1] + 1], [where[i + 1] - where[i]])[0]
                        for i, x in enumerate(starts)]
            states = list(zip(starts, ends))
        else:
            with adapter(self.denoiser, None):
                path = methods.ode_states(teacher, self.start(g, n), grid, where)
            states = list(zip(path, path[1:]))
        targets = methods.trajectory_targets(states, sig)
        x = torch.cat([a for a, _ in states])  # (k*B, ...): every segment of every sample in one forward
        s = torch.cat([sig[i].expand(n) for i in range(k)]).to(self.device)
        rep = Cond.cat([cond] * k)
        with adapter(self.denoiser, STUDENT):
            v = self.family.velocity(x, rep, s, self.width, self.height)
        return mse(v, torch.cat(targets))

    def dmd_step(self, g: int, cond: Cond, uncond: Cond | None) -> torch.Tensor:
        """One critic (fake score) update every step; a generator update every `fake_updates` steps, none in the
        first `fake_warmup` steps."""
        n, k = len(cond.embeds), len(self.student_sigmas) - 1
        gen_turn = g >= self.cfg.fake_warmup and g % self.cfg.fake_updates == 0
        j = int(np.random.default_rng([self.cfg.seed, 5, g]).integers(0, k))  # which step to train (backward sim.)
        with adapter(self.denoiser, STUDENT), torch.set_grad_enabled(gen_turn):
            x0 = methods.student_sample(self.velocity(cond), self.start(g, n), self.student_sigmas.to(self.device),
                                        stop=j, grad_at=j, renoise=self.renoise(g, n),
                                        euler_steps=self.cfg.euler_steps)
        loss = x0.new_zeros(())
        if gen_turn:
            t = self.levels(g, n, 1)
            xt = methods.renoise(x0.detach(), self.noise(g, n, 1), t)
            with torch.no_grad():
                with adapter(self.denoiser, None):
                    real = methods.x0_estimate(xt, self.velocity(cond, uncond, self.teacher.guidance)(xt, t), t)
                with adapter(self.denoiser, FAKE):
                    fake = methods.x0_estimate(xt, self.velocity(cond)(xt, t), t)
            loss = loss + methods.dmd_loss(x0, real, fake)
        t2, n2 = self.levels(g, n, 2), self.noise(g, n, 2)
        clean = x0.detach()
        with adapter(self.denoiser, FAKE):  # the fake score learns the student's current distribution
            v = self.velocity(cond)(methods.renoise(clean, n2, t2), t2)
        return loss + flow_matching_loss(v, clean, n2)

    def teacher_sigmas(self) -> torch.Tensor:
        return self.family.schedule(self.teacher, self.family.image_tokens(self.width, self.height))

    # --- Lightning -----------------------------------------------------------------------------------------------
    def training_step(self, g, _):
        cond, uncond = self.conds(self.prompts.batch(g, self.cfg.batch_size))
        step = self.dmd_step if self.cfg.method == "dmd" else self.trajectory_step
        loss = step(g, cond, uncond)
        stop_if_not_finite(self, loss, Path(self.cfg.out))
        self.last_loss = loss.detach()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups = [{"params": [p for n, p in self.denoiser.named_parameters() if f".{STUDENT}." in n],
                   "lr": self.cfg.lr}]
        fake = [p for n, p in self.denoiser.named_parameters() if f".{FAKE}." in n]
        if fake:
            groups.append({"params": fake, "lr": self.cfg.fake_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)  # params without a gradient this step are skipped
        if self.cfg.lr_schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, self.cfg.steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint):
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint):
        check_checkpoint_weights(self, checkpoint)


def read_prompts(path: str | None) -> list[str] | None:
    """The prompts of a prompts file (None: none given); one-line errors for an unreadable or empty file."""
    if not path:
        return None
    from ...batch import prompt_lines
    from ...errors import LightboothError

    prompts = list(prompt_lines(Path(path)))  # its own one-line errors for a missing or unreadable file
    if not prompts:
        raise LightboothError(f"prompts file {path} has no prompts; put one prompt per line")
    return prompts
