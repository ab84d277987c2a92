"""The one place that knows LoRA key formats.

LoRA files in the wild use at least five key spellings for the same low-rank update. Generation, DreamBooth and
distillation all convert to one canonical in-memory form (`LoraWeights`) here, so format quirks are handled once and
everything downstream (fusing, saving, checking) deals only with "<component>.<module path>" -> (down, up, alpha).

The effective update of a layer is `(alpha / rank) * up @ down`, the convention of kohya, PEFT and diffusers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lightbooth.errors import LightboothError
from lightbooth.safeload import load_safetensors, save_safetensors_atomic

COMPONENTS = ("transformer", "unet", "text_encoder", "text_encoder_2")
FAMILY_COMPONENTS = {"qwen-image": ("transformer",), "sd": ("unet", "text_encoder")}
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig of each component

_KOHYA_PREFIXES = {  # None: the family's denoiser (unet for sd, transformer for qwen-image / musubi)
    "lora_unet_": None, "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
}
# (suffix, role). Longest first so ".lora_A.default.weight" wins over shorter matches.
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# Old diffusers attention-processor names ("attn1.processor.to_q_lora") -> real module names.
_OLD_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_MISMATCH = "the LoRA does not match this model (it was probably trained for another model family or size)"


@dataclass
class LoraLayer:
    """One low-rank update: down [r, in] (conv: [r, in, kh, kw]), up [out, r] (conv: [out, r, 1, 1])."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The fp32 weight update as a matrix [out, in * kh * kw]; callers reshape to the weight's shape."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.rank, -1).float()
        return (self.alpha / self.rank) * (up @ down)


LoraWeights = dict[str, LoraLayer]


def _fail(key: str, why: str) -> LightboothError:
    return LightboothError(f"LoRA key {key!r} {why}; {_MISMATCH}")


# ----------------------------------------------------------------------------------------------------------------
# Reading: key parsing
# ----------------------------------------------------------------------------------------------------------------


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the key convention of a LoRA state dict: "kohya", "comfyui", "diffusers_old" or "peft".

    "comfyui" covers dotted lora_down/lora_up keys with or without the `diffusion_model.` prefix, which is also how
    the released Qwen-Image-Lightning LoRAs are spelled. Informational: `to_canonical` parses each key on its own.
    """
    keys = list(state_dict)
    if not keys:
        raise LightboothError("the LoRA file has no tensors; re-export it")
    if any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") or ".lora_down." in k for k in keys):
        return "comfyui"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers_old"
    if any(".lora_A." in k for k in keys):
        return "peft"
    raise LightboothError(f"no LoRA weights found (first key {keys[0]!r}); pass a LoRA .safetensors file")


def _split_suffix(key: str) -> tuple[str, str]:
    """Split a key into (module part, role) with role in {"down", "up", "alpha"}."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            # "...attn1.processor.to_q_lora.down.weight": only the four attention projections were spelled so
            if suffix.startswith("_lora.") and base.rpartition(".")[2] not in _OLD_PROC:
                break
            return base, role
    raise _fail(key, "is not a LoRA down/up/alpha weight (LoKr, LoHa, DoRA and LoRA biases are not supported)")


def _split_component(base: str, family: str) -> tuple[str | None, str, bool]:
    """Return (component or None when unprefixed, module path, is_flat) for the module part of a key."""
    for prefix, comp in _KOHYA_PREFIXES.items():
        if base.startswith(prefix):
            default = FAMILY_COMPONENTS[family][0]
            return comp or default, base[len(prefix):], True
    if base.startswith("diffusion_model."):
        return FAMILY_COMPONENTS[family][0], base[len("diffusion_model."):], False
    head, _, rest = base.partition(".")
    if head in COMPONENTS and rest:
        return head, rest, False
    return None, base, False


def _undo_old_processor(path: str, component: str) -> str:
    """Map old attn-processor names (attn1.processor.to_q, self_attn.to_q) to the modules they patched."""
    head, _, last = path.rpartition(".")
    if component.startswith("text_encoder") and head.endswith("self_attn") and last in _OLD_TE_PROC:
        return f"{head}.{_OLD_TE_PROC[last]}"
    if head.endswith(".processor") and last in _OLD_PROC:
        return f"{head[: -len('.processor')]}.{_OLD_PROC[last]}"
    return path


class _Resolver:
    """Maps a (component, dotted or kohya-flattened) module name to a real module path of the loaded model."""

    def __init__(self, family: str, modules: dict[str, set[str]]):
        if family not in FAMILY_COMPONENTS:
            raise LightboothError(f"unknown model family {family!r}; use one of {sorted(FAMILY_COMPONENTS)}")
        self.family = family
        self.modules = {c: set(m) for c, m in modules.items()}
        self._flat: dict[str, dict[str, list[str]]] = {}

    def _aliases(self, component: str, name: str) -> list[str]:
        """CLIPTextModel lost its `text_model.` level in transformers 5; accept names with and without it."""
        out = [name]
        if component.startswith("text_encoder"):
            out += [name[len("text_model."):]] if name.startswith("text_model.") else [f"text_model.{name}"]
        return out

    def _flat_map(self, component: str) -> dict[str, list[str]]:
        if component not in self._flat:
            table = defaultdict(list)
            for name in self.modules.get(component, ()):
                for alias in self._aliases(component, name):
                    table[alias.replace(".", "_")].append(name)
            self._flat[component] = table
        return self._flat[component]

    def _lookup(self, component: str, path: str, flat: bool) -> str | None:
        if flat:
            hits = sorted(set(self._flat_map(component).get(path, ())))
            return hits[0] if len(hits) == 1 else None
        names = self.modules.get(component, set())
        tries = self._aliases(component, path) + self._aliases(component, _undo_old_processor(path, component))
        return next((a for a in tries if a in names), None)

    def resolve(self, key: str, component: str | None, path: str, flat: bool) -> tuple[str, str]:
        allowed = FAMILY_COMPONENTS[self.family]
        if component is not None and component not in allowed:
            raise _fail(key, f"targets the {component}, but {self.family} LoRAs apply only to {'/'.join(allowed)}")
        candidates = [component] if component else list(allowed)
        for comp in candidates:
            found = self._lookup(comp, path, flat)
            if found is not None:
                return comp, found
        where = "/".join(candidates)
        raise _fail(key, f"names module {path!r}, which this {self.family} {where} does not have")


# ----------------------------------------------------------------------------------------------------------------
# Reading: alphas from diffusers' lora_adapter_metadata
# ----------------------------------------------------------------------------------------------------------------


def _adapter_configs(metadata: dict[str, str] | None) -> dict[str, dict]:
    """Parse diffusers' per-component LoraConfig kwargs ("transformer.lora_alpha", ...) from file metadata.

    Unprefixed keys (written by `model.save_lora_adapter`) are returned under "" and apply to every component.
    """
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LightboothError(f"the LoRA's {LORA_ADAPTER_METADATA_KEY} metadata is not valid JSON; re-export it")
    out: dict[str, dict] = defaultdict(dict)
    for k, v in flat.items() if isinstance(flat, dict) else ():
        head, _, rest = k.partition(".")
        if head in COMPONENTS and rest:
            out[head][rest] = v
        else:
            out[""][k] = v
    return dict(out)


def _pattern_value(patterns: dict, module: str):
    """Look up a PEFT rank/alpha pattern exactly as peft's `get_pattern_key` does (regex, suffix match)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _alpha_from_config(config: dict, module: str, rank: int) -> float | None:
    """Canonical alpha implied by a LoraConfig dict, or None when it does not say."""
    if config.get("use_dora"):
        raise LightboothError("this LoRA is a DoRA adapter, which lightbooth cannot fuse; use a plain LoRA")
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    if config.get("use_rslora"):  # scaling alpha / sqrt(r) == canonical alpha' / r
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


# ----------------------------------------------------------------------------------------------------------------
# Reading: assembling the canonical form
# ----------------------------------------------------------------------------------------------------------------


def _as_matrix_pair(key: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise _fail(key, f"has unexpected LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)}")
    if up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise _fail(key, f"has inconsistent LoRA ranks down {tuple(down.shape)} / up {tuple(up.shape)}")


def to_canonical(
    state_dict: dict[str, torch.Tensor],
    family: str,
    modules: dict[str, set[str]],
    metadata: dict[str, str] | None = None,
) -> LoraWeights:
    """Convert a LoRA state dict in any supported format to `LoraWeights` for a model of `family`.

    `modules` maps component name -> the model's module paths (from `named_modules()`); kohya's flattened names
    are mapped back through it because '_' -> '.' is ambiguous on its own. `metadata` is the safetensors metadata,
    used for diffusers' per-module alphas when the file has no `.alpha` tensors. Raises `LightboothError` naming the
    first key that is not LoRA, targets a module the model lacks, or has inconsistent shapes.
    """
    detect_format(state_dict)
    resolver = _Resolver(family, modules)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    for key in sorted(state_dict):
        base, role = _split_suffix(key)
        component, path, flat = _split_component(base, family)
        comp, module = resolver.resolve(key, component, path, flat)
        target = f"{comp}.{module}"
        if role in parts[target]:
            raise _fail(key, f"duplicates the {role} weight of {target} already given by {parts[target][role][0]!r}")
        parts[target][role] = (key, state_dict[key])
    configs = _adapter_configs(metadata)
    return {target: _layer(target, p, configs) for target, p in sorted(parts.items())}


def _layer(target: str, part: dict[str, tuple[str, torch.Tensor]], configs: dict[str, dict]) -> LoraLayer:
    """Build one LoraLayer, taking alpha from an .alpha tensor, else diffusers metadata, else the rank."""
    first_key = next(iter(part.values()))[0]
    if "down" not in part or "up" not in part:
        missing = "down (lora_A)" if "down" not in part else "up (lora_B)"
        raise LightboothError(f"LoRA key {first_key!r} has no matching {missing} weight; the LoRA file is incomplete")
    down, up = part["down"][1], part["up"][1]
    _as_matrix_pair(first_key, down, up)
    rank = down.shape[0]
    if "alpha" in part:
        alpha = float(part["alpha"][1].float().reshape(-1)[0]) or float(rank)  # kohya: alpha 0 means "= rank"
    else:
        component, _, module = target.partition(".")
        config = configs.get(component) or configs.get("") or {}
        alpha = _alpha_from_config(config, module, rank)
        alpha = float(rank) if alpha is None else alpha
    return LoraLayer(down=down, up=up, alpha=alpha)


# ----------------------------------------------------------------------------------------------------------------
# Checking and fusing
# ----------------------------------------------------------------------------------------------------------------


def _target_module(components: dict[str, nn.Module], target: str) -> nn.Module:
    component, _, path = target.partition(".")
    if component not in components:
        raise LightboothError(f"LoRA layer {target!r} targets the {component}, which is not loaded; {_MISMATCH}")
    try:
        module = components[component].get_submodule(path)
    except AttributeError:
        raise LightboothError(f"LoRA layer {target!r} names a module the {component} does not have; {_MISMATCH}")
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise LightboothError(
            f"LoRA layer {target!r} targets a {type(module).__name__}; only Linear and Conv2d can take a LoRA"
        )
    return module


def _expected_shapes(module: nn.Module, rank: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Acceptable (down, up) shapes; a 1x1 conv also takes Linear-shaped factors (SD 1 vs SD 2 proj_in)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return [((rank, w.shape[1]), (w.shape[0], rank))]
    shapes = [((rank, *w.shape[1:]), (w.shape[0], rank, 1, 1))]
    if tuple(w.shape[2:]) == (1, 1):
        shapes.append(((rank, w.shape[1]), (w.shape[0], rank)))
    return shapes


def check_against(weights: LoraWeights, components: dict[str, nn.Module]) -> None:
    """Raise `LightboothError` unless every layer targets an existing Linear/Conv2d with matching shapes."""
    for target, layer in weights.items():
        module = _target_module(components, target)
        got = (tuple(layer.down.shape), tuple(layer.up.shape))
        expected = _expected_shapes(module, layer.rank)
        if got not in expected:
            raise LightboothError(
                f"LoRA layer {target!r} has shapes down {got[0]} / up {got[1]} but the model's "
                f"{type(module).__name__} weight is {tuple(module.weight.shape)}; {_MISMATCH}"
            )


@torch.no_grad()
def _apply(components: dict[str, nn.Module], weights: LoraWeights, scale: float) -> None:
    check_against(weights, components)  # validate everything before touching any weight
    for target, layer in weights.items():
        w = _target_module(components, target).weight
        delta = layer.delta().to(w.device).reshape(w.shape)
        w.copy_((w.float() + scale * delta).to(w.dtype))


def fuse(components: dict[str, nn.Module], weights: LoraWeights, scale: float = 1.0) -> None:
    """Add scale * (alpha / r) * up @ down into each target weight in place (computed in fp32).

    Fusing costs nothing at inference time, which matters for few-step models where a LoRA forward pass would be a
    noticeable share of the step. Nothing is modified if any layer fails `check_against`.
    """
    _apply(components, weights, scale)


def unfuse(components: dict[str, nn.Module], weights: LoraWeights, scale: float = 1.0) -> None:
    """Subtract what `fuse` added. Exact up to rounding; in bf16/fp16 weights the rounding of fuse is not undone."""
    _apply(components, weights, -scale)


# ----------------------------------------------------------------------------------------------------------------
# From a PEFT-wrapped model (trainers)
# ----------------------------------------------------------------------------------------------------------------


def from_peft_model(component_name: str, model: nn.Module, adapter_name: str = "default") -> LoraWeights:
    """Read the LoRA factors of `adapter_name` out of a model that peft injected adapters into.

    Alpha is recovered as scaling * r, so rsLoRA and per-module alpha patterns come out right without looking at
    the config. Works for `inject_adapter_in_model`/`add_adapter` models and for `get_peft_model` wrappers.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    if component_name not in COMPONENTS:
        raise ValueError(f"component_name must be one of {COMPONENTS}, got {component_name!r}")
    out: LoraWeights = {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False):
            raise LightboothError(f"adapter {adapter_name!r} on {name} uses DoRA, which lightbooth cannot export")
        if getattr(module.lora_B[adapter_name], "bias", None) is not None:
            raise LightboothError(f"adapter {adapter_name!r} on {name} has a LoRA bias, which lightbooth cannot export")
        rank = module.r[adapter_name]
        path = name.removeprefix("base_model.model.")
        out[f"{component_name}.{path}"] = LoraLayer(
            down=module.lora_A[adapter_name].weight.detach().clone(),
            up=module.lora_B[adapter_name].weight.detach().clone(),
            alpha=float(module.scaling[adapter_name]) * rank,
        )
    if not out:
        raise ValueError(f"no peft LoRA adapter named {adapter_name!r} found in the {component_name}")
    return out


@torch.no_grad()
def into_peft_model(component_name: str, model: nn.Module, weights: LoraWeights, adapter_name: str = "default") -> None:
    """Set peft adapter `adapter_name` to `weights` (the inverse of `from_peft_model`): a warm start from a LoRA file.

    Every layer of `weights` must land on a module the adapter covers, with its rank; the adapter's own alpha is kept
    and the up factor rescaled so that each update (alpha / r) * up @ down is exactly the file's. Adapter modules the
    file does not name keep their initial (zero) update.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    slots = {f"{component_name}.{name.removeprefix('base_model.model.')}": m for name, m in model.named_modules()
             if isinstance(m, PeftLoraLayer) and adapter_name in m.lora_A}
    for target, layer in weights.items():
        module = slots.get(target)
        if module is None:
            raise LightboothError(f"LoRA layer {target!r} is not among the modules being trained; start from a LoRA "
                                  "trained on the same targets (one this command wrote) or drop the starting LoRA")
        rank = module.r[adapter_name]
        if layer.rank != rank:
            raise LightboothError(f"LoRA layer {target!r} has rank {layer.rank} but the run trains rank {rank}; "
                                  f"pass --rank {layer.rank}")
        down, up = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        factor = (layer.alpha / layer.rank) / float(module.scaling[adapter_name])
        down.copy_(layer.down.reshape(down.shape).to(down))
        up.copy_((layer.up.float() * factor).reshape(up.shape).to(up))


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _peft_state_dict(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers keys plus a `lora_adapter_metadata` LoraConfig per component.

    diffusers 0.42 reads alphas for lora_A/lora_B files only from this metadata (an `.alpha` tensor would be
    rejected by the SD loader for not containing "lora"); with it, `load_lora_weights` builds a LoraConfig whose
    per-module rank/alpha patterns ("^<module>", anchored the way diffusers writes them) reproduce every layer's
    alpha / r exactly, with the factors stored untouched.
    """
    tensors: dict[str, torch.Tensor] = {}
    by_comp: dict[str, dict[str, LoraLayer]] = defaultdict(dict)
    for target, layer in weights.items():
        tensors[f"{target}.lora_A.weight"] = layer.down
        tensors[f"{target}.lora_B.weight"] = layer.up
        component, _, module = target.partition(".")
        by_comp[component][module] = layer
    config: dict[str, object] = {}
    for component, layers in by_comp.items():
        r = Counter(l.rank for l in layers.values()).most_common(1)[0][0]
        alpha = Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
        config.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": alpha,
            f"{component}.rank_pattern": {f"^{m}": l.rank for m, l in layers.items() if l.rank != r},
            f"{component}.alpha_pattern": {f"^{m}": l.alpha for m, l in layers.items() if l.alpha != alpha},
            f"{component}.target_modules": sorted(layers),
            f"{component}.use_dora": False,
            f"{component}.use_rslora": False,
            f"{component}.lora_bias": False,
        })
    return tensors, {LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)}


def _kohya_name(target: str) -> str:
    """Key stem in the kohya/ComfyUI spelling.

    SD: kohya's flattened `lora_unet_*` / `lora_te_text_model_*` names, which kohya-ss, A1111, ComfyUI and diffusers
    all read (CLIP modules get the `text_model.` level back that transformers 5 dropped, as those tools expect).
    qwen-image: dotted `diffusion_model.<module>` like the released Qwen-Image-Lightning LoRAs and ComfyUI's native
    format. Flattened musubi names are avoided for qwen because turning '_' back into '.' is guesswork for readers
    without the model at hand (diffusers uses a hand-written n-gram table), while the dotted form is unambiguous.
    """
    component, _, module = target.partition(".")
    if component == "transformer":
        return f"diffusion_model.{module}"
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    if not module.startswith("text_model."):
        module = f"text_model.{module}"
    prefix = "lora_te_" if component == "text_encoder" else "lora_te2_"
    return prefix + module.replace(".", "_")


def _kohya_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for target, layer in weights.items():
        stem = _kohya_name(target)
        tensors[f"{stem}.lora_down.weight"] = layer.down
        tensors[f"{stem}.lora_up.weight"] = layer.up
        tensors[f"{stem}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return tensors


def save_lora(
    path: str | os.PathLike,
    weights: LoraWeights,
    format: str = "peft",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `weights` atomically as a safetensors LoRA in "peft" (diffusers) or "kohya" (kohya/ComfyUI) keys.

    Both load with stock diffusers `load_lora_weights` to the same fused weights as lightbooth's `fuse`.
    """
    if not weights:
        raise ValueError("no LoRA layers to save")
    for target in weights:
        if target.partition(".")[0] not in COMPONENTS:
            raise ValueError(f"LoRA layer {target!r} does not start with a component name {COMPONENTS}")
    meta = {"format": "pt", **(metadata or {})}
    if format == "peft":
        tensors, extra = _peft_state_dict(weights)
        meta.update(extra)
    elif format == "kohya":
        tensors = _kohya_state_dict(weights)
    else:
        raise ValueError(f"format must be 'peft' or 'kohya', got {format!r}")
    save_safetensors_atomic(tensors, path, meta)


def modules_of(components: dict[str, nn.Module]) -> dict[str, set[str]]:
    """The `modules` argument of `to_canonical` for loaded components."""
    return {name: {n for n, _ in m.named_modules() if n} for name, m in components.items()}


def load_lora(path: str | os.PathLike, family: str, components: dict[str, nn.Module]) -> LoraWeights:
    """Load a LoRA file in any supported format and check it against the loaded `components`."""
    state_dict, metadata = load_safetensors(path)
    try:
        weights = to_canonical(state_dict, family, modules_of(components), metadata)
        check_against(weights, components)
    except LightboothError as e:
        raise LightboothError(f"{path}: {e}") from None
    return weights
