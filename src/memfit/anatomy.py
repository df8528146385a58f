"""The anatomy of a peak: the tensors alive at it, grouped, and the seed articles' causes of OOM quantified.

Both read a :class:`memfit.report.History` (what a tracker or an estimate recorded), so they
work alike on a measured step and on a fake one. The seed articles name the causes of
running out of memory: the model's size, the batch (and the input's) size, intermediates
kept alive, a cache never freed, accumulation and several GPUs. :func:`causes` gives each
its bytes at the peak for this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memfit.sources import blockless, lookup
from memfit.units import format_bytes

__all__ = ["LiveTensor", "Cause", "largest_live", "causes"]

_NO_OP = {"parameters", "buffers", "inputs"}  # registered when tracking began, not made by an op of the step


@dataclass(frozen=True, slots=True)
class LiveTensor:
    """Storages alive at the peak that are alike: the same category, size, creating op and module (up to a block's
    index), e.g. one activation of each of 32 transformer layers."""

    bytes: int
    """Bytes of each."""
    count: int
    category: str
    op: str | None
    """The aten op that allocated them; None for parameters, buffers and the batch."""
    module: str | None
    """The module that allocated them (``model.layers.*.mlp`` where they are one per block), None outside the model."""
    source: tuple[str, ...] = ()
    """The model's lines that ran the op (``file.py:123 in forward``), where recorded."""

    @property
    def total(self) -> int:
        return self.bytes * self.count

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "count": self.count, "total": self.total, "category": self.category,
                "op": self.op, "module": self.module, "source": list(self.source)}


@dataclass(frozen=True, slots=True)
class Cause:
    """One of the seed articles' causes of OOM, and its bytes at this step's peak."""

    cause: str
    bytes: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "bytes": self.bytes, "detail": self.detail}


def largest_live(history: Any, top: int = 8) -> tuple[LiveTensor, ...]:
    """The ``top`` groups of storages alive at the history's peak, largest total first."""
    size: dict[int, int] = {}
    first_op: dict[int, int] = {}
    for op_index, sid, delta in history.events[:history.peak_event]:
        size[sid] = size.get(sid, 0) + delta
        first_op.setdefault(sid, op_index)
    groups: dict[tuple, list[int]] = {}
    for sid, nbytes in size.items():
        if nbytes <= 0:
            continue
        category = history.categories[history.sid_cat[sid]]
        op_index = first_op[sid]
        op = None if category in _NO_OP or op_index >= len(history.ops) else str(history.ops[op_index][0])
        module = history.sid_module[sid]
        path = history.paths[module] if module >= 0 else None
        key = (category, nbytes, op, blockless(path))
        groups.setdefault(key, []).append(sid)
    ranked = sorted(groups.items(), key=lambda kv: (-kv[0][1] * len(kv[1]), kv[0][0], str(kv[0][2])))
    out = []
    for (category, nbytes, op, _), sids in ranked[:top]:
        paths = sorted({history.paths[m] for s in sids if (m := history.sid_module[s]) >= 0})
        module = paths[0] if len(paths) == 1 else _pattern(paths) if paths else None
        source = lookup(history.sources, paths[0], op) if history.sources and paths and op else ()
        out.append(LiveTensor(nbytes, len(sids), category, op, module, source))
    return tuple(out)


def causes(at_peak: dict[str, int], *, micro_batch: int | None, accumulation: int = 1, reserved: int | None = None,
           peak: int, parameters: int | None = None) -> tuple[Cause, ...]:
    """The seed's causes of OOM with their bytes at the peak (``at_peak``: bytes by category), largest first.

    ``reserved`` is the CUDA caching allocator's predicted ``max_memory_reserved`` (None on the CPU);
    ``micro_batch`` None where the step's is not known (a measured report without its Config).
    """
    get = at_peak.get
    states = get("parameters", 0) + get("buffers", 0) + get("gradients", 0) + get("optimizer_state", 0)
    count = f"{parameters:,} parameters: " if parameters else ""
    out = [Cause("model size", states,
                 f"{count}parameters {format_bytes(get('parameters', 0))}, gradients "
                 f"{format_bytes(get('gradients', 0))}, optimizer state {format_bytes(get('optimizer_state', 0))}"
                 " (lower precision, a lighter optimizer or sharding over GPUs shrink them; a smaller batch does not)")]
    batch = get("activations", 0) + get("inputs", 0)
    each = f": {format_bytes(batch // micro_batch)} per sample at micro-batch {micro_batch}" if micro_batch else ""
    out.append(Cause("batch and input size", batch,
                     f"activations saved for backward and the batch{each} (they scale with the micro-batch and the "
                     "input's size; checkpointing recomputes them instead)"))
    out.append(Cause("intermediates alive", get("temporaries", 0),
                     "outputs and workspaces of the ops running at the peak, not saved for backward "
                     "(`del outputs, loss` frees nothing a training loop still needs: these are in use)"))
    if reserved is not None and reserved > peak:
        out.append(Cause("allocator cache", reserved - peak,
                         "blocks the CUDA caching allocator holds beyond the live tensors at the peak (rounding and "
                         "fragmentation); torch.cuda.empty_cache() gives cached blocks back to the driver between "
                         "steps but lowers no peak, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True can narrow it"))
    if accumulation > 1:
        out.append(Cause("gradient accumulation", get("gradients", 0),
                         f"gradients kept across {accumulation} micro-steps (counted in the model size above)"))
    shared = get("unsharded_parameters", 0) + get("communication", 0)
    if shared:
        out.append(Cause("several GPUs", shared, "parameters gathered for a block's forward or backward and the "
                                                 "buffers of collectives (FSDP)"))
    return tuple(sorted(out, key=lambda c: -c.bytes))


def _pattern(paths: list[str]) -> str:
    """Module paths that differ in a block's index, as one with ``*`` there (``model.layers.*.mlp``)."""
    parts = [p.split(".") for p in paths]
    if len({len(p) for p in parts}) != 1:
        return paths[0] + f" (and {len(paths) - 1} more)"
    return ".".join(col[0] if len(set(col)) == 1 else "*" for col in zip(*parts))
