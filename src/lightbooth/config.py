"""Typed configs: dataclasses whose fields are the YAML keys, one to one. Unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .atomic import write_text_atomic
from .errors import LightboothError

C = TypeVar("C")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # YAML 1.1 reads 1e-4 (no dot) as text


def _coerce(cls, name: str, value: Any, hint) -> Any:
    """`value` as the type `hint` asks for, or a one-line error naming the key (None only where the key allows it)."""
    def wrong(what: str) -> LightboothError:
        return LightboothError(f"config key '{name}' of {cls.__name__} must be {what}, got {value!r}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(cls, name, value, inner[0]) if len(inner) == 1 else value
    if value is None:
        raise wrong(f"a value of type {getattr(hint, '__name__', hint)} (leave the key out for its default)")
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint in (int, float):
        if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float) if hint is float else int):
            raise wrong("a number" if hint is float else "a whole number")
        if hint is float:
            if not math.isfinite(value):
                raise wrong("a finite number")
            return float(value)
        return value
    if hint is str:
        if isinstance(value, os.PathLike):  # Python callers pass paths as Path objects
            value = os.fspath(value)
        if not isinstance(value, str):
            raise wrong("text")
        return value
    if origin in (tuple, list):
        items = [value] if isinstance(value, str) else value  # one item may be given without a list
        if not isinstance(items, (list, tuple)):
            raise wrong("a list")
        if len(args) == 1 or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            items = [_coerce(cls, name, v, args[0]) for v in items]
        return tuple(items) if origin is tuple else list(items)
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


def checked(cfg: C) -> C:
    """`cfg` (a config dataclass built in Python) with every field type-checked and coerced as YAML keys are: the
    training entry points call this, so a wrong type is a one-line LightboothError and not a TypeError later."""
    return from_dict(type(cfg), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                     type(cfg).__name__)


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
            raise LightboothError(f"config file {p} is not valid YAML: {_yaml_problem(e)}; fix the file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LightboothError(f"cannot read config file {p} ({getattr(e, 'strerror', None) or e.reason}); pass "
                                  "a readable UTF-8 YAML file") from None
        if not isinstance(data, dict):
            raise LightboothError(f"config file {p} must be a mapping of keys to values ('key: value' lines), not "
                                  f"a {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, str(path or "options"))


def _yaml_problem(e) -> str:
    """What is wrong in a YAML file and where (1-based line and column), in one line."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{' '.join(problem.split())}{where}"


def save_config(cfg, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)

