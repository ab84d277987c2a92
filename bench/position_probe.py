"""Has a flow model learnt where the prompt puts an object? A cheap probe that needs no good samples.

    python bench/position_probe.py --model RUN/model --seeds 8

For each of the 9 cells and a few objects, the prompt states colour, shape, size, cell and background (white). The
model predicts x0 in one step from pure noise (flow level 1, CFG at the model's default scale); the prediction is
averaged over `--seeds` noises and decoded, and the centroid of what differs from the background is compared with
the cell's centre. Printed: the slopes of the predicted centroid against the asked one in x and in y (1: the model
puts the mass where asked; 0: it ignores the position words) and how many centroids land within 8 px of the cell.
Full sampling can only place objects that this first prediction already leans towards, so the slopes show whether
position is being learnt long before the strict detector accepts anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lightbooth.data import shapes  # noqa: E402

OBJECTS = (("circle", "red"), ("square", "blue"), ("triangle", "green"))


def slope(asked: np.ndarray, got: np.ndarray) -> float:
    a = asked - asked.mean()
    return float((a * (got - got.mean())).sum() / (a * a).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--seeds", type=int, default=8, help="noises averaged per prompt")
    ap.add_argument("--lang", choices=["en", "zh"], default="en")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightbooth.generate import Generator

    gen = Generator.load(args.model, device="cpu", dtype=torch.float32, preset="base")
    fam, guidance = gen.family, gen.settings().preset.guidance
    background = np.array(shapes.BACKGROUNDS["white"], dtype=np.float32)
    yy, xx = np.mgrid[0:shapes.CANVAS, 0:shapes.CANVAS]
    asked, got = [], []
    for shape, color in OBJECTS:
        for cell in shapes.CELL_NAMES:
            x, y = shapes.CELLS[cell]
            scene = shapes.Scene("single", "white", (shapes.Obj(shape, color, "large", cell, x, y),))
            with torch.inference_mode():
                cond = fam.encode([shapes.full_caption(scene, args.lang)] * args.seeds)
                uncond = fam.encode([""] * args.seeds)
                noise = torch.cat([fam.noise(s, shapes.CANVAS, shapes.CANVAS) for s in range(args.seeds)])
                v = fam.velocity(noise, cond, torch.tensor(1.0), shapes.CANVAS, shapes.CANVAS, uncond, guidance)
                pixels = fam.decode(noise - v, shapes.CANVAS, shapes.CANVAS).float().mean(0)
            img = (pixels.permute(1, 2, 0).numpy() + 1) * 127.5
            dist = np.abs(img - background).sum(-1)
            w = np.clip(dist - np.median(dist), 0, None)
            w = w if w.sum() > 0 else np.ones_like(w)
            asked.append((x, y))
            got.append(((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()))
    asked, got = np.array(asked, dtype=np.float64), np.array(got)
    hits = int((np.abs(asked - got).max(1) < 8).sum())
    print(f"model {args.model or 'built-in'} ({args.lang}, {args.seeds} seeds, CFG {guidance}): "
          f"x slope {slope(asked[:, 0], got[:, 0]):.2f}, y slope {slope(asked[:, 1], got[:, 1]):.2f}, "
          f"{hits}/{len(asked)} centroids within 8 px of the cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
