"""Saved training state: written atomically with a checksum of its content, refused when damaged.

``torch.save`` stores tensors uncompressed and without a checksum that
``torch.load`` verifies: a file with bytes zeroed in the middle loads silently,
with corrupted weights or optimizer state. memfit's files carry a digest of
their content (every tensor's dtype, shape and bytes, and every other value),
computed before writing and checked after reading, and are written to a
temporary file renamed over the old one, so a run killed while saving keeps the
previous save. A save that fails (a full disk, a read-only directory) removes its
temporary file and raises :class:`WriteError`, naming the file and the fix.

Files hold tensors, numbers, strings, lists and dicts only, and load with
``torch.load(path, weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import zipfile
from typing import Any

import torch

from memfit._tree import tensors
from memfit.errors import DISK_FULL, UsageError, WriteError
from memfit.units import format_bytes

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
    """Write ``state`` with its digest to ``path`` atomically (a temporary file beside it, renamed over it).

    Raises:
        WriteError: the file could not be written (``"disk full"`` where the disk had no room); the
            temporary file is removed and a file already at ``path`` is left as it was.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        # Written through a Python file, not torch's own writer: a full disk then raises OSError with its
        # errno (torch's C++ writer says "[enforce fail at inline_container.cc] unexpected pos", no cause).
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "sha256": digest(state), "state": state}, f)
            f.flush()
            # On disk before the rename: after a crash the name points at the whole new file or the old one.
            # Some file systems report a full disk only here.
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: a reader sees the old file or the new one
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:  # not made, or already gone: the error being raised says what failed
            pass
        if not isinstance(exc, (OSError, RuntimeError)):
            raise  # Ctrl-C, SystemExit, a value torch cannot save (a bug): not a failed write
        raise _save_error(exc, state, path) from exc


def _save_error(exc: Exception, state: Any, path: str) -> WriteError:
    """The one-line error for a failed :func:`write` of ``state`` to ``path``: a full disk said as such."""
    code = _errno(exc)
    folder = os.path.dirname(os.path.abspath(path))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(state)}
    needed = sum(storages.values())  # what torch.save writes: each storage once (the rest is small)
    try:
        free = shutil.disk_usage(folder).free  # the temporary file is removed: the room the save had
    except OSError:
        free = None
    previous = "the previous save there is intact" if os.path.exists(path) else "nothing was written"
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if code in DISK_FULL or (code is None and free is not None and free < needed):
        # torch's own writer raises without an errno: the free space tells a full disk from other failures.
        room = f"{format_bytes(free)} free on {folder}, " if free is not None else ""
        error = WriteError(f"cannot save the training state to {path}: disk full ({room}the state needs about "
                          f"{format_bytes(needed)}; {detail}); free space there or save to another disk, e.g. "
                          f"trainer.save('/other/disk/run.pt'); {previous}")
        error.errno = code if code is not None else errno.ENOSPC
    else:
        error = WriteError(f"cannot save the training state to {path} ({detail}); check that {folder} exists, "
                          f"is writable and has room; {previous}")
        error.errno = code
    return error


def _errno(exc: BaseException | None) -> int | None:
    """The errno of ``exc`` or of an error it was raised from (closing a file after torch's error, say)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


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
