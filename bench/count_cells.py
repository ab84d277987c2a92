"""What count prompts fail on, per language: the same scenes and seeds with their cells stated and left out.

    python bench/count_cells.py [--model DIR] [--lora PATH] [--preset base] [--n 256] [--threads 2]

The count prompts of `lightbooth eval` (same scenes, templates and seeds as its count row), in English and Chinese,
twice: as eval words them (every attribute, the objects' cells listed) and with the cell list left out (scored
without cells; everything else still strict). Each image is put in one failure class by the detector's first
complaint (as bench/single_by_shape.py does), and passes are counted per shape. A language whose passes fall when
its cells are stated reads the list of cells worse than the other.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLASSES = ("pass", "malformed shape", "wrong attribute", "colour or blur", "object count")


def main(argv=None) -> int:
    from single_by_shape import failure_class, load_generator, parse_args

    args = parse_args(__doc__, argv)
    if args is None:
        return 2
    from lightbooth.data import shapes
    from lightbooth.eval import detector, quality

    gen = load_generator(args)
    scenes = quality.prompt_set("count", args.n)
    print("language | cells | " + " | ".join(CLASSES) + " | passes per shape (" + ", ".join(shapes.SHAPES) + ")")
    for lang in ("en", "zh"):
        for cells in (True, False):
            prompts = [shapes.full_caption(s, lang, i % shapes.N_TEMPLATES, () if cells else ("cell",))
                       for i, s in enumerate(scenes)]
            stated = detector.ALL_ATTRIBUTES - (set() if cells else {"cell"})
            images = quality._generate(gen, prompts, list(range(args.n)), 32, {"preset": args.preset})
            classes, per_shape = Counter(), Counter()
            for s, im in zip(scenes, images):
                m = detector.mismatches(detector.Requirements(s, stated), detector.detect(im))
                classes[failure_class(m) if m else "pass"] += 1
                per_shape[s.objects[0].shape] += not m
            print(f"{lang} | {'stated' if cells else 'left out'} | " + " | ".join(str(classes[c]) for c in CLASSES)
                  + " | " + " ".join(str(per_shape[sh]) for sh in shapes.SHAPES), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
