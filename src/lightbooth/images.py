"""Images out: tensors to PIL, generation parameters in PNG text chunks, atomic writes that never overwrite."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .atomic import temp_file


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' image processor rounds."""
    arr = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def a1111_parameters(p: dict) -> str:
    """The `parameters` text A1111, ComfyUI importers and civitai read."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p["steps"]), ("Sampler", p["sampler"]), ("CFG scale", p["guidance"]), ("Seed", p["seed"]),
              ("Size", f"{p['width']}x{p['height']}"), ("Model", p["model"]), ("Preset", p.get("preset"))]
    if p.get("loras"):
        fields.append(("Lora", "; ".join(f"{lo['path']}:{lo['scale']}" for lo in p["loras"])))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def attach(image: Image.Image, params: dict) -> Image.Image:
    """Record the generation parameters on the image (written to PNG by `save_png`)."""
    image.info["parameters"] = a1111_parameters(params)
    image.info["lightbooth"] = json.dumps(params, ensure_ascii=False, sort_keys=True)
    return image


def read_params(path: str | os.PathLike) -> dict | None:
    """The lightbooth parameters stored in a PNG, or None if it has none or cannot be read."""
    try:
        with Image.open(path) as im:
            text = im.text.get("lightbooth") if hasattr(im, "text") else None
        return json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None


def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe version of a prompt (keeps CJK characters)."""
    s = re.sub(r"[^\w\-]+", "-", text.strip().lower(), flags=re.UNICODE).strip("-_")
    return s[:limit].rstrip("-_") or "image"


def save_png(image: Image.Image, out_dir: Path, stem: str) -> Path:
    """Write `image` as out_dir/stem.png, or stem-1.png, ... if taken: atomic, never overwrites anything."""
    info = PngImagePlugin.PngInfo()
    for key in ("parameters", "lightbooth"):
        if key in image.info:
            info.add_itxt(key, image.info[key])
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(out_dir, suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        for n in range(10_000):
            final = out_dir / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            try:
                os.link(tmp, final)  # fails if `final` exists, unlike rename
                return final
            except FileExistsError:
                continue
        raise FileExistsError(f"no free file name for {stem} in {out_dir}")
    finally:
        os.unlink(tmp)
