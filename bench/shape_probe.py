"""Does a flow model take an object's shape from the caption? One-step predictions at each noise level.

    python bench/shape_probe.py [--model DIR] [--n 16] [--levels 0.3,0.5,0.7,0.9] [--threads 2]

Large single objects of every shape (random colour, cell and background) are rendered, encoded, noised to flow
level s and denoised in one step (x0 = x_s - s v, the network's own estimate, no CFG), decoded, and the
best-fitting shape template read as in `loose_adherence.py`. Twice per scene: with the scene's full caption, and
with the same caption naming another shape (the next one in the world's table). A model that has learnt shapes
keeps the drawn shape at low s and follows the caption's shape where the noise hides the drawing (high s); one
whose prediction stays a blob, whatever shape the caption names, has not bound the shape word to an outline.
Columns, over all shapes and over the concave ones (star, cross): right (true caption, best fit = drawn shape);
with the other shape's caption, the share whose best fit is the caption's shape, and the share keeping the drawn one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loose_adherence import best_fit  # noqa: E402

CONCAVE = ("star", "cross")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--n", type=int, default=16, help="scenes per shape")
    ap.add_argument("--levels", default="0.3,0.5,0.7,0.9", help="comma-separated flow noise levels")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightbooth.data import shapes
    from lightbooth.families.qwen_image import pack
    from lightbooth.generate import Generator
    from lightbooth.images import to_pil

    gen = Generator.load(args.model, device="cpu", dtype=torch.float32, preset="base")  # the plain model
    fam = gen.family
    rng = np.random.default_rng(args.seed)
    scenes, others = [], []
    for k, shape in enumerate(shapes.SHAPES):
        for _ in range(args.n):
            sc = shapes.sample_scene(rng, "single")
            sc = replace(sc, objects=(replace(sc.objects[0], shape=shape, size="large"),))
            scenes.append(sc)
            others.append(replace(sc, objects=(replace(sc.objects[0], shape=shapes.SHAPES[(k + 1) % 6]),)))
    drawn = np.array([sc.objects[0].shape for sc in scenes])
    named = np.array([sc.objects[0].shape for sc in others])
    concave = np.isin(drawn, CONCAVE)
    colours = [sc.objects[0].color for sc in scenes]
    pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(sc), dtype=np.float32) for sc in scenes]))
    print(f"model {args.model or 'built-in'}; {args.n} large objects per shape; one-step x0 without CFG")
    print("      | true caption: right | other shape's caption: follows it | keeps the drawn shape")
    print("s     |   all  concave      |               all  concave        |   all  concave")
    with torch.inference_mode():
        x0 = pack(fam.encode_images(pixels.permute(0, 3, 1, 2) / 127.5 - 1))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
        conds = [fam.encode([shapes.full_caption(sc, "en") for sc in group]) for group in (scenes, others)]
        for s in [float(v) for v in args.levels.split(",")]:
            x = (1 - s) * x0 + s * noise
            fits = []
            for cond in conds:
                v = torch.cat([fam.velocity(x[i:i + 32], _rows(cond, i, 32), torch.tensor(s), 64, 64)
                               for i in range(0, len(x), 32)])
                images = to_pil(fam.decode(x - s * v, 64, 64))
                fits.append(np.array([str(best_fit(im, c)[0]) for im, c in zip(images, colours)]))
            right, follows, keeps = fits[0] == drawn, fits[1] == named, fits[1] == drawn
            cols = [(v.mean(), v[concave].mean()) for v in (right, follows, keeps)]
            print(f"{s:<5} | {cols[0][0]:5.0%} {cols[0][1]:8.0%}      | {cols[1][0]:17.0%} {cols[1][1]:8.0%}        | "
                  f"{cols[2][0]:5.0%} {cols[2][1]:8.0%}", flush=True)
    return 0


def _rows(cond, i: int, n: int):
    """Rows i..i+n of encoded prompts."""
    return replace(cond, embeds=cond.embeds[i:i + n], mask=None if cond.mask is None else cond.mask[i:i + n])


if __name__ == "__main__":
    sys.exit(main())
