"""Shared fixtures: tiny random models of both real architectures, written once per session as diffusers folders."""

import importlib
import os

import pytest
import torch

# diffusers and transformers bind their log handlers to the sys.stderr of their first import: imported here, not
# first inside a capsys test, whose stream is closed afterwards and would break every later test's log output
for _lib in ("diffusers", "transformers"):
    importlib.import_module(_lib)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    from lightbooth.tiny import build_tiny_model

    return build_tiny_model("qwen-image", tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    from lightbooth.tiny import build_tiny_model

    return build_tiny_model("sd", tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def sd_v_dir(tmp_path_factory):
    from lightbooth.tiny import build_tiny_model

    return build_tiny_model("sd", tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def qwen_gen(qwen_dir):
    from lightbooth import Generator

    return Generator.load(qwen_dir, device="cpu")


@pytest.fixture(scope="session")
def sd_gen(sd_dir):
    from lightbooth import Generator

    return Generator.load(sd_dir, device="cpu")


@pytest.fixture(autouse=True)
def _threads():
    # 2 (this machine's cores) unless OMP_NUM_THREADS says otherwise: with a training job beside the tests, two
    # threads each stall on OpenMP barriers and a 10 s selection takes minutes
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
