"""`lightbooth eval`: prompt adherence of a model on the shapes world, scored by the detector.

A fixed, seeded prompt set per scene kind and language; every prompt states every attribute of its scene and an
image counts only if everything is right (strict). Also: English / Chinese agreement with the same seed, and
variety where the prompt leaves attributes free: over the first 64 seeds, as issue 3 words it, and with more seeds
the expected number of distinct values over every pick of 64 of them (one draw of 64 is noisy).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..data import shapes
from . import detector


@dataclass
class EvalReport:
    accuracy: dict[str, float] = field(default_factory=dict)  # "single/en" -> strict accuracy
    agreement: dict[str, float] = field(default_factory=dict)  # kind -> EN/ZH same attributes share
    variety: dict = field(default_factory=dict)  # distinct colours / cells over seeds of "a circle" (+ expected)
    count: int = 0
    detections: dict[str, list] = field(default_factory=dict)  # "single/en" -> what the detector read, per seed

    def lines(self) -> list[str]:
        out = [f"strict accuracy ({self.count} prompts per kind and language):"]
        out += [f"  {k:<10} {v:6.1%}" for k, v in self.accuracy.items()]
        out += ["English/Chinese agreement (same seed, same attributes):"]
        out += [f"  {k:<10} {v:6.1%}" for k, v in self.agreement.items()]
        out += [f"variety over {self.variety.get('seeds', 0)} seeds of 'a circle': "
                f"{self.variety.get('colors', 0)}/8 colours, {self.variety.get('cells', 0)}/9 cells"]
        if "expected_colors" in self.variety:
            out += [f"  expected over every {VARIETY_DRAW} of {self.variety['of']} seeds: "
                    f"{self.variety['expected_colors']:.2f}/8 colours, {self.variety['expected_cells']:.2f}/9 cells"]
        return out


VARIETY_DRAW = 64  # issue 3: "over 64 seeds of 'a circle'"


def expected_distinct(values: list, n: int = VARIETY_DRAW) -> float:
    """The mean number of distinct values (None not counted) over every way of picking n of `values`: for a value
    seen k times in N, it is missing from a pick with probability C(N - k, n) / C(N, n). The same quantity as the
    mean over disjoint blocks, with less noise, since every block of n is averaged over."""
    N = len(values)
    ks = Counter(v for v in values if v is not None).values()
    lc = math.lgamma
    return sum(1.0 - (math.exp(lc(N - k + 1) - lc(N - k - n + 1) - lc(N + 1) + lc(N - n + 1)) if N - k >= n else 0.0)
               for k in ks)


def prompt_set(kind: str, n: int, seed: int = 1234) -> list[shapes.Scene]:
    """The fixed evaluation scenes of one kind (independent of the training seed)."""
    rng = np.random.default_rng([seed, shapes.KINDS.index(kind)])
    return [shapes.sample_scene(rng, kind) for _ in range(n)]


def signature(det: detector.Detection):
    """What a detection says, order-free, for comparing two images (an object between cells has cell None)."""
    return (det.background, tuple(sorted(((o.color, o.shape, o.size, o.cell) for o in det.objects),
                                         key=lambda t: tuple("" if v is None else v for v in t))))


def agree(a: detector.Detection, b: detector.Detection) -> bool:
    """Both images readable, both show something, and they show the same things."""
    return a.clean and b.clean and bool(a.objects) and signature(a) == signature(b)


def evaluate(gen, n: int = 32, kinds=shapes.KINDS, variety_seeds: int = 64, batch_size: int = 32,
             **settings) -> EvalReport:
    """Score `gen` (a lightbooth Generator) on n prompts per kind and language."""
    rep = EvalReport(count=n)
    for kind in kinds:
        scenes = prompt_set(kind, n)
        dets = {}
        for lang in ("en", "zh"):
            prompts = [shapes.full_caption(s, lang, template=i % shapes.N_TEMPLATES) for i, s in enumerate(scenes)]
            images = _generate(gen, prompts, list(range(n)), batch_size, settings)
            dets[lang] = rep.detections[f"{kind}/{lang}"] = [detector.detect(im) for im in images]
            ok = [detector.check(s, d) for s, d in zip(scenes, dets[lang])]
            rep.accuracy[f"{kind}/{lang}"] = float(np.mean(ok))
        rep.agreement[kind] = float(np.mean([agree(a, b) for a, b in zip(dets["en"], dets["zh"])]))
    images = _generate(gen, ["a circle"] * variety_seeds, list(range(variety_seeds)), batch_size, settings)
    one = [d.objects[0] if d.clean and len(d.objects) == 1 else None for d in map(detector.detect, images)]
    first = [o for o in one[:VARIETY_DRAW] if o is not None]
    rep.variety = {"seeds": min(variety_seeds, VARIETY_DRAW), "colors": len({o.color for o in first}),
                   "cells": len({o.cell for o in first if o.cell})}
    if variety_seeds > VARIETY_DRAW:
        rep.variety.update(of=variety_seeds, expected_colors=expected_distinct([o and o.color for o in one]),
                           expected_cells=expected_distinct([o and o.cell for o in one]))
    return rep


def _generate(gen, prompts: list[str], seeds: list[int], batch_size: int, settings: dict):
    """One image per (prompt, seed) pair, in batches."""
    from ..generate import Job

    s = gen.settings(**settings)
    jobs = [Job(p, sd) for p, sd in zip(prompts, seeds)]
    out = []
    for i in range(0, len(jobs), batch_size):
        out += gen.run(jobs[i:i + batch_size], s)
    return out
