"""The family adapter interface: the few things that differ between architectures.

A family knows how to encode prompts, make per-seed noise in its latent layout, run one denoiser call with
classifier-free guidance batched into a single forward pass, walk a sampler, and decode latents to pixels.
Everything else (batching, seeds, LoRAs, files, CLI) is shared and never branches on the family.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..errors import LightboothError

MODEL_SETTINGS = "lightbooth.json"  # optional file in a model folder: {"presets": {...}, "default_preset": ...}


@dataclass(frozen=True)
class Preset:
    """Sampling settings a model is meant to be run with."""

    steps: int  # network evaluations per image (times two with CFG, batched into one call)
    guidance: float  # classifier-free guidance scale; 1 means no unconditional pass at all
    sampler: str  # one of the family's `samplers`; "flow_stochastic" re-noises with fresh noise at every step
    shift: float | None = None  # fixed flow-matching shift replacing the model's own schedule (Lightning uses 3)
    lora: str | None = None  # a LoRA file inside the model folder fused for this preset (a shipped distilled one)
    # qwen-image: rescale each token's guided velocity to the conditional one's norm, as stock Qwen-Image's true CFG
    # does; False gives plain CFG. sd always guides plainly and ignores it.
    cfg_rescale: bool = True
    euler_steps: int = 0  # flow_stochastic: this many first steps are Euler steps before re-noising starts


@dataclass
class Cond:
    """Encoded prompts: embeddings (B, L, D) and a 0/1 mask (B, L) of the tokens that count, or None if all do."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Stack rows of possibly different lengths, zero-padding and masking the tail."""
        length = max(c.embeds.shape[1] for c in conds)
        if all(c.embeds.shape[1] == length and c.mask is None for c in conds):
            return Cond(torch.cat([c.embeds for c in conds]))
        embeds, masks = [], []
        for c in conds:
            b, n, d = c.embeds.shape
            mask = c.mask if c.mask is not None else torch.ones(b, n, dtype=torch.long, device=c.embeds.device)
            embeds.append(torch.cat([c.embeds, c.embeds.new_zeros(b, length - n, d)], 1))
            masks.append(torch.cat([mask, mask.new_zeros(b, length - n)], 1))
        mask = torch.cat(masks)
        return Cond(torch.cat(embeds), None if bool(mask.all()) else mask)


def cfg_batch(cond: Cond, uncond: Cond | None, scale: float) -> Cond | None:
    """The conditioning of the batched guided forward, [cond; uncond] padded to one length; None without CFG.

    Samplers build it once per run and pass it to `guided` at every step: it does not change between steps, and
    rebuilding it (padding, mask, and the all-tokens-count check, a host sync on GPU) would repeat per step.
    """
    return None if uncond is None or scale == 1.0 else Cond.cat([cond, uncond])


def guided(forward: Callable, combine: Callable, x: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float,
           both: Cond | None = None):
    """One guided prediction: conditional and unconditional halves in ONE batched forward, then `combine`.

    diffusers' Qwen-Image pipeline runs two forwards per step; batching halves the kernel launches and weight
    reads, and the joint attention mask keeps each half's result equal to its own pass. `both` is
    `cfg_batch(cond, uncond, scale)`, built once by the caller (built here if not given).
    """
    if uncond is None or scale == 1.0:
        return forward(x, cond)
    out = forward(torch.cat([x, x]), both if both is not None else Cond.cat([cond, uncond]))
    c, u = out.chunk(2)
    return combine(c, u, scale)


class Family:
    """Base of the family adapters; subclasses fill the class constants and the methods below."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family loads
    component_names: ClassVar[tuple[str, ...]]  # subfolders it needs
    denoiser_name: ClassVar[str]  # the component LoRAs and training target
    lora_targets: ClassVar[tuple[str, ...]]  # default LoRA target module name suffixes
    distill_lora_targets: ClassVar[tuple[str, ...]] = ()  # a few-step student's LoRA targets; empty: lora_targets
    samplers: ClassVar[tuple[str, ...]]
    presets: ClassVar[dict[str, Preset]]  # must include "base"
    default_preset: str = "base"
    cuda_graphs_ok: ClassVar[bool] = False  # its denoiser call has no host syncs, so it can replay as a CUDA graph
    trace_ok: ClassVar[bool] = False  # its denoiser call traces to the same ops for every input of one shape
    fuse_projections_ok: ClassVar[bool] = False  # diffusers' fused-QKV processors are measured right for it
    fp8_skip: ClassVar[tuple[str, ...]] = ()  # denoiser layers (name substrings) kept in full precision under fp8
    compile_regional: ClassVar[bool] = False  # compile only the repeated blocks (same speed, a fraction of the wait)
    flow_matching: ClassVar[bool] = False  # trained as a rectified flow (velocity is its native output)

    def __init__(self, components: dict, path: Path, device: torch.device, dtype: torch.dtype):
        self.components, self.path, self.device, self.dtype = components, path, device, dtype
        self.graphed = None  # GraphedFunction (CUDA) or TracedFunction (CPU) over `denoise`, set by use_fast_paths

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "Family":
        quiet_libraries()
        index = json.loads((path / "model_index.json").read_text())
        comps = {name: load_component(path, name, index, dtype) for name in cls.component_names}
        for name, comp in comps.items():
            if isinstance(comp, torch.nn.Module):
                comp.to(device).eval().requires_grad_(False)
        family = cls(comps, path, device, dtype)
        family.apply_model_presets(path / MODEL_SETTINGS)
        return family

    def apply_model_presets(self, file: Path) -> None:
        """A model folder may carry its own presets (lightbooth.json), e.g. the step count it was trained for."""
        if not file.is_file():
            return
        try:
            data = json.loads(file.read_text())
            own = {name: Preset(**p) for name, p in data.get("presets", {}).items()}
        except (ValueError, TypeError) as e:
            raise LightboothError(f"{file} is not a valid lightbooth settings file: {e}") from None
        self.presets = {**type(self).presets, **own}
        self.default_preset = data.get("default_preset", self.default_preset)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    def modules_for_lora(self) -> dict[str, torch.nn.Module]:
        """Components a LoRA file may touch, by the names LoRA keys use."""
        return {k: v for k, v in self.components.items() if k in ("transformer", "unet", "text_encoder")}

    def use_fast_paths(self, *, cuda_graphs: bool = False, fuse_projections: bool = False, compile: bool = False,
                       fp8: bool = False, trace: bool = False) -> None:
        """Trade stock numerics for speed, after any LoRA is fused (each changes the denoiser in place).

        - fp8: the denoiser's linear layers in e4m3 with per-row scales (accel/fp8.py; about half the memory);
        - fuse_projections: one matrix product for Q, K and V (diffusers' fuse_qkv_projections; LoRA training
          needs the separate projections, so trainers load with fast=False);
        - compile: torch.compile the denoiser (slow first call);
        - cuda_graphs: replay each denoiser call from a CUDA graph, for families whose call allows it (CUDA only);
        - trace: replay each denoiser call from a TorchScript trace once its shape repeats (CPU only; accel/trace.py).
        Off CUDA only fp8, fuse_projections and trace change anything.
        """
        from ..accel.fp8 import to_fp8
        from ..accel.graphs import GraphedFunction
        from ..accel.trace import TracedFunction

        den = self.denoiser
        if fp8:
            to_fp8(den, skip=self.fp8_skip)
        if fuse_projections and self.fuse_projections_ok:
            den.fuse_qkv_projections()
            presign_attention(den)
        if compile:
            self.compile_denoiser()
        if cuda_graphs and self.cuda_graphs_ok and self.device.type == "cuda":
            self.graphed = GraphedFunction(self.denoise)
        elif trace and self.trace_ok and self.device.type == "cpu":
            self.graphed = TracedFunction(self.denoiser, self.denoise)

    def compile_denoiser(self) -> None:
        """torch.compile the denoiser in place (its repeated blocks, where it has them): its parameter names, and
        so checkpoints and LoRA keys, stay as they are."""
        # diffusers' Qwen RoPE multiplies complex tensors, which inductor leaves to eager kernels; a real-valued
        # rewrite measured no faster compiled (BENCHMARKS.md), so the warning would only alarm
        warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
        den = self.denoiser
        den.compile_repeated_blocks() if self.compile_regional else den.compile()

    def denoise(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The bare denoiser call on tensors only (what a CUDA graph records); families with graphs define it."""
        raise NotImplementedError

    # --- the interface -------------------------------------------------------------------------------------
    size_factor: int  # width and height must be multiples of this
    default_size: tuple[int, int]

    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        """Initial latent noise for one image, drawn on the CPU from `seed` so it is the same on every device."""
        raise NotImplementedError

    def sample(self, x: torch.Tensor, cond: Cond, uncond: Cond | None, preset: Preset, width: int, height: int,
               callback=None, renoise=None) -> torch.Tensor:
        """Run `preset`'s sampler from noise `x` (B, ...) to clean latents, CFG batched into one forward.

        `renoise(i)`: fresh unit noise shaped like `x` for the step after step i, which the "flow_stochastic"
        sampler needs (the caller draws it per image, from the image's seed)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    # --- training (DreamBooth): latents are (B, C, h, w), normalized as the denoiser sees them ---------------
    text_lora_targets: ClassVar[tuple[str, ...]] = ()  # LoRA targets in the text encoder; empty: it never trains

    def encode_text(self, prompts: list[str], text_encoder: torch.nn.Module | None = None) -> Cond:
        """`encode` without inference mode, through `text_encoder` (default: the loaded one), so it can train."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> clean training latents (B, C, h, w): the frozen VAE's posterior mean."""
        raise NotImplementedError

    def training_loss(self, denoiser: torch.nn.Module, x0: torch.Tensor, cond: Cond, noise: torch.Tensor,
                      u: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising loss (B,) of `denoiser` on clean latents `x0` with `noise` at noise levels picked
        by uniform draws `u` (B,) in (0, 1); the family maps `u` onto its own noise schedule."""
        raise NotImplementedError


# --- distillation: what training/distill needs of a family, in rectified-flow coordinates --------------------------
#   velocity(x, cond, sigma, width, height, uncond=None, guidance_scale=1.0, both=None, rescale=True) -> the (guided)
#       velocity (with `rescale`, the family's own CFG rescale where it has one: Preset.cfg_rescale) n - x0 at
#       flow level sigma (a scalar or one per row) for states x = (1 - sigma) x0 + sigma n in the
#       family's `noise` layout;
#   schedule(preset, image_seq_len) -> the flow levels (steps + 1, descending to 0) `preset` samples along; a
#       preset with sampler "flow_euler" and a `shift` is how a distilled student's schedule is stored;
#   image_tokens(width, height) -> the `image_seq_len` that schedule takes.
# Flow-matching families have them natively; sd derives them from its DDPM schedule (sampling/schedules.py).
DISTILL_METHODS = ("velocity", "schedule", "image_tokens")


def can_distill(family: Family) -> bool:
    """Whether `family` offers the rectified-flow view distillation works in."""
    return all(callable(getattr(family, m, None)) for m in DISTILL_METHODS)


def load_component(path: Path, name: str, index: dict, dtype: torch.dtype):
    """Load one component with the class model_index.json names, from safetensors only."""
    if name not in index:
        raise LightboothError(f"{path}/model_index.json has no '{name}' component; is this a complete diffusers folder?")
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    sub = path / name
    try:
        if name in ("tokenizer", "scheduler"):
            return cls.from_pretrained(str(path), subfolder=name)
        return cls.from_pretrained(str(sub), torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        pickles = [p.name for p in sub.glob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth")] if sub.is_dir() else []
        if pickles and not any(sub.glob("*.safetensors")):
            raise LightboothError(
                f"{sub} holds only pickle weights ({pickles[0]}); lightbooth loads safetensors only: convert them "
                "with a tool you trust (e.g. diffusers' save_pretrained(safe_serialization=True))") from None
        raise LightboothError(f"could not load {name} from {sub}: {first}") from None


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' per-load progress bars and advisory warnings; our errors are our own."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    # diffusers logs a failed weights lookup at error level before raising it; the raise becomes our one line
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)


def presign_attention(model: torch.nn.Module) -> None:
    """Give each attention processor in `model` its call signature up front.

    diffusers' Attention.forward runs inspect.signature(processor.__call__) on every call to filter its kwargs:
    5-7% of a small denoiser's forward on CPU, paid per layer per step. inspect returns a callable's
    `__signature__` when it has one, so an instance-level `__call__` carrying the (unchanging) signature makes
    that lookup cheap; calling the processor still goes through its class's `__call__`, so nothing else changes.
    """
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if proc is None or "__call__" in getattr(proc, "__dict__", {"__call__": None}):
            continue
        bound = functools.partial(type(proc).__call__, proc)
        bound.__signature__ = inspect.signature(proc.__call__)
        proc.__call__ = bound
