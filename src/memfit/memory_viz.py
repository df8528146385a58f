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
"""

from __future__ import annotations

import os
import pickle
from typing import Any

__all__ = ["snapshot", "write", "trace_peak"]

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
    """Pickle :func:`snapshot` to ``path`` (what ``torch.cuda.memory._dump_snapshot`` writes); returns the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        pickle.dump(snapshot(history), f)
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
