"""`lightbooth eval`'s scoring on generators with known answers: a perfect one and a blank one."""

import itertools

import numpy as np
import pytest

from lightbooth.data import shapes
from lightbooth.eval import quality


class RenderingGenerator:
    """Stands in for a model that follows every prompt exactly: it renders the scene the prompt was made from."""

    def __init__(self, n, blank=False):
        self.blank = blank
        self.scene_of = {}
        for kind in shapes.KINDS:
            for i, s in enumerate(quality.prompt_set(kind, n)):
                for lang in ("en", "zh"):
                    self.scene_of[shapes.full_caption(s, lang, template=i % shapes.N_TEMPLATES)] = s
        rng = np.random.default_rng(0)
        self.circles = [shapes.Scene("single", "white", (shapes.Obj("circle", c, "small", cell, *shapes.CELLS[cell]),))
                        for c, cell in zip(list(shapes.COLORS) * 8, list(shapes.CELLS) * 8)]
        rng.shuffle(self.circles)

    def settings(self, **kw):
        return kw

    def run(self, jobs, s):
        out = []
        for j in jobs:
            scene = self.circles[j.seed % len(self.circles)] if j.prompt == "a circle" else self.scene_of[j.prompt]
            img = shapes.render(scene)
            if self.blank:  # an empty white canvas
                img = img.point(lambda v: 240)
            out.append(img)
        return out


def test_perfect_generator_scores_full_marks():
    rep = quality.evaluate(RenderingGenerator(6), n=6, variety_seeds=64)
    assert set(rep.accuracy) == {f"{k}/{lang}" for k in shapes.KINDS for lang in ("en", "zh")}
    assert all(v == 1.0 for v in rep.accuracy.values()), rep.accuracy
    assert all(v == 1.0 for v in rep.agreement.values())
    assert rep.variety == {"seeds": 64, "colors": 8, "cells": 9}
    assert any("100.0%" in line for line in rep.lines())


def test_more_variety_seeds_add_the_expectation_over_every_64_of_them():
    rep = quality.evaluate(RenderingGenerator(2), n=2, variety_seeds=128)
    assert (rep.variety["seeds"], rep.variety["colors"], rep.variety["cells"], rep.variety["of"]) == (64, 8, 9, 128)
    # each colour is drawn 16 times in 128 seeds: missing from a pick of 64 only with probability C(112,64)/C(128,64)
    assert rep.variety["expected_colors"] == pytest.approx(8.0, abs=1e-4)
    assert 8.5 < rep.variety["expected_cells"] <= 9.0
    assert any("expected over every 64 of 128 seeds: 8.00/8 colours" in line for line in rep.lines())
    blank = quality.evaluate(RenderingGenerator(2, blank=True), n=2, variety_seeds=65)
    assert blank.variety["expected_colors"] == blank.variety["expected_cells"] == 0.0


def test_expected_distinct_is_the_mean_over_every_pick():
    values = ["red", "red", "red", "blue", None, "green", "blue", "red"]
    for n in (1, 3, 5, 8):
        picks = list(itertools.combinations(values, n))
        brute = sum(len(set(p) - {None}) for p in picks) / len(picks)
        assert quality.expected_distinct(values, n) == pytest.approx(brute, rel=1e-9)


def test_blank_images_score_zero_and_do_not_count_as_agreeing():
    rep = quality.evaluate(RenderingGenerator(4, blank=True), n=4, variety_seeds=8)
    assert all(v == 0.0 for v in rep.accuracy.values())
    assert all(v == 0.0 for v in rep.agreement.values())
    assert rep.variety["colors"] == 0


def test_detections_with_an_object_between_cells_compare_without_error():
    from lightbooth.eval.detector import DetectedObject, Detection

    def det(cells):
        return Detection("white", [DetectedObject("red", "circle", "small", c, 0.5, 0.5, 0.9) for c in cells], [])

    assert quality.agree(det([None, "center"]), det(["center", None]))
    assert not quality.agree(det([None, "center"]), det(["center", "top left"]))
