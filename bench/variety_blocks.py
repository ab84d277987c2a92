"""Variety where the prompt leaves attributes free, as an expectation over many draws of 64 seeds.

    python bench/variety_blocks.py --seeds 2048 --preset base --preset 4step --preset 4step:flow_stochastic:1 \
        [--lora NAME=PATH[@SAMPLER]] [--model DIR] [--first-seed 0] [--threads 2]

Issue 5 reads variety over 64 seeds: distinct colours and cells of under-specified prompts, against the teacher's.
One draw of 64 seeds says little about a colour that a model draws one time in 40: whether it shows up is a coin
toss (the teacher itself misses its rarest star colour in about a quarter of such draws). This bench draws
`--seeds` seeds (a multiple of 64, from `--first-seed`) of every prompt in distill_builtin's UNDERSPECIFIED and
prints, per row and prompt, the number of distinct colours and cells that 64 of those images hold, averaged over
every way of picking 64 (also: the fewest in any of the disjoint blocks of 64, and in block 0, which from seed 0 is
`lightbooth eval`'s own draw), on two readings:
- strict: `lightbooth eval`'s (only images the detector reads as one clean object count);
- lenient: distill_builtin's (main colour and foreground centroid cell of every image).
Also the share of blank images (no foreground at all) per prompt and, with `--captions N`, on N of the recipe's
own single-object captions per language. Then each row's expectations as a share of the first row's (the teacher,
when it comes first), with a 90% bootstrap interval (both rows' images resampled), since even 2,048 seeds leave a
few points of doubt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_builtin import KEYS, UNDERSPECIFIED, lora_row, preset_row  # noqa: E402
from dreambooth_subject import main_colour  # noqa: E402
from loose_adherence import centroid_cell  # noqa: E402

from lightbooth.eval.quality import VARIETY_DRAW as BLOCK, expected_distinct  # noqa: E402  (one copy, eval's)


def reads(images) -> list[tuple]:
    """Per image: (strict colour, strict cell, lenient colour, lenient cell); None where a reading finds nothing."""
    from lightbooth.data.shapes import COLORS
    from lightbooth.eval import detector

    out = []
    for im in images:
        d = detector.detect(im)
        o = d.objects[0] if d.clean and len(d.objects) == 1 else None
        c = main_colour(im)
        out.append((o and o.color, o and o.cell, c if c in COLORS else None, centroid_cell(im)))
    return out


def block_counts(rows: list[tuple]) -> np.ndarray:
    """Distinct values of each of the four readings in every block of 64: shape (blocks, 4)."""
    blocks = [rows[i:i + BLOCK] for i in range(0, len(rows), BLOCK)]
    return np.array([[len({r[j] for r in b} - {None}) for j in range(4)] for b in blocks])


def share_interval(rows: list[tuple], ref: list[tuple], j: int, draws: int = 300, seed: int = 0) -> tuple:
    """5% and 95% points of expected_distinct(rows) / expected_distinct(ref) on reading j, both resampled."""
    rng = np.random.default_rng(seed)
    a, b = [r[j] for r in rows], [r[j] for r in ref]
    out = []
    for _ in range(draws):
        ea = expected_distinct([a[i] for i in rng.integers(len(a), size=len(a))])
        eb = expected_distinct([b[i] for i in rng.integers(len(b), size=len(b))])
        out.append(ea / eb if eb else np.nan)
    return tuple(np.nanpercentile(out, [5, 95]))


def recipe_captions(n: int, seed: int = 7) -> dict[str, list[str]]:
    """n single-object scenes captioned as training captions them (attributes left out at random), per language."""
    from lightbooth.data import shapes

    rng = np.random.default_rng(seed)
    out = {"en": [], "zh": []}
    for _ in range(n):
        scene = shapes.sample_scene(rng, "single")
        for lang, caps in out.items():
            caps.append(shapes.caption(scene, lang, rng))
    return out


def main() -> int:
    from lightbooth import Generator
    from lightbooth.eval.quality import _generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1024, help="seeds per prompt, a multiple of 64")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here (block 0: its first 64)")
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--preset", action="append", default=[], metavar="NAME[:SAMPLER[:EULER_STEPS]]")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH[@SAMPLER]")
    ap.add_argument("--captions", type=int, default=0, help="also: the share of blank images (no foreground) on "
                    "this many of the recipe's own single-object captions per language (attributes left out at random)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.seeds <= 0 or args.seeds % BLOCK or args.first_seed < 0:
        ap.error(f"--seeds must be a positive multiple of {BLOCK} and --first-seed at least 0")
    torch.set_num_threads(args.threads)
    rows = [preset_row(spec) for spec in args.preset] + [lora_row(spec) for spec in args.lora]
    if not rows:
        ap.error("name at least one row: --preset base --preset 4step, say")
    names = ("strict colours", "strict cells", "lenient colours", "lenient cells")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    captions, seeds_c = recipe_captions(args.captions), list(range(args.captions))
    first = None
    for name, loras, settings in rows:
        gen = Generator.load(args.model, loras=loras, device="cpu", preset=settings.get("preset"))
        s = {k: v for k, v in settings.items() if k in KEYS}
        print(f"## {name} ({args.seeds} seeds from seed {args.first_seed}: expected distinct values in {BLOCK} "
              f"seeds; min over the {args.seeds // BLOCK} disjoint blocks; block 0)", flush=True)
        got = {}
        for prompt in UNDERSPECIFIED:
            got[prompt] = read = reads(_generate(gen, [prompt] * args.seeds, seeds, 32, s))
            counts = block_counts(read)
            cols = ", ".join(f"{n} {expected_distinct([r[j] for r in read]):.2f} (min {lo}, block 0 {b0})"
                             for j, (n, lo, b0) in enumerate(zip(names, counts.min(axis=0), counts[0])))
            blank = np.mean([r[3] is None for r in read])  # no foreground: fewer than 15 pixels off the corners
            print(f"  {prompt!r}: {cols}; blank {blank:.1%}", flush=True)
        if args.captions:
            shares = [f"{lang} {np.mean([r[3] is None for r in reads(_generate(gen, c, seeds_c, 32, s))]):.1%}"
                      for lang, c in captions.items()]
            print(f"  blank on {args.captions} captions of the recipe per language: {', '.join(shares)}", flush=True)
        if first is None:
            first = got
            continue
        for prompt, read in got.items():
            parts = []
            for j, n in enumerate(names):
                ref = expected_distinct([r[j] for r in first[prompt]])
                if ref < 1:  # the teacher itself draws (almost) nothing this reading accepts: no share to read
                    parts.append(f"{n} -")
                    continue
                lo, hi = share_interval(read, first[prompt], j)
                parts.append(f"{n} {expected_distinct([r[j] for r in read]) / ref:.1%} ({lo:.1%}-{hi:.1%})")
            print(f"  of the first row, {prompt!r}: {', '.join(parts)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
