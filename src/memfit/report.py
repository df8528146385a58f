"""MemoryReport: what a tracker measured, as plain data in int bytes.

The report is built by replaying the tracker's event history (allocations,
frees and resizes, each tagged with the op that preceded it), so that a
storage's role is its final one over its whole life. Rendering (``table``,
``plot``) lives in :mod:`memfit.display`; the report itself only holds data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from memfit.categories import CATEGORIES, PHASES
from memfit.errors import MemfitError

__all__ = ["CATEGORIES", "PHASES", "TimelineEntry", "MemoryReport", "History"]




@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """Live bytes right after one aten op."""

    index: int
    """Position of the op among all ops the tracker saw (0-based)."""
    op: str
    """The aten op, e.g. ``"aten.mm.default"``."""
    module: str | None
    """Dotted path of the innermost module running it (``""`` = the root model), or None outside the model."""
    phase: str
    """One of :data:`PHASES`."""
    step: int
    """Optimizer steps completed before this op."""
    live: dict[str, int]
    """Bytes alive after the op, by category."""

    @property
    def total(self) -> int:
        """Bytes alive after the op, all categories."""
        return sum(self.live.values())


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """Peak memory of tracked steps, by category, phase and module. All figures are int bytes.

    Example:
        >>> report = memfit.measure(memfit.presets.load("cifar-cnn"), micro_batch=64)
        >>> report.peak == sum(report.at_peak.values())
        True
    """

    device: str
    """The device counted, e.g. ``"cpu"`` or ``"cuda:0"``."""
    peak: int
    """Highest live bytes."""
    at_peak: dict[str, int]
    """Bytes by category at the moment of the peak; sums to ``peak``."""
    peak_by_category: dict[str, int]
    """Each category's own maximum (these maxima need not coincide in time)."""
    peak_by_phase: dict[str, int]
    """Highest live bytes after an op of each phase (0 for a phase that never ran)."""
    by_module: dict[str, int]
    """Module path -> highest live bytes allocated in its forward or backward, its submodules included."""
    timeline: tuple[TimelineEntry, ...]
    """Live bytes after every op."""
    at_end: dict[str, int]
    """Bytes by category still alive when the report was made."""
    peak_index: int
    """Index of the op at (or just before) the peak in ``timeline``; -1 with no ops."""
    peak_op: str | None
    """The op that reached the peak."""
    peak_module: str | None
    """The module running when the peak was reached."""
    peak_phase: str | None
    """The phase in which the peak was reached."""
    steps: int
    """Optimizer steps seen."""
    fake: bool = False
    """True when the tensors were FakeTensors: the figures are what real tensors would take."""
    kept_by_module: dict[str, int] = field(default_factory=dict)
    """Module path -> bytes its forward allocated that were still alive when backward began (the most over
    the steps and micro-steps), its submodules included: what the forward keeps for backward, which
    checkpointing the module would free (less its output, which the next module keeps)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts added by the caller (workload name, micro-batch)."""
    history: History | None = field(default=None, repr=False, compare=False)
    """The raw record the report was built from (what :meth:`to_memory_viz` writes)."""

    def to_memory_viz(self, path: str | Path) -> str:
        """Write the report's record in PyTorch's memory snapshot format (a pickle that
        https://pytorch.org/memory_viz and ``torch.cuda._memory_viz`` open); returns the path.
        Its trace's peak is the report's (:mod:`memfit.memory_viz`)."""
        from memfit import memory_viz

        if self.history is None:
            raise MemfitError("this report was read back from a dict (MemoryReport.from_dict), which keeps no "
                              "record of its allocations; profile or estimate the step again to export it")
        return memory_viz.write(self.history, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, ints and strings, ready for JSON."""
        return {
            "device": self.device,
            "peak": self.peak,
            "at_peak": dict(self.at_peak),
            "peak_by_category": dict(self.peak_by_category),
            "peak_by_phase": dict(self.peak_by_phase),
            "by_module": dict(self.by_module),
            "kept_by_module": dict(self.kept_by_module),
            "at_end": dict(self.at_end),
            "peak_index": self.peak_index,
            "peak_op": self.peak_op,
            "peak_module": self.peak_module,
            "peak_phase": self.peak_phase,
            "steps": self.steps,
            "fake": self.fake,
            "extra": dict(self.extra),
            "timeline": [
                {
                    "index": e.index,
                    "op": e.op,
                    "module": e.module,
                    "phase": e.phase,
                    "step": e.step,
                    "live": dict(e.live),
                }
                for e in self.timeline
            ],
        }

    def to_json(self, *, indent: int | None = None, timeline: bool = True) -> str:
        """JSON text of :meth:`to_dict`; ``timeline=False`` leaves the (long) timeline out."""
        data = self.to_dict()
        if not timeline:
            del data["timeline"]
        return json.dumps(data, indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        """The inverse of :meth:`to_dict` (a report without a timeline gets an empty one)."""
        timeline = tuple(TimelineEntry(**entry) for entry in data.get("timeline", ()))
        fields = {k: v for k, v in data.items() if k != "timeline"}
        return cls(timeline=timeline, **fields)

    def table(self, *, top: int = 10, width: int = 100) -> str:
        """The report as text tables (rich): categories, phases, top modules."""
        from memfit.display import render_report

        return render_report(self, top=top, width=width)

    def plot(self, path: str | Path) -> Path:
        """Plot categories stacked over the op timeline to ``path`` (.png, .svg or .pdf)."""
        from memfit.display import plot_report

        return plot_report(self, path)


class History(NamedTuple):
    """A tracker's raw record, from which :func:`build_report` makes a report.

    Storages are numbered by serial id (``sid``) in the order they were allocated;
    ``events`` are ``(op index, sid, byte delta)`` (a storage's first event allocates it,
    a negative one frees or shrinks it), ``ops`` are ``(aten op, module index, phase index,
    optimizer steps before it)``, and module indices point into ``paths`` (-1: outside the model).
    """

    device: str
    fake: bool
    steps: int
    categories: tuple[str, ...]
    paths: list[str]
    sid_cat: list[int]
    sid_module: list[int]
    events: list[tuple[int, int, int]]
    ops: list[tuple[Any, int, int, int]]
    peak: int
    peak_event: int
    peak_op: int
    live_cat: list[int]
    sources: dict[tuple[str | None, str], tuple[str, ...]] | None = None
    """``(module path, op) -> the model's lines that ran it`` where recorded (:mod:`memfit.sources`), else None."""

    def detached(self) -> History:
        """A copy of the growing lists: a tracker's ledger still hears of storages freed after its block (the
        model, the optimizer going away), which the record of what ran must not show."""
        return self._replace(paths=list(self.paths), sid_cat=list(self.sid_cat), sid_module=list(self.sid_module),
                             events=list(self.events), ops=list(self.ops), live_cat=list(self.live_cat))


def build_report(
    *,
    device: str,
    fake: bool,
    steps: int,
    categories: tuple[str, ...] = CATEGORIES,
    paths: list[str],
    sid_cat: list[int],
    sid_module: list[int],
    events: list[tuple[int, int, int]],
    ops: list[tuple[Any, int, int, int]],
    peak: int,
    peak_event: int,
    peak_op: int,
    live_cat: list[int],
    sources: dict[tuple[str | None, str], tuple[str, ...]] | None = None,
) -> MemoryReport:
    """Replay a tracker's history into a report (called by ``MemoryTracker.report``)."""
    n_cat = len(categories)
    # Each module's ancestors (itself included), for inclusive per-module figures.
    ancestors: list[tuple[int, ...]] = []
    index_of = {p: i for i, p in enumerate(paths)}
    for p in paths:
        chain = [index_of[p]]
        while p:
            p = p.rpartition(".")[0]
            if p in index_of:
                chain.append(index_of[p])
        ancestors.append(tuple(chain))

    cat_live = [0] * n_cat
    cat_max = [0] * n_cat
    mod_live = [0] * len(paths)
    mod_max = [0] * len(paths)
    at_peak = [0] * n_cat
    timeline: list[TimelineEntry] = []
    phase_max = [0] * len(PHASES)
    names: dict[Any, str] = {}
    kept = [0] * len(paths)
    forward_live = [0] * len(paths)  # bytes allocated in forward ops, still alive
    in_forward: set[int] = set()
    seen_sids: set[int] = set()
    last_phase = -1

    def emit(i: int) -> None:
        nonlocal last_phase
        func, module, phase, step = ops[i]
        if phase == 1 and last_phase == 0:  # backward begins: what the forward allocated and kept
            for m, live in enumerate(forward_live):
                if live > kept[m]:
                    kept[m] = live
        last_phase = phase
        name = names.get(func)
        if name is None:
            name = names[func] = str(func)
        live = dict(zip(categories, cat_live))
        timeline.append(TimelineEntry(i, name, paths[module] if module >= 0 else None, PHASES[phase], step, live))
        total = sum(cat_live)
        if total > phase_max[phase]:
            phase_max[phase] = total

    next_op = 0
    for position, (op_index, sid, delta) in enumerate(events):
        while next_op < op_index:
            emit(next_op)
            next_op += 1
        if position == peak_event:
            at_peak = list(cat_live)
        cat = sid_cat[sid]
        cat_live[cat] += delta
        if cat_live[cat] > cat_max[cat]:
            cat_max[cat] = cat_live[cat]
        module = sid_module[sid]
        if module >= 0:
            for m in ancestors[module]:
                mod_live[m] += delta
                if mod_live[m] > mod_max[m]:
                    mod_max[m] = mod_live[m]
            if sid in in_forward or (delta > 0 and op_index < len(ops) and ops[op_index][2] == 0
                                     and sid not in seen_sids):
                in_forward.add(sid)
                for m in ancestors[module]:
                    forward_live[m] += delta
        seen_sids.add(sid)
    if peak_event == len(events):
        at_peak = list(cat_live)
    while next_op < len(ops):
        emit(next_op)
        next_op += 1
    assert sum(at_peak) == peak, (sum(at_peak), peak)  # replay must agree with the live count

    peak_index = min(peak_op, len(ops) - 1)
    if peak_index >= 0:
        entry = timeline[peak_index]
        peak_name, peak_module, peak_phase = entry.op, entry.module, entry.phase
    else:
        peak_name = peak_module = peak_phase = None
    return MemoryReport(
        history=History(device, fake, steps, tuple(categories), paths, sid_cat, sid_module, events, ops, peak,
                        peak_event, peak_op, live_cat, sources),
        device=device,
        peak=peak,
        at_peak=dict(zip(categories, at_peak)),
        peak_by_category=dict(zip(categories, cat_max)),
        peak_by_phase=dict(zip(PHASES, phase_max)),
        by_module={paths[m]: mod_max[m] for m in range(len(paths)) if mod_max[m] > 0},
        kept_by_module={paths[m]: kept[m] for m in range(len(paths)) if kept[m] > 0},
        timeline=tuple(timeline),
        at_end=dict(zip(categories, live_cat)),
        peak_index=peak_index,
        peak_op=peak_name,
        peak_module=peak_module,
        peak_phase=peak_phase,
        steps=steps,
        fake=fake,
    )
