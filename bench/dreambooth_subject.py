"""DreamBooth on the built-in model with Subject A (the checker star), with and without prior preservation.

Issue 4's measurement: train twice on the same instance images, then generate `--n` images of "<token> star" prompts
in varied cells and backgrounds and `--n` of plain "a star", and score them with the shapes-world detector:
- fidelity: share of "<token> star" images showing the subject alone in the asked cell and background (strict),
  and share showing the subject at all (loose);
- leakage: share of plain "a star" images showing the subject's checker pattern;
- diversity: distinct colours among the objects of clean plain "a star" images (of 8);
- the same two for "a star" in the subject prompts' cells and backgrounds ("in context"): a model that leaves most
  bare "a star" images empty (the built-in candidates do) has nothing to leak into there; read strictly (detector)
  and leniently (yellow+teal foreground; main colours of every non-empty image), since the detector reads few of
  the built-in models' drawn stars as clean.
The base model without a LoRA is scored too, as the reference for leakage and diversity.

    python bench/dreambooth_subject.py --out runs/bench-dreambooth [--steps 400] [--lr 1e-4] [--rank 4] [--full]
        [--images 5] [--n 64] [--model DIR] [--threads 0] [--batch-size 1] [--noise-shift 1] [--runs prior,no-prior]

`--model` scores another qwen-image model folder (a candidate built-in model, before it is shipped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def instance_images(folder: Path, count: int, seed: int) -> None:
    """Subject A in random cells and backgrounds, each with a caption stating both."""
    from lightbooth.data import shapes

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 4])
    for i in range(count):
        scene = shapes.subject_scene(rng)
        shapes.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(context_prompt("{token}", scene.objects[0].cell, scene.background))


def context_prompt(token: str, cell: str, background: str) -> str:
    from lightbooth.data.shapes import _CELL_EN

    subject = f"a {token} star" if token else "a star"  # no token: the plain class prompt in the same context
    return f"{subject} {_CELL_EN[cell]}, {background} background"


def blob_colours(image, min_pixels: int = 15) -> dict[str, float]:
    """Lenient reading for a model that draws blobs, not shapes: the share of each palette colour (teal included)
    among the foreground pixels (farther than the detector's threshold from the corner colour)."""
    from lightbooth.data.shapes import COLORS, TEAL
    from lightbooth.eval.detector import FG_THRESHOLD

    arr = np.asarray(image, dtype=np.float32).reshape(-1, 3)
    bg = np.median(np.asarray(image, dtype=np.float32)[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
    fg = arr[np.linalg.norm(arr - bg, axis=1) > FG_THRESHOLD]
    if len(fg) < min_pixels:
        return {}
    names = [*COLORS, "teal"]
    palette = np.array([*COLORS.values(), TEAL], dtype=np.float32)
    nearest = np.linalg.norm(fg[:, None] - palette[None], axis=2).argmin(1)
    return {names[k]: float(np.mean(nearest == k)) for k in np.unique(nearest)}


def checker_colours(image) -> bool:
    share = blob_colours(image)
    return share.get("yellow", 0) >= 0.2 and share.get("teal", 0) >= 0.2


def main_colour(image) -> str | None:
    share = blob_colours(image)
    return max(share, key=share.get) if share else None


def score(gen, token: str, n: int, batch: int = 32) -> dict:
    from lightbooth.data import shapes
    from lightbooth.eval.detector import detect, is_checker_star
    from lightbooth.generate import Job

    s = gen.settings()
    rng = np.random.default_rng(2024)
    asks = [(shapes.CELL_NAMES[rng.integers(9)], list(shapes.BACKGROUNDS)[rng.integers(3)]) for _ in range(n)]

    def images(prompts):
        jobs = [Job(p, seed) for seed, p in enumerate(prompts)]
        return [im for i in range(0, n, batch) for im in gen.run(jobs[i:i + batch], s)]

    subject = images([context_prompt(token, c, b) for c, b in asks])
    plain_images = images(["a star"] * n)
    plain = [detect(im) for im in plain_images]
    context_images = images([context_prompt("", c, b) for c, b in asks])
    context = [detect(im) for im in context_images]
    return {
        "fidelity": float(np.mean([is_checker_star(im, c, b) for im, (c, b) in zip(subject, asks)])),
        "loose": float(np.mean([bool(detect(im).checker_stars) for im in subject])),
        "checker_colours": float(np.mean([checker_colours(im) for im in subject])),
        "bg_ok": float(np.mean([detect(im).background == b for im, (_, b) in zip(subject, asks)])),
        "leakage": float(np.mean([bool(d.checker_stars) for d in plain])),
        "leak_colours": float(np.mean([checker_colours(im) for im in plain_images])),
        "colours": len({o.color for d in plain if d.clean for o in d.objects} - {"teal"}),
        "blob_colours": len({main_colour(im) for im in plain_images} - {None, "teal"}),
        "context_leakage": float(np.mean([bool(d.checker_stars) for d in context])),
        "context_colours": len({o.color for d in context if d.clean for o in d.objects} - {"teal"}),
        "context_leak_colours": float(np.mean([checker_colours(im) for im in context_images])),
        "context_blob_colours": len({main_colour(im) for im in context_images} - {None, "teal"}),
    }


def main() -> None:
    import torch

    from lightbooth import Generator
    from lightbooth.training.dreambooth import DreamBoothConfig, train_dreambooth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-dreambooth"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="Full fine-tune instead of LoRA.")
    ap.add_argument("--batch-size", type=int, default=1, help="instance images per step (as many class images)")
    ap.add_argument("--noise-shift", type=float, default=1.0, help="shift on training noise levels (< 1: low noise)")
    ap.add_argument("--runs", default="prior,no-prior", help="which trainings: prior, no-prior or both")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--preset", default="base", help="sampling preset the images are made with (base: the teacher; "
                    "the built-in model's default 4-step preset stacks the DreamBooth LoRA on its distilled one)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for training and scoring; 0: all cores")
    args = ap.parse_args()
    runs = args.runs.split(",")
    if not runs or set(runs) - {"prior", "no-prior"}:
        ap.error(f"--runs takes prior, no-prior or both, comma-separated (got {args.runs!r})")
    if args.threads:
        torch.set_num_threads(args.threads)
    instance_images(args.out / "instance", args.images, args.seed)
    rows = {"base model": score(Generator.load(args.model, device="cpu", preset=args.preset), "qzx", args.n)}
    for prior in [r == "prior" for r in runs]:
        name = "with prior" if prior else "without prior"
        cfg = DreamBoothConfig(instance_dir=str(args.out / "instance"), class_noun="star", model=args.model,
                               out=str(args.out / ("prior" if prior else "no-prior")), steps=args.steps, lr=args.lr,
                               rank=args.rank, full=args.full, prior=prior, validation_prompt=[], logger="none",
                               batch_size=args.batch_size, noise_shift=args.noise_shift,
                               seed=args.seed, threads=args.threads)
        t0 = time.time()
        result = train_dreambooth(cfg, overwrite=True)
        seconds = time.time() - t0
        gen = Generator.load(result, device="cpu", preset=args.preset) if args.full else \
            Generator.load(args.model, device="cpu", loras=[str(result)], preset=args.preset)
        rows[name] = {**score(gen, cfg.token, args.n), "train_s": seconds}
    what = "full fine-tune" if args.full else f"LoRA rank {args.rank}"
    print(f"\nSubject A, {args.images} instance images, {args.steps} steps of batch {args.batch_size}, lr {args.lr}, "
          f"noise shift {args.noise_shift}, {what}, "
          f"{args.n} images per prompt set, preset {args.preset}")
    print("detector (strict shapes) | lenient colour reading of blobs")
    print("| model | fidelity | subject at all | leakage into 'a star' | colours of 'a star' | yellow+teal in "
          "'<token> star' | asked background | yellow+teal in 'a star' | main colours of 'a star' | leakage / colours "
          "of 'a star' in context | yellow+teal / main colours of 'a star' in context | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        train = f"{r['train_s']:.0f}" if "train_s" in r else "-"
        print(f"| {name} | {r['fidelity']:.1%} | {r['loose']:.1%} | {r['leakage']:.1%} | {r['colours']}/8 | "
              f"{r['checker_colours']:.1%} | {r['bg_ok']:.1%} | {r['leak_colours']:.1%} | {r['blob_colours']}/8 | "
              f"{r['context_leakage']:.1%} / {r['context_colours']}/8 | "
              f"{r['context_leak_colours']:.1%} / {r['context_blob_colours']}/8 | {train} |")


if __name__ == "__main__":
    main()
