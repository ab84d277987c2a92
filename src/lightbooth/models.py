"""Finding a model on disk: a diffusers folder, a hub id already in the local cache, or the built-in model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LightboothError

BUILTIN_DIR = Path(__file__).parent / "builtin" / "model"


def builtin_model_path() -> Path:
    """The folder of the built-in default model shipped inside the package (a diffusers folder)."""
    return BUILTIN_DIR


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Turn `model` into a local diffusers folder, without touching the network."""
    if model is None:
        if not (BUILTIN_DIR / "model_index.json").is_file():
            raise LightboothError("this install has no built-in model; pass --model with a diffusers folder "
                                  "or a hub id already in the local cache")
        return BUILTIN_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise LightboothError(f"{path} is not a diffusers model folder (no model_index.json); pass the folder "
                                  "that holds model_index.json and the component subfolders")
        return path
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        cached = _from_hub_cache(text)
        if cached is not None:
            return cached
        raise LightboothError(
            f"model {text!r} not found: no folder ./{text} and not in the local hub cache ({_hub_cache()}); "
            f"download it where the hub is reachable (hf download {text}) or pass a local diffusers folder")
    raise LightboothError(f"model {text!r} not found: no such folder; pass a diffusers folder or a cached hub id")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _from_hub_cache(repo_id: str) -> Path | None:
    """The newest cached snapshot of `repo_id`, offline; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "model_index.json").is_file() else None


def family_of(path: Path) -> str:
    """Which family adapter loads the diffusers folder at `path`."""
    from .families import family_for_pipeline

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise LightboothError(f"cannot read {path / 'model_index.json'}: {e}") from None
    if not isinstance(index, dict):
        raise LightboothError(f"{path / 'model_index.json'} is not a diffusers model index (a JSON object naming the "
                              "pipeline and its components); pass a complete diffusers folder")
    return family_for_pipeline(index.get("_class_name", "?"))
