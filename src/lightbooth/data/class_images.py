"""Class images for prior preservation: generated once by the base model, cached, reused and topped up.

A class folder holds PNGs plus `manifest.json`, which records how they were made (model, prompt, sampling settings)
and the seed of each generated file. A later run with the same settings reuses every image and generates only the
missing ones, continuing the seed sequence; images a user put in the folder themselves count too. A folder made
with other settings is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import LightboothError
from .instance import IMAGE_SUFFIXES

MANIFEST = "manifest.json"


def class_settings(model: str, prompt: str, preset: str, steps: int, guidance: float, width: int,
                   height: int) -> dict:
    """What makes two sets of class images interchangeable."""
    return dict(model=model, prompt=prompt, preset=preset, steps=steps, guidance=guidance, width=width,
                height=height)


def default_class_dir(run: Path, settings: dict) -> Path:
    """RUN/../class-images-<hash of the settings>: shared by every run of the same model and class prompt."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return run.parent / f"class-images-{digest}"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise LightboothError(f"{path} is not valid JSON; delete it (the images stay usable) or pick another "
                              "--class-dir") from None


def class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def ensure_class_images(folder: Path, settings: dict, count: int, seed: int, generator_factory,
                        batch_size: int = 16) -> list[Path]:
    """At least `count` class images in `folder`; generates only the missing ones with `generator_factory()`
    (called only when something is missing) and returns the first `count` paths."""
    from ..images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest and manifest.get("settings") != settings:
        diff = next(k for k in settings if manifest.get("settings", {}).get(k) != settings[k])
        raise LightboothError(f"class folder {folder} was made with another {diff} "
                              f"({manifest.get('settings', {}).get(diff)!r}, now {settings[diff]!r}); pass another "
                              "--class-dir or delete it")
    have = class_images(folder)
    missing = count - len(have)
    if missing <= 0:
        return have[:count]
    files = dict(manifest.get("files", {}))
    next_seed = max(files.values(), default=seed - 1) + 1
    print(f"generating {missing} class images of {settings['prompt']!r} in {folder}", file=sys.stderr)
    gen = generator_factory()
    for start in range(0, missing, batch_size):
        seeds = list(range(next_seed + start, next_seed + min(missing, start + batch_size)))
        images = gen(settings["prompt"], seed=seeds, num_images=len(seeds), preset=settings["preset"],
                     steps=settings["steps"], guidance=settings["guidance"], width=settings["width"],
                     height=settings["height"])
        for s, im in zip(seeds, images):
            files[save_png(im, folder, f"class-{s:06d}").name] = s
        # the manifest is rewritten after every batch, so an interrupted top-up keeps what it made
        write_text_atomic(folder / MANIFEST, json.dumps({"settings": settings, "files": files}, indent=1))
    return class_images(folder)[:count]
