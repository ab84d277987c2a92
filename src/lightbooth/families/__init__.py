"""Model families: one adapter class per architecture, chosen from a literal registry.

Adding a family is one module plus one line here. Shared code never asks which family it holds.
"""

from __future__ import annotations

import importlib

from ..errors import LightboothError

# family name -> "module:Class"; imported on demand so `import lightbooth` stays cheap.
REGISTRY: dict[str, str] = {
    "qwen-image": "lightbooth.families.qwen_image:QwenImageFamily",
    "sd": "lightbooth.families.sd:SDFamily",
}


def family_class(name: str):
    """The adapter class registered under `name`."""
    if name not in REGISTRY:
        raise LightboothError(f"unknown model family {name!r}; known families: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_for_pipeline(class_name: str) -> str:
    """The family whose adapter accepts a diffusers folder whose model_index.json names `class_name`."""
    for name in REGISTRY:
        if class_name in family_class(name).pipeline_classes:
            return name
    raise LightboothError(
        f"unsupported pipeline {class_name!r} in model_index.json; lightbooth runs "
        + ", ".join(f"{n} ({'/'.join(family_class(n).pipeline_classes)})" for n in REGISTRY)
    )
