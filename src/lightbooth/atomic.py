"""Atomic writes: a temporary file in the destination folder, then a rename (or a link) into place.

`tempfile.mkstemp` makes its file readable by its owner only (0600), and a rename keeps that, so every image,
LoRA and config written this way would be hidden from the group and from other users (a shared model folder, a
ComfyUI or web UI running as another user) where an ordinary `open(path, "w")` gives 0644 under the usual umask.
`temp_file` gives the temporary file the permissions an ordinary new file would get.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def new_file_mode() -> int:
    """0666 less the umask: what `open(path, "w")` would give."""
    try:  # Linux says it without changing it (os.umask sets the whole process's, racing other threads' creates)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def temp_file(folder: Path | str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
    """`tempfile.mkstemp` in `folder`, with the mode of an ordinary new file (0666 less the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
    except (AttributeError, OSError):  # no fchmod (Windows) or a filesystem without modes: keep mkstemp's
        pass
    return fd, tmp


def open_up(folder: Path | str) -> None:
    """Give every file under `folder` the mode of an ordinary new file: `save_pretrained` (diffusers 0.42,
    transformers 5) writes its weights through temporary files of its own and leaves them 0600."""
    mode = new_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def why_unmakeable(folder: Path) -> str | None:
    """Why `folder` (new or existing) could not be made and written into, read from the nearest folder above it
    that exists ("/data/x is a file", "... is not writable"), or None when it can be. Nothing is written."""
    there = Path(folder).absolute()
    while not there.exists():
        there = there.parent
    if not there.is_dir():
        return f"{there} is a file"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"{there} is not writable"
    return None
