"""bench/variety_blocks.py: reading each disjoint block of 64 seeds alone (its expectation is eval's, tested there)."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def vb():
    spec = importlib.util.spec_from_file_location("variety_blocks",
                                                  Path(__file__).parents[1] / "bench" / "variety_blocks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_counts_read_each_disjoint_block_alone(vb):
    rows = [("red", "top left", "red", "center")] * 64 + [(None, None, "blue", "center")] * 63 + [(None,) * 4]
    assert vb.block_counts(rows).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
