"""A lenient reading of prompt adherence, for models whose objects are blobs the strict detector rejects.

    python bench/loose_adherence.py [--model DIR] [--lora PATH] [--preset P] [--n 32] [--guidance 2,4] [--template K]
                                    [--steps N] [--shift S] [--confusion]

On the single-object prompts of `lightbooth eval` (same scenes, captions and seeds), per language: the share of
images whose background is the asked one, whose main foreground colour (most pixels nearest to it among the
palette) is the asked colour, whose foreground centroid lies in the asked cell, and whose asked-colour mass is best
fitted by the asked shape's template and by the asked size (the detector's soft IoU with no acceptance threshold;
chance 1 in 6 and 1 in 2). Strict accuracy (`lightbooth eval`) stays the measure the targets use; this one only
separates "follows the prompt with bad shapes" from "does not follow it".
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreambooth_subject import main_colour  # noqa: E402


def centroid_cell(image) -> str | None:
    """The 3x3 cell (WORLD.md names) holding the centroid of the pixels that differ from the corner colour."""
    from lightbooth.data import shapes
    from lightbooth.eval.detector import FG_THRESHOLD

    arr = np.asarray(image, dtype=np.float32)
    bg = np.median(arr[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
    ys, xs = np.nonzero(np.linalg.norm(arr - bg, axis=2) > FG_THRESHOLD)
    if len(xs) < 15:
        return None
    col, row = min(int(xs.mean() // (shapes.CANVAS / 3)), 2), min(int(ys.mean() // (shapes.CANVAS / 3)), 2)
    return shapes.CELL_NAMES[row * 3 + col]


def best_fit(image, color: str) -> tuple[str, str] | tuple[None, None]:
    """The world (shape, size) whose template best fits the asked colour's mass in the image, however poor the fit:
    the detector's own soft IoU without its acceptance thresholds (chance is 1 in 6 for the shape, 1 in 2 for the
    size)."""
    from lightbooth.data import shapes
    from lightbooth.eval import detector as D

    arr = D._as_array(image)
    bg = np.median(arr[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
    alpha = D._alpha(arr, bg, [shapes.COLORS[color]])
    alpha = np.where(alpha > 0.15, alpha, 0.0)  # drop the faint haze a dark colour leaves on the background
    if alpha.sum() < 15:
        return None, None
    mx, my = D._centroid(alpha)
    fits = [(D._soft_iou(alpha, sh, sz, mx, my)[0], sh, sz) for sh in shapes.SHAPES for sz in shapes.SIZES]
    return max(fits)[1:]


def scores(gen, n: int, preset: str | None, template: int | None = None, shift: float | None = None,
           **overrides) -> tuple[dict[str, dict[str, float]], Counter]:
    """Per language, the share of images right on each reading (and strictly); plus (asked shape, best-fitting
    shape) counts over both languages. `template` fixes the caption template (default: the eval's rotation);
    `shift` replaces the preset's flow shift."""
    from dataclasses import replace

    from lightbooth.data import shapes
    from lightbooth.eval.detector import check, detect
    from lightbooth.eval.quality import prompt_set
    from lightbooth.generate import Job

    scenes = prompt_set("single", n)
    s = gen.settings(preset=preset, **overrides)
    if shift is not None:
        s = replace(s, preset=replace(s.preset, shift=shift))
    out, confusion = {}, Counter()
    for lang in ("en", "zh"):
        jobs = [Job(shapes.full_caption(sc, lang, template=i % shapes.N_TEMPLATES if template is None else template), i)
                for i, sc in enumerate(scenes)]
        images = [im for i in range(0, n, 32) for im in gen.run(jobs[i:i + 32], s)]
        fits = [best_fit(im, sc.objects[0].color) for im, sc in zip(images, scenes)]
        dets = [detect(im) for im in images]
        confusion.update((sc.objects[0].shape, f[0]) for f, sc in zip(fits, scenes))
        out[lang] = {
            "background": float(np.mean([d.background == sc.background for d, sc in zip(dets, scenes)])),
            "colour": float(np.mean([main_colour(im) == sc.objects[0].color for im, sc in zip(images, scenes)])),
            "cell": float(np.mean([centroid_cell(im) == sc.objects[0].cell for im, sc in zip(images, scenes)])),
            "shape": float(np.mean([f[0] == sc.objects[0].shape for f, sc in zip(fits, scenes)])),
            "size": float(np.mean([f[1] == sc.objects[0].size for f, sc in zip(fits, scenes)])),
            "strict": float(np.mean([check(sc, d) for d, sc in zip(dets, scenes)])),
        }
    return out, confusion


def confusion_lines(confusion: Counter) -> list[str]:
    """Rows: the asked shape; columns: the best-fitting one (None: too little of the asked colour)."""
    from lightbooth.data import shapes

    cols = list(shapes.SHAPES) + [None]
    lines = ["asked \\ best fit " + " ".join(f"{str(c):>8}" for c in cols) + "   right"]
    for a in shapes.SHAPES:
        row = [confusion[(a, c)] for c in cols]
        lines.append(f"{a:>17} " + " ".join(f"{k:>8}" for k in row) + f"   {row[cols.index(a)] / max(1, sum(row)):.0%}")
    return lines


def main() -> int:
    from lightbooth import Generator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--lora", action="append", default=[])
    ap.add_argument("--preset", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance", default="", help="comma-separated CFG scales to compare (default: the preset's)")
    ap.add_argument("--template", type=int, default=None, help="caption template for every prompt (default: rotate)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    ap.add_argument("--shift", type=float, default=None, help="a fixed flow shift (default: the preset's schedule)")
    ap.add_argument("--confusion", action="store_true", help="also print asked shape against best-fitting shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = Generator.load(args.model, loras=args.lora, device="cpu", preset=args.preset)
    preset = gen.settings(preset=args.preset).preset_name
    base_label = f"{args.model or 'built-in'} {' '.join(args.lora)} preset {preset}"
    base_label += "".join(f" {k} {v:g}" for k, v in (("steps", args.steps), ("shift", args.shift)) if v is not None)
    for g in [float(x) for x in args.guidance.split(",") if x] or [None]:
        res, confusion = scores(gen, args.n, args.preset, args.template, args.shift, steps=args.steps,
                                **({} if g is None else {"guidance": g}))
        label = base_label + ("" if g is None else f" CFG {g:g}")
        for lang, r in res.items():
            print(f"{label} | {lang} | background {r['background']:.0%} | main colour {r['colour']:.0%} | "
                  f"cell {r['cell']:.0%} | best-fitting shape {r['shape']:.0%} | size {r['size']:.0%} | "
                  f"strict {r['strict']:.0%}")
        if args.confusion:
            print("\n".join(confusion_lines(confusion)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
