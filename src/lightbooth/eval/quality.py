"""`lightbooth eval`: prompt adherence of a model on the shapes world, scored by the detector.

A fixed, seeded prompt set per scene kind and language; every prompt states every attribute of its scene and an
image counts only if everything is right (strict). Also: English / Chinese agreement with the same seed, and
variety where the prompt leaves attributes free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import shapes
from . import detector


@dataclass
class EvalReport:
    accuracy: dict[str, float] = field(default_factory=dict)  # "single/en" -> strict accuracy
    agreement: dict[str, float] = field(default_factory=dict)  # kind -> EN/ZH same attributes share
    variety: dict[str, int] = field(default_factory=dict)  # distinct colours / cells over seeds of "a circle"
    count: int = 0
    detections: dict[str, list] = field(default_factory=dict)  # "single/en" -> what the detector read, per seed

    def lines(self) -> list[str]:
        out = [f"strict accuracy ({self.count} prompts per kind and language):"]
        out += [f"  {k:<10} {v:6.1%}" for k, v in self.accuracy.items()]
        out += ["English/Chinese agreement (same seed, same attributes):"]
        out += [f"  {k:<10} {v:6.1%}" for k, v in self.agreement.items()]
        out += [f"variety over {self.variety.get('seeds', 0)} seeds of 'a circle': "
                f"{self.variety.get('colors', 0)}/8 colours, {self.variety.get('cells', 0)}/9 cells"]
        return out


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
    objs = [o for d in map(detector.detect, images) if d.clean and len(d.objects) == 1 for o in d.objects]
    rep.variety = {"seeds": variety_seeds, "colors": len({o.color for o in objs}),
                   "cells": len({o.cell for o in objs if o.cell})}
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
