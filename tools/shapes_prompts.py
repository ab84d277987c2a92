"""Write a prompt file of shapes-world captions for `lightbooth distill --prompts-file` (or `generate`).

    python tools/shapes_prompts.py --out prompts.txt --n 40000 --full 0.5 --seed 50

Each line is one random scene's caption, English or Chinese at random: with probability `--full` the caption states
every attribute (`shapes.full_caption`, a random one of its templates, as `lightbooth eval` prompts), otherwise it is
the training captioner's own (`shapes.caption`: attributes left out at random). Distillation without a prompt file
uses the captioner alone; the built-in model's students were distilled on such a file with half the captions full,
since its polish stage (and a user who says what they want) states everything. Deterministic from `--seed`; the
file is written atomically and never replaces one that exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int, full: float, seed: int) -> list[str]:
    from lightbooth.data import shapes

    rng = np.random.default_rng([seed, 20261207])
    out = []
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        lang = "zh" if rng.random() < 0.5 else "en"
        if rng.random() < full:
            out.append(shapes.full_caption(scene, lang, template=int(rng.integers(shapes.N_TEMPLATES))))
        else:
            out.append(shapes.caption(scene, lang, rng))
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from lightbooth.atomic import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=40000, help="prompts to write")
    ap.add_argument("--full", type=float, default=0.5, help="share of captions stating every attribute")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose another --out (an existing file is never replaced)", file=sys.stderr)
        return 2
    if args.n < 1 or not 0 <= args.full <= 1 or args.seed < 0:
        print("error: --n must be 1 or more, --full within [0, 1] and --seed 0 or more", file=sys.stderr)
        return 2
    write_text_atomic(args.out, "\n".join(prompts(args.n, args.full, args.seed)) + "\n")
    print(f"{args.out}: {args.n} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
