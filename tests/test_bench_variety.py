"""bench/variety_blocks.py's expectation: the mean number of distinct values over every pick of n images."""

import importlib.util
import itertools
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def vb():
    spec = importlib.util.spec_from_file_location("variety_blocks",
                                                  Path(__file__).parents[1] / "bench" / "variety_blocks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expected_distinct_is_the_mean_over_every_pick(vb):
    values = ["red", "red", "red", "blue", None, "green", "blue", "red"]
    for n in (1, 3, 5, 8):
        picks = list(itertools.combinations(values, n))
        brute = sum(len(set(p) - {None}) for p in picks) / len(picks)
        assert vb.expected_distinct(values, n) == pytest.approx(brute, rel=1e-9)


def test_block_counts_read_each_disjoint_block_alone(vb):
    rows = [("red", "top left", "red", "center")] * 64 + [(None, None, "blue", "center")] * 63 + [(None,) * 4]
    assert vb.block_counts(rows).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
