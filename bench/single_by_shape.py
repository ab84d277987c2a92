"""Where a built-in-style model loses strict single-object prompts: by failure class and by shape and size.

    python bench/single_by_shape.py [--model DIR] [--lora PATH] [--preset base] [--n 256] [--threads 2]

The single prompts, captions and seeds of `lightbooth eval` (the same scenes as its single row), per language.
Each failing image is put in one class by the detector's first complaint: a malformed shape (a blob the detector
fits to no template, or fits to two alike: "no clear shape" / "area of no world shape"), colour or blur (off the
palette, not flat, faint), a wrong attribute (an object found but of the wrong cell, size, shape or colour), or
a wrong object count. Then the failures per (shape, size), beside the VAE round trip of the same rendered scenes
(encode, decode, the same strict test): what the flow model loses against what its VAE could draw.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def failure_class(mismatches: list[str]) -> str:
    text = " ".join(mismatches)
    if "no clear shape" in text or "area of no world shape" in text:
        return "malformed shape"
    if "not flat" in text or "faint" in text or "palette" in text:
        return "colour or blur"
    if "objects do not match" in text:
        return "wrong attribute"
    return "object count"


def roundtrip_passes(vae, scenes) -> list[bool]:
    """Does each rendered scene pass the strict test after the VAE's encode and decode?"""
    from vae_recon import round_trip

    from lightbooth.data import shapes
    from lightbooth.eval import detector

    out = []
    for i in range(0, len(scenes), 64):
        part = scenes[i:i + 64]
        images = round_trip(vae, [shapes.render(s) for s in part])
        out += [not detector.mismatches(s, detector.detect(im)) for s, im in zip(part, images)]
    return out


def parse_args(doc: str, argv=None):
    """The options this bench and bench/count_cells.py share; None (after a one-line error) when they are bad."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--lora", action="append", default=[])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.n < 1 or args.threads < 1:
        print("error: --n and --threads must be at least 1", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    return args


def load_generator(args):
    from lightbooth import Generator

    return Generator.load(args.model, loras=tuple(args.lora), device="cpu", preset=args.preset)


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    if args is None:
        return 2
    from lightbooth.data import shapes
    from lightbooth.eval import detector, quality

    gen = load_generator(args)
    scenes = quality.prompt_set("single", args.n)
    keys = [(s.objects[0].shape, s.objects[0].size) for s in scenes]
    vae = gen.family.components["vae"]
    roundtrip = dict(zip(range(args.n), roundtrip_passes(vae.float(), scenes)))
    fails = {}
    for lang in ("en", "zh"):
        prompts = [shapes.full_caption(s, lang, template=i % shapes.N_TEMPLATES) for i, s in enumerate(scenes)]
        images = quality._generate(gen, prompts, list(range(args.n)), 32, {"preset": args.preset})
        classes, fails[lang] = Counter(), Counter()
        for k, (s, im) in enumerate(zip(scenes, images)):
            m = detector.mismatches(s, detector.detect(im))
            classes[failure_class(m) if m else "pass"] += 1
            fails[lang][keys[k]] += bool(m)
        print(f"{lang}: " + ", ".join(f"{c} {classes[c]}" for c in
                                      ("pass", "malformed shape", "wrong attribute", "colour or blur", "object count")))
    total = Counter(keys)
    rt_fail = Counter(keys[k] for k, ok in roundtrip.items() if not ok)
    print("shape / size | prompts | failing en / zh | VAE round trip failing")
    for key in sorted(total):
        print(f"{key[0]} / {key[1]} | {total[key]} | {fails['en'][key]} / {fails['zh'][key]} | {rt_fail[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
