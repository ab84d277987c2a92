"""Images of things the shapes world never shows, for training a VAE that can encode what users bring.

A real image VAE is trained on a broad image set and reconstructs objects no caption names; the built-in model's
VAE, trained on shapes-world scenes alone, cannot: its latent space has no room for a colour or a texture outside
the world's eight flat fills, so a DreamBooth subject such as WORLD.md's checker star (yellow and teal squares)
comes back from a round trip as yellow fragments, and no amount of personalization can then draw it. These images
keep the world's layouts (shapes, sizes, cells) and replace what is painted: random colours anywhere in RGB, flat
or in two-colour patterns (checkerboards of 2-6 squares a side, stripes in four directions) at random sizes, on
the world's or a random background. Subject A itself is never drawn here: it is one point of a space the VAE
learns to cover, and it is held out to measure that (bench/vae_recon.py --subject).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from . import shapes

PATTERNS = ("flat", "checker", "stripes")


def _random_rgb(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _pattern(rng: np.random.Generator, kind: str, s: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which of two colours (0 or 1) each sample point of an object of side s takes."""
    u, v = np.broadcast_arrays(u, v)
    if kind == "flat":
        return np.zeros(u.shape, dtype=int)
    if kind == "checker":
        cell = s / rng.integers(2, 7)
        return (np.floor((u + s / 2) / cell).astype(int) + np.floor((v + s / 2) / cell).astype(int)) % 2
    width = s / rng.integers(2, 7)
    axis = (u, v, u + v, u - v)[rng.integers(0, 4)]
    return np.floor((axis + 2 * s) / width).astype(int) % 2


def render_novel(rng: np.random.Generator, ss: int = 4) -> Image.Image:
    """A 64 x 64 image: a world scene's layout with novel fills, sizes and (half the time) background."""
    scene = shapes.sample_scene(rng)
    canvas = np.empty((shapes.CANVAS, shapes.CANVAS, 3), dtype=np.float64)
    canvas[:] = shapes.BACKGROUNDS[scene.background] if rng.random() < 0.5 else _random_rgb(rng)
    for obj in scene.objects:
        s = float(rng.uniform(10, 30))
        box = shapes.object_box(s, obj.cx, obj.cy)
        u, v = shapes._samples(box, ss, obj.cx, obj.cy)
        inside = shapes.inside(obj.shape, s, u, v)
        which = _pattern(rng, PATTERNS[rng.integers(0, len(PATTERNS))], s, u, v)
        shapes.composite(canvas, box, [(_random_rgb(rng), shapes._reduce(inside & (which == k), ss)) for k in (0, 1)])
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
