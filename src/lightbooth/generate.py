"""Generator: load a model family with LoRAs, then turn prompts x seeds into images.

Every image's noise is drawn from its own seed on the CPU, so an image depends only on (prompt, seed, settings),
never on which batch it was made in. Prompt encodings are cached per Generator.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .atomic import why_unmakeable
from .errors import LightboothError
from .families.base import Cond, Family, Preset
from .images import attach, to_pil
from .seeds import draw_seed


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    seed: int
    prompt_index: int = 0


@dataclass(frozen=True)
class Settings:
    """Resolved sampling settings shared by all images of one call."""

    preset_name: str
    preset: Preset
    width: int
    height: int
    negative_prompt: str


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'path' or 'path:scale' -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            if Path(path).is_file() and not Path(spec).exists():
                raise LightboothError(f"LoRA scale {scale!r} in {spec!r} is not a number; write PATH:SCALE with a "
                                      "number, e.g. PATH:0.8") from None
        else:
            check_finite("LoRA scale", value)
            return path, value
    return spec, 1.0


def check_finite(label: str, value: float) -> float:
    """`value`, or a one-line error if it is NaN or infinite (it would give black or NaN images)."""
    if not math.isfinite(value):
        raise LightboothError(f"{label} must be a finite number (got {value}); pass e.g. 1.0")
    return value


def known_preset(family: Family, name: str) -> Preset:
    """The family's preset `name`, or a one-line error listing the ones it has."""
    if name not in family.presets:
        raise LightboothError(f"unknown preset {name!r} for {family.name}; choose one of {', '.join(family.presets)}")
    return family.presets[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


MAX_SEED = 2 ** 64 - 1  # torch's generator seeds are 64-bit


def _seed(value) -> int:
    """An integer seed in 0 .. 2**64 - 1 (numpy integers too), or a one-line error."""
    try:
        s = operator.index(value)  # ints and numpy ints; not floats, strings or bools' look-alikes
    except TypeError:
        raise LightboothError(f"seed {value!r} is not a whole number; pass an int or a list of ints") from None
    if isinstance(value, bool) or not 0 <= s <= MAX_SEED:
        raise LightboothError(f"seed {value!r} is out of range; seeds go from 0 to {MAX_SEED}")
    return s


def expand_jobs(prompts: Sequence[str], seed: int | Sequence[int], num_images: int) -> list[Job]:
    """Each prompt x each seed; `seed=42, num_images=4` means seeds 42, 43, 44, 45 for every prompt."""
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
        first = _seed(seed)
        if first + num_images - 1 > MAX_SEED:
            raise LightboothError(f"seeds {first} .. {first + num_images - 1} run past {MAX_SEED}; pass a smaller "
                                  "--seed")
        seeds = [first + i for i in range(num_images)]
    else:
        seeds = [_seed(s) for s in seed]
        if not seeds:
            raise LightboothError("the seed list is empty; give one seed or one per image")
        if num_images not in (1, len(seeds)):
            raise LightboothError(f"{len(seeds)} seeds given for --num-images {num_images}; give one seed or one "
                                  "per image")
    return [Job(p, s, i) for i, p in enumerate(prompts) for s in seeds]


class Generator:
    """A loaded model ready to generate: `Generator.load(...)(prompts, seed=..., num_images=...)`."""

    def __init__(self, family: Family, model_name: str, loras: list[dict], lora_preset: dict | None = None,
                 preset: str | None = None, fp8: bool = False):
        self.family, self.model_name, self.loras = family, model_name, loras
        self.fp8 = fp8  # the numerics change the image, so they go into its parameters with the dtype
        self.lora_preset = lora_preset  # a schedule a distilled LoRA asks for, used when no preset is given
        self.preset = preset  # the preset loaded for (its LoRA, if any, is fused); None: a distilled LoRA's own
        self._cache: dict[str, Cond] = {}

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, loras: Sequence = (), device=None, dtype=None,
             fast: bool = True, fp8: bool = False, compile: bool = False, preset: str | None = None):
        """Load `model` (None: the built-in model) and fuse `loras` ('path', 'path:scale' or (path, scale)).

        `preset`: the sampling preset to load for (default: the model's own default, or the schedule a distilled
        LoRA in `loras` carries). A preset may fuse a LoRA shipped in the model folder (the built-in model's 4- and
        8-step presets do), so it is chosen here; `preset="base"` gives the plain model, as trainers need.
        `fast`: on CUDA, fused Q/K/V projections and CUDA-graph replay where the family allows; on CPU, TorchScript
        traces of the denoiser once a shape repeats (the same ops without Python between them); `fp8`: the
        denoiser's linear layers in fp8 (half the memory; about 2x the matrix rate on Hopper; small error);
        `compile`: torch.compile the denoiser (its repeated blocks where the family has them): a slow first call
        (3-12 s for Qwen-Image at full size on an H200), then fused kernels; it replaces CPU traces.
        """
        from . import lora as lora_mod
        from .families import family_class
        from .models import family_of, resolve_model
        from .safeload import validate_safetensors

        path = resolve_model(model)
        device = check_device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise LightboothError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
            dtype = getattr(torch, dtype)
        family = family_class(family_of(path)).load(path, device, dtype)
        applied, lora_preset = [], None
        for spec in loras:
            p, scale = parse_lora_spec(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else spec
            check_finite("LoRA scale", float(scale))
            weights = lora_mod.load_lora(str(p), family.name, family.modules_for_lora())
            lora_mod.fuse(family.modules_for_lora(), weights, scale)
            meta = validate_safetensors(p)
            applied.append({"path": str(p), "scale": scale})
            if meta.get("lightbooth_preset"):
                lora_preset = json.loads(meta["lightbooth_preset"])
        if preset is not None:
            known_preset(family, preset)
        name = preset or (None if lora_preset else family.default_preset)
        if name is not None and family.presets[name].lora:
            file = path / family.presets[name].lora
            if not file.is_file():
                raise LightboothError(f"preset {name!r} needs {file}, which is missing; reinstall the model or pass "
                                      "--preset base")
            lora_mod.fuse(family.modules_for_lora(), lora_mod.load_lora(str(file), family.name,
                                                                        family.modules_for_lora()), 1.0)
        on_cuda = fast and device.type == "cuda"
        family.use_fast_paths(cuda_graphs=on_cuda, fuse_projections=on_cuda, fp8=fp8, compile=compile,
                              trace=fast and device.type == "cpu" and not compile)
        return cls(family, "builtin" if model is None else str(model), applied, lora_preset, name, fp8)

    # --- settings ------------------------------------------------------------------------------------------
    def settings(self, *, preset=None, steps=None, guidance=None, sampler=None, width=None, height=None,
                 negative_prompt=None, cfg_rescale=None, euler_steps=None) -> Settings:
        """Fill unset values from the preset (the LoRA's own schedule, else the family's base) and validate."""
        fam = self.family
        if preset is None and self.lora_preset is not None:
            name, base = "lora", Preset(**self.lora_preset)
        else:
            name = preset or self.preset or fam.default_preset
            base = known_preset(fam, name)
            fused = self.preset if self.preset and fam.presets[self.preset].lora else None
            if (base.lora or fused) and name != fused:
                raise LightboothError(f"preset {name!r} needs other weights than the model was loaded with (a preset "
                                      f"fuses its own LoRA); load it with preset={name!r} (CLI: --preset {name})")
        p = replace(base, **{k: v for k, v in dict(steps=steps, guidance=guidance, sampler=sampler,
                                                   cfg_rescale=cfg_rescale, euler_steps=euler_steps).items()
                              if v is not None})
        if p.steps < 1:
            raise LightboothError(f"steps must be at least 1 (got {p.steps})")
        check_finite("guidance", p.guidance)
        if p.sampler not in fam.samplers:
            raise LightboothError(f"sampler {p.sampler!r} does not run {fam.name}; choose one of {', '.join(fam.samplers)}")
        if p.euler_steps < 0:
            raise LightboothError(f"euler steps must be 0 or more (got {p.euler_steps})")
        if euler_steps is not None and p.sampler != "flow_stochastic":
            raise LightboothError(f"euler steps apply to the flow_stochastic sampler only (this run samples with "
                                  f"{p.sampler}); add --sampler flow_stochastic or leave --euler-steps out")
        w = fam.default_size[0] if width is None else width
        h = fam.default_size[1] if height is None else height
        for label, v in (("width", w), ("height", h)):
            if v < fam.size_factor or v % fam.size_factor:
                raise LightboothError(f"{label} {v} is not a positive multiple of {fam.size_factor}, which {fam.name} "
                                      f"needs; use e.g. {max(fam.size_factor, v // fam.size_factor * fam.size_factor)}")
        return Settings(name, p, w, h, negative_prompt or "")

    def params(self, job: Job, s: Settings) -> dict:
        """What goes into the PNG: enough to make the same image again (euler_steps only where it acts, so that a
        `--prompts-file` run written before it existed still resumes, its images matching)."""
        acts = s.preset.euler_steps and s.preset.sampler == "flow_stochastic"
        more = {"euler_steps": s.preset.euler_steps} if acts else {}
        return dict(prompt=job.prompt, negative_prompt=s.negative_prompt, seed=job.seed, steps=s.preset.steps,
                    guidance=s.preset.guidance, width=s.width, height=s.height, model=self.model_name,
                    loras=self.loras, preset=s.preset_name, sampler=s.preset.sampler,
                    family=self.family.name, dtype=str(self.family.dtype).removeprefix("torch."), fp8=self.fp8,
                    cfg_rescale=s.preset.cfg_rescale, **more)

    # --- generation ----------------------------------------------------------------------------------------
    def remember(self, conds: dict[str, Cond]) -> None:
        """Use these prompt encodings instead of running the text encoder for them (moved to this device)."""
        dev = self.family.device
        for p, c in conds.items():
            self._cache[p] = Cond(c.embeds.to(dev), None if c.mask is None else c.mask.to(dev))

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Encodings of `prompts`, one row each, each encoded alone (so batching cannot change it) and cached."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for p in new:
            self._cache[p] = self.family.encode([p])
        return Cond.cat([self._cache[p] for p in prompts])

    def run(self, jobs: Sequence[Job], s: Settings, callback: Callable | None = None) -> list:
        """Make the images of `jobs` in one batch."""
        fam = self.family
        cond = self.encode([j.prompt for j in jobs])
        uncond = self.encode([s.negative_prompt] * len(jobs)) if s.preset.guidance != 1.0 else None
        x = torch.cat([fam.noise(j.seed, s.width, s.height) for j in jobs]).to(fam.device)

        def renoise(i: int) -> torch.Tensor:  # each image's fresh noise after step i comes from its own seed alone
            return torch.cat([fam.noise(draw_seed(j.seed, i + 1), s.width, s.height) for j in jobs]).to(fam.device)

        latents = fam.sample(x, cond, uncond, s.preset, s.width, s.height, callback, renoise)
        images = to_pil(fam.decode(latents, s.width, s.height))
        return [attach(im, self.params(j, s)) for im, j in zip(images, jobs)]

    def __call__(self, prompt: str | list[str], *, negative_prompt: str | None = None, seed: int | list[int] = 0,
                 num_images: int = 1, steps: int | None = None, guidance: float | None = None,
                 width: int | None = None, height: int | None = None, preset: str | None = None,
                 sampler: str | None = None, batch_size: int | None = None, progress: Callable | None = None,
                 cfg_rescale: bool | None = None, euler_steps: int | None = None):
        """Generate images for every prompt x seed; returns PIL images carrying their parameters in `.info`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_prompts(prompts)
        if num_images < 1:
            raise LightboothError(f"num_images must be at least 1 (got {num_images})")
        s = self.settings(preset=preset, steps=steps, guidance=guidance, sampler=sampler, width=width,
                          height=height, negative_prompt=negative_prompt, cfg_rescale=cfg_rescale,
                          euler_steps=euler_steps)
        jobs = expand_jobs(prompts, seed, num_images)
        bs = len(jobs) if batch_size is None else batch_size
        if bs < 1:
            raise LightboothError(f"batch size must be at least 1 (got {bs})")
        out = []
        for i in range(0, len(jobs), bs):
            out += self.run(jobs[i:i + bs], s)
            if progress:
                progress(len(out), len(jobs))
        return out


def check_prompts(prompts: Sequence[str]) -> None:
    if not prompts:
        raise LightboothError("no prompt given; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise LightboothError(f"prompt {i + 1} is empty; every prompt needs some text")


def save_dir_ready(out: Path) -> Path:
    """Create the output folder; refuse a path that is a file or a folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise LightboothError(f"--out {out} is a file; pass a folder (new or existing) for the images")
    if why := why_unmakeable(out):
        raise LightboothError(f"cannot create --out folder {out}: {why}; pass a folder you can write to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LightboothError(f"cannot create --out folder {out} ({e.strerror or type(e).__name__}); pass a folder "
                              "you can write to") from None
    return out


@contextlib.contextmanager
def out_dir_ready(out: Path):
    """`save_dir_ready(out)` for the body of a command; if the body fails, the folders this call created are
    removed again while they are still empty, so a rejected run leaves nothing behind."""
    created = [d for d in (out, *out.parents) if not d.exists()]
    save_dir_ready(out)
    try:
        yield out
    except BaseException:
        for d in created:  # deepest first; rmdir only ever removes an empty folder
            try:
                d.rmdir()
            except OSError:
                break
        raise


def check_device(device) -> torch.device:
    """`device` as a torch device that exists on this machine, or a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LightboothError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= count or count == 0:
            raise LightboothError(f"device {device!r} is not available (this machine has {count} CUDA GPU(s)); "
                                  "pass --device cpu or an existing cuda:N")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise LightboothError(f"device {device!r} is not available ({str(e).splitlines()[0][:200]}); pass "
                                  "--device cpu or cuda") from None
    return dev
