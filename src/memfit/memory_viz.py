"""A memfit history in PyTorch's memory snapshot format, for https://pytorch.org/memory_viz.

``torch.cuda.memory._snapshot()`` (what ``_dump_snapshot`` pickles) is a dict of ``segments``
(the allocator's state at the end: each segment's blocks) and ``device_traces`` (per device, the
allocator's events in order: ``alloc``, ``free_requested``, ``free_completed``, each with an
address, a size and the frames that made it). :func:`snapshot` writes a
:class:`memfit.report.History` (measured, or estimated on fake tensors) in that shape, as
``torch.cuda._memory_viz._profile_to_snapshot`` does for the profiler's memory timeline:

* each storage is one block at an address of its own (storages are not placed by an allocator
  here: the addresses only tell blocks apart); a storage that grows or shrinks (FSDP's gathered
  parameters) is freed and allocated again at its new size;
* each block's frame names the op that allocated it and the module it ran in (``filename`` is the
  module path, ``name`` the op), and carries memfit's category (``"category"``, as the profiler's
  snapshots do);
* ``segments`` hold the blocks alive at the end, in one segment per device.

Replaying the trace's allocations and completed frees gives the history's live bytes at every
point, so its peak is the report's.

The files memfit exports (this snapshot, :func:`memfit.html_page.write`'s page) are written by
:func:`write_atomically`: to a temporary file beside the target, renamed over it, so that a full disk
or a folder that turns read-only leaves nothing partial; :func:`check_writable` refuses, before any
work, a path that could not be written.
"""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import shutil
from pathlib import Path
from typing import Any

from memfit.errors import DISK_FULL, UsageError, WriteError
from memfit.units import format_bytes

__all__ = ["snapshot", "write", "trace_peak", "check_writable", "write_atomically"]

_BASE = 0x7F0000000000  # where the synthetic addresses start (a CUDA-like range)
_ALIGN = 512


def snapshot(history: Any) -> dict[str, Any]:
    """``history`` (a :class:`memfit.report.History`; the report imports this module, so it is not
    imported here) as a PyTorch memory snapshot dict (see the module docstring)."""
    trace: list[dict[str, Any]] = []
    live: dict[int, dict[str, Any]] = {}  # sid -> its alloc event
    size: dict[int, int] = {}
    next_addr = _BASE
    ops, paths, categories = history.ops, history.paths, history.categories

    def frames(op_index: int, sid: int) -> list[dict[str, Any]]:
        op = str(ops[op_index][0]) if op_index < len(ops) else "<after the last op>"
        module = history.sid_module[sid]
        return [{"filename": paths[module] if module >= 0 else "<outside the model>", "line": 0, "name": op}]

    def free(sid: int) -> None:
        event = live.pop(sid)
        for action in ("free_requested", "free_completed"):
            trace.append({"action": action, "addr": event["addr"], "size": event["size"], "stream": 0,
                          "frames": event["frames"]})

    for op_index, sid, delta in history.events:
        new = size.get(sid, 0) + delta
        size[sid] = new
        if sid in live:
            free(sid)
        if new > 0:
            event = {"action": "alloc", "addr": next_addr, "size": new, "stream": 0,
                     "frames": frames(op_index, sid), "category": categories[history.sid_cat[sid]]}
            next_addr += -(-new // _ALIGN) * _ALIGN
            live[sid] = event
            trace.append(event)
    blocks = []
    last = _BASE
    for event in sorted(live.values(), key=lambda e: e["addr"]):
        if event["addr"] > last:
            blocks.append({"size": event["addr"] - last, "state": "inactive"})
        blocks.append({"size": event["size"], "state": "active_allocated", "requested_size": event["size"],
                       "frames": event["frames"]})
        last = event["addr"] + event["size"]
    total = max(next_addr - _BASE, last - _BASE)
    if last - _BASE < total:
        blocks.append({"size": total - (last - _BASE), "state": "inactive"})
    active = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    segment = {"device": 0, "address": _BASE, "total_size": total, "allocated_size": active, "active_size": active,
               "requested_size": active, "stream": 0, "segment_type": "large", "blocks": blocks}
    return {"segments": [segment] if total else [], "device_traces": [trace]}


def write(history: Any, path: str | os.PathLike) -> str:
    """Pickle :func:`snapshot` to ``path`` (what ``torch.cuda.memory._dump_snapshot`` writes); returns the path.

    Raises:
        UsageError: ``path`` cannot be written (see :func:`check_writable`), before the snapshot is made.
        WriteError: the write failed (a full disk); nothing partial is left at ``path``.
    """
    path = os.fspath(path)
    check_writable(path, f"cannot write the memory snapshot to {path!r}")
    return write_atomically(path, pickle.dumps(snapshot(history)), "the memory snapshot")


def _reason(exc: OSError) -> str:
    """Why a write failed, in words: "disk full" for ENOSPC (and a full quota), else the system's."""
    if exc.errno in DISK_FULL:
        return "disk full"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc) or type(exc).__name__


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Refuse ``path``, before any work, where a file could not be written there: its folder missing, the path
    a directory, the folder not writable (a probe file is made there and removed: permissions, a read-only
    file system, no room for a file). ``what`` starts the one-line message: the flag as the user typed it
    (``"--html out/page.html"``). Returns the path.

    Known limitations: a disk with room for the probe may still fill before the file is written
    (:func:`write_atomically` then leaves nothing partial)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what}: {str(path)!r} is a directory; give the path of a file (in it, or beside it)")
    folder = path.resolve().parent
    if not folder.is_dir():  # a typo in a folder name should not create folders
        raise UsageError(f"{what}: the folder {str(path.parent)!r} does not exist; create it first")
    probe = folder / f".memfit-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise UsageError(f"{what}: cannot write in the folder {str(folder)!r} ({_reason(exc)}); give a path in a "
                         "writable folder") from exc
    os.remove(probe)
    return path


def write_atomically(path: str | os.PathLike, data: bytes, what: str) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to disk and renamed over
    ``path`` (``os.replace``: atomic on POSIX and Windows); returns the path. ``what`` names the file in an
    error ("the page").

    Raises:
        WriteError: the write failed ("disk full" where the disk had no room); the temporary file is removed and
            a file already at ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    existed = os.path.exists(path)
    try:
        # Created as open() would create it (0o666 less the umask), so the renamed file has the usual mode.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename; some file systems report a full disk only here
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:  # not made, or already gone: the error being raised says what failed
            pass
        if not isinstance(exc, OSError):
            raise  # Ctrl-C, SystemExit, a bug: not a failed write
        left = "the file already there is as it was" if existed else "nothing was written"
        if exc.errno in DISK_FULL:
            try:
                room = f"{format_bytes(shutil.disk_usage(folder).free)} free on {folder}, "
            except OSError:
                room = ""
            message = (f"cannot write {what} to {path}: disk full ({room}it needs {format_bytes(len(data))}); free "
                       f"space there or give a path on another disk; {left}")
        else:
            message = (f"cannot write {what} to {path} ({_reason(exc)}: {type(exc).__name__}); check that {folder} "
                       f"is writable; {left}")
        error = WriteError(message)
        error.errno = exc.errno
        raise error from exc
    return path


def trace_peak(data: dict[str, Any], device: int = 0) -> int:
    """The most bytes allocated at once in a snapshot's trace (allocations minus completed frees)."""
    live = peak = 0
    for event in data["device_traces"][device]:
        if event["action"] == "alloc":
            live += event["size"]
            peak = max(peak, live)
        elif event["action"] == "free_completed":
            live -= event["size"]
    return peak
