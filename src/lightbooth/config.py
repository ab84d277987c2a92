"""Typed configs: dataclasses whose fields are the YAML keys, one to one. Unknown keys are errors."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from .atomic import write_text_atomic
from .errors import LightboothError

C = TypeVar("C")


def _coerce(cls, name: str, value: Any, hint) -> Any:
    origin = typing.get_origin(hint)
    if hint in (int, float, str, bool) and value is not None:
        if hint is bool and not isinstance(value, bool):
            raise LightboothError(f"config key '{name}' of {cls.__name__} must be true or false, got {value!r}")
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, hint):
            raise LightboothError(f"config key '{name}' of {cls.__name__} must be {hint.__name__}, got {value!r}")
    if origin in (tuple, list) and isinstance(value, list):
        return tuple(value) if origin is tuple else list(value)
    return value


def from_dict(cls: type[C], data: dict, where: str = "config") -> C:
    """Build `cls` from a mapping; an unknown key or a wrong type is a one-line error naming the key."""
    if not isinstance(data, dict):
        raise LightboothError(f"{where} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise LightboothError(f"unknown key '{key}' in {where}; known keys: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(cls, k, v, hints[k]) for k, v in data.items()})


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict | None = None) -> C:
    """Defaults <- YAML file <- explicit overrides (None values in overrides are ignored)."""
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LightboothError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LightboothError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, str(path or "options"))


def save_config(cfg, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)

