"""Safe loading and atomic saving of safetensors files.

Weights come from the internet (LoRAs from model hubs, checkpoints from strangers), so lightbooth never unpickles
anything: pickle checkpoints are refused before a single byte of them is interpreted. Safetensors files are validated
by reading the header ourselves first, so a truncated download or a corrupt file becomes one clear `LightboothError`
naming the file, instead of a Rust panic or a half-loaded state dict.

Saving goes through a temporary file in the destination folder plus `os.replace`, so an interrupted save (Ctrl-C,
full disk, preempted job) never leaves a truncated file where a good one used to be.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from lightbooth.atomic import new_file_mode, temp_file
from lightbooth.errors import LightboothError

# Bytes per element of the safetensors dtypes that torch can load. Sub-byte types (F4, F6_*) are refused.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_CONVERT_HINT = (
    "lightbooth loads only safetensors and never unpickles files: if you trust its source, convert it once with "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')` and pass that file"
)


def _looks_like_pickle(head: bytes) -> bool:
    """True for torch.save output: zip archives (torch >= 1.6) and raw pickle streams (protocol 2-5)."""
    if head.startswith(b"PK\x03\x04"):
        return True
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _corrupt(path: Path, what: str) -> LightboothError:
    return LightboothError(
        f"{path} is not a valid safetensors file ({what}); re-download or re-export it"
    )


def _check_path(path: Path) -> int:
    """Refuse missing files, folders and pickles; return the file size."""
    if not path.exists():
        raise LightboothError(f"weights file {path} does not exist; check the path")
    if path.is_dir():
        raise LightboothError(f"{path} is a directory; pass the .safetensors file inside it")
    with path.open("rb") as f:
        head = f.read(8)
    if _looks_like_pickle(head):
        raise LightboothError(f"{path} is a pickle checkpoint; {_CONVERT_HINT}")
    return path.stat().st_size


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """Return the parsed JSON header and the byte offset where tensor data begins."""
    if size < 8:
        raise _corrupt(path, f"only {size} bytes, truncated")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise _corrupt(path, f"header length {n} runs past the end of the {size}-byte file, truncated")
        if n > _MAX_HEADER:
            raise _corrupt(path, f"header length {n} is over the 100 MB safetensors limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON: {getattr(e, 'msg', None) or e.reason}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return header, 8 + n


def _check_metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    return dict(meta)


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    """Validate one tensor entry; return its (begin, end) data offsets."""
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has bad data offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _DTYPE_SIZES[dtype]:
        raise _corrupt(path, f"tensor {name!r} byte size does not match its shape {shape} and dtype {dtype}")
    return offsets[0], offsets[1]


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Tensors must tile the data section exactly, as safetensors itself requires."""
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise _corrupt(path, f"tensor {name!r} starts at byte {begin}, expected {pos}")
        pos = end
    if pos > data_len:
        raise _corrupt(path, f"tensor data runs {pos - data_len} bytes past the end of the file, truncated")
    if pos < data_len:
        raise _corrupt(path, f"{data_len - pos} unexpected bytes after the last tensor")


def validate_safetensors(path: str | os.PathLike) -> dict[str, str]:
    """Check that `path` is a complete, well-formed safetensors file without loading tensors.

    Returns the file's `__metadata__`. Raises `LightboothError` for anything else (missing, folder, pickle,
    truncated, corrupt), so callers never hand a bad file to the safetensors reader.
    """
    p = Path(path)
    size = _check_path(p)
    try:
        header, data_start = _read_header(p, size)
    except LightboothError:
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            raise LightboothError(f"{p} is not a safetensors file ({p.suffix} checkpoint); {_CONVERT_HINT}") from None
        raise
    meta = _check_metadata(p, header.pop("__metadata__", None))
    spans = [(*_check_entry(p, name, info), name) for name, info in header.items()]
    _check_layout(p, spans, size - data_start)
    return meta


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file to CPU tensors plus its string metadata, refusing anything unsafe or broken."""
    from safetensors.torch import load_file

    meta = validate_safetensors(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # the header was valid; this is a last-resort guard, e.g. the file changed meanwhile
        raise _corrupt(Path(path), f"safetensors could not read it: {str(e).splitlines()[0] if str(e) else e!r}")
    return tensors, meta


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort because some filesystems refuse fsync on directories."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` so that readers see either the old file or the complete new one, never a torn one.

    The temporary file lives in the destination folder so `os.replace` is an atomic rename on the same filesystem.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = temp_file(dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())  # safetensors replaces the file with one of its own, 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
