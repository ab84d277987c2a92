"""How far apart does a VAE's latent space put two scenes that differ only in one word of the caption, and so up
to which flow noise level can the drawing still tell them apart?

    python bench/latent_separation.py --vae shipped=src/lightbooth/builtin/model/vae --vae x6=RUN/decoder/final

For each pair of attributes below, `--n` scenes are drawn (one large object, random colour, cell, jitter and
background) and rendered twice, once per value (a star and a diamond at the same place and colour, and so on).
Both are encoded (posterior means) and normalized as the pipeline normalizes them (the VAE's latents_mean and
latents_std), and d is the Euclidean distance between the two latents. A flow state at level s is
(1 - s) x0 + s noise with unit Gaussian noise, so the best possible test between the two drawings from the state
alone separates them with d' = (1 - s) d / s; the table gives the median d and the level s2 = d / (d + 2) where
d' = 2 (16% errors): above s2 the drawing no longer says which of the two it is, and only the caption can.
The row "pixels" is the same calculation on the images themselves (each RGB channel normalized to unit variance
over the scenes), the separation a pixel-space model would see. Model-free: no transformer is involved.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lightbooth.data import shapes  # noqa: E402
from lightbooth.training import base as B  # noqa: E402

PAIRS = (("shape", "star", "diamond"), ("shape", "cross", "circle"), ("shape", "cross", "square"),
         ("shape", "circle", "square"), ("shape", "triangle", "diamond"), ("color", "red", "orange"))


def scene_pairs(pair, n: int, seed: int):
    """`n` (scene with value a, the same scene with value b), large single objects."""
    attr, a, b = pair
    rng = np.random.default_rng([seed, PAIRS.index(pair)])
    out = []
    for _ in range(n):
        sc = shapes.sample_scene(rng, "single")
        obj = replace(sc.objects[0], size="large")
        out.append(tuple(replace(sc, objects=(replace(obj, **{attr: v}),)) for v in (a, b)))
    return out


def pixels(scenes) -> torch.Tensor:
    return B.to_tensor([shapes.render(sc) for sc in scenes])


@torch.no_grad()
def latents(vae, scenes) -> torch.Tensor:
    return B.normalize_latents(vae, vae.encode(pixels(scenes)[:, :, None]).latent_dist.mean[:, :, 0])


def separation(encode, pair, n: int, seed: int) -> tuple[float, float]:
    """Median distance d between the two renderings' normalized latents, and the level s2 = d / (d + 2)."""
    a, b = zip(*scene_pairs(pair, n, seed))
    d = float((encode(list(a)) - encode(list(b))).flatten(1).norm(dim=1).median())
    return d, d / (d + 2)


def pixel_encoder(seed: int):
    """Images normalized per RGB channel over 256 random scenes: what a pixel-space flow model's x0 would be."""
    rng = np.random.default_rng([seed, 1000])
    ref = pixels([shapes.sample_scene(rng) for _ in range(256)])
    mean, std = ref.mean(dim=(0, 2, 3), keepdim=True), ref.std(dim=(0, 2, 3), keepdim=True)
    return lambda scenes: (pixels(scenes) - mean) / std


def main(argv=None) -> int:
    from lightbooth.training.base_run import load_vae

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", action="append", required=True, metavar="NAME=DIR",
                    help="a VAE folder (a model's vae/, or a run's decoder/final); repeat to compare")
    ap.add_argument("--n", type=int, default=64, help="scene pairs per row")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = {"pixels": (pixel_encoder(args.seed), 64 * 64 * 3)}
    for spec in args.vae:
        name, _, folder = spec.rpartition("=")
        vae = load_vae(Path(folder))
        z, down = vae.config.z_dim, 2 ** (len(vae.config.dim_mult) - 1)
        encoders[name or folder] = (lambda scenes, vae=vae: latents(vae, scenes), z * (64 // down) ** 2)
    print(f"median latent distance d and the level s2 = d / (d + 2) above which the drawing stops telling the two "
          f"apart; {args.n} large-object scene pairs per column")
    print("| latent space (elements) | " + " | ".join(f"{a} vs {b}" for _, a, b in PAIRS) + " |")
    print("|---" * (len(PAIRS) + 1) + "|")
    for name, (encode, size) in encoders.items():
        cells = [separation(encode, pair, args.n, args.seed) for pair in PAIRS]
        print(f"| {name} ({size}) | " + " | ".join(f"d {d:.1f}, s2 {s2:.2f}" for d, s2 in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
