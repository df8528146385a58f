"""Saved training state: written atomically with a checksum of its content, refused when damaged.

``torch.save`` stores tensors uncompressed and without a checksum that
``torch.load`` verifies: a file with bytes zeroed in the middle loads silently,
with corrupted weights or optimizer state. memfit's files carry a digest of
their content (every tensor's dtype, shape and bytes, and every other value),
computed before writing and checked after reading, and are written to a
temporary file renamed over the old one, so a run killed while saving keeps the
previous save.

Files hold tensors, numbers, strings, lists and dicts only, and load with
``torch.load(path, weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from typing import Any

import torch

from memfit.errors import UsageError

__all__ = ["FORMAT", "digest", "write", "read", "verify"]

FORMAT = "memfit.trainer/1"


def digest(obj: Any) -> str:
    """A SHA-256 of ``obj``'s content: tensors by dtype, shape and bytes; dicts in order; other values by repr."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _update(h, key)
            _update(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def write(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with its digest to ``path`` atomically (a temporary file beside it, renamed over it)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT, "sha256": digest(state), "state": state}, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows: a reader sees the old file or the new one


def read(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, Any]:
    """The state saved at ``path``, its digest verified. A missing, truncated or damaged file is a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"no saved state at {path!r}: the file does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError) as exc:
        raise UsageError(f"{path} cannot be read as a saved memfit state ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the file is truncated or "
                         "damaged: use an earlier save") from exc
    return verify(saved, source=path)


def verify(saved: Any, *, source: str = "the state") -> dict[str, Any]:
    """The state inside a file's content (from :func:`write`), after checking its digest."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or "state" not in saved:
        raise UsageError(f"{source} is not a state saved by memfit (expected a dict with format {FORMAT!r}); "
                         "save one with trainer.save(path)")
    if digest(saved["state"]) != saved.get("sha256"):
        raise UsageError(f"{source} is damaged: its content does not match the checksum it was saved with "
                         "(bytes changed on disk, or a partial copy); use an earlier save")
    return saved["state"]
