"""explain(): why a training step needs the memory it does, and what would make it fit, each fix verified.

An :class:`Explanation` says what the peak is made of (bytes by category, the phase, the op
and module that reached it), the tensors alive at it grouped with the op, module and line of
the model's code that made them (:mod:`memfit.anatomy`), the seed articles' causes of OOM
quantified for this step, and ranked fixes, each the configuration estimated again
(:mod:`memfit.remedies`): the change, the bytes it saves, the new requirement, the relative
step cost and whether it then fits.

It explains a workload under a Config (estimated on fake tensors, no GPU needed), an
:class:`memfit.Estimate`, or a measured :class:`memfit.MemoryReport`; fixes need the workload
(a report or estimate alone gets the anatomy and the causes).
:attr:`memfit.OutOfMemory.explanation` and :attr:`memfit.PlanError.explanation` are explanations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memfit.anatomy import Cause, LiveTensor, causes, largest_live
from memfit.checks import positive_int
from memfit.config import Config
from memfit.errors import UsageError
from memfit.estimator import Estimate, estimate
from memfit.fixes import Fix
from memfit.remedies import remedies
from memfit.report import MemoryReport
from memfit.units import format_budget, format_bytes, parse_bytes
from memfit.workload import Workload

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a step needs its memory and what would make it fit. All figures are int bytes.

    Example:
        >>> why = memfit.explain(memfit.presets.load("gpt2", seq_len=1024), memfit.Config(micro_batch=16),
        ...                      budget="24GiB")
        >>> sum(why.at_peak.values()) == why.peak, why.fixes[0].describe()
    """

    peak: int
    """Bytes of tensor storages at the peak."""
    required: int
    """Bytes the device needs: the peak plus, on CUDA, the caching allocator's extra and the context."""
    budget: int | None
    at_peak: dict[str, int]
    """Bytes by category at the peak; sums to ``peak``."""
    phase: str | None
    op: str | None
    """The op that reached the peak."""
    module: str | None
    """The module running when the peak was reached."""
    largest: tuple[LiveTensor, ...]
    """Storages alive at the peak, alike ones grouped, the largest total first."""
    causes: tuple[Cause, ...]
    """The seed articles' causes of OOM with their bytes at the peak, largest first."""
    fixes: tuple[Fix, ...] = ()
    """Each verified by an estimate: those that fit first, the fastest first; then the most saving."""
    combined: Fix | None = None
    """Where no fix fits alone: levers together that fit, estimated."""
    closest: Fix | None = None
    """Where no fix fits, alone or together: the fix or combination that needs the least, estimated (a note says
    so against the budget)."""
    options: tuple[Fix, ...] = ()
    """Levers that change what is trained (LoRA), by arithmetic: never applied by memfit."""
    config: Config | None = None
    device: str = "cuda"
    batch_size: int | None = None
    """The samples per optimizer step the fixes keep."""
    world_size: int = 1
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    report: MemoryReport | None = field(default=None, repr=False, compare=False)
    """The report explained (its timeline is what an HTML page draws)."""

    @property
    def fits(self) -> bool | None:
        """Whether the step as it is fits the budget; None without a budget."""
        return None if self.budget is None else self.required <= self.budget

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "peak": self.peak, "required": self.required, "budget": self.budget, "fits": self.fits,
            "at_peak": dict(self.at_peak), "phase": self.phase, "op": self.op, "module": self.module,
            "largest": [t.to_dict() for t in self.largest], "causes": [c.to_dict() for c in self.causes],
            "fixes": [f.to_dict() for f in self.fixes],
            "combined": self.combined.to_dict() if self.combined is not None else None,
            "closest": self.closest.to_dict() if self.closest is not None else None,
            "options": [f.to_dict() for f in self.options],
            "config": dataclasses.asdict(self.config) if self.config is not None else None,
            "device": self.device, "batch_size": self.batch_size, "world_size": self.world_size,
            "notes": list(self.notes), "extra": dict(self.extra),
        }

    def table(self, *, width: int = 100) -> str:
        """The explanation as text tables (rich): the peak, its tensors, the causes, the fixes."""
        from memfit.display_explain import render_explanation

        return render_explanation(self, width=width)


def explain(
    source: Workload | Estimate | MemoryReport,
    config: Config | None = None,
    budget: int | str | None = None,
    *,
    batch_size: int | None = None,
    workload: Workload | None = None,
    device: str = "cuda",
    world_size: int = 1,
    profile: Any = None,
    fixes: bool = True,
    top: int = 8,
) -> Explanation:
    """Explain the memory of a training step and find what would make it fit in ``budget``.

    Args:
        source: a :class:`memfit.Workload` (estimated under ``config`` on fake tensors, for ``device``), an
            :class:`memfit.Estimate` (its config), or a measured :class:`memfit.MemoryReport` (give ``config``
            and ``workload`` for fixes).
        config: the step's Config (a Workload's; for a report, the one it ran under).
        budget: the device memory to fit ("80GB", "24GiB", a card such as "h100", int bytes); None: no verdict,
            fixes ranked by bytes saved.
        batch_size: samples per optimizer step that every fix keeps (default ``config.micro_batch``: the step as
            run); a smaller micro-batch accumulates exactly to it.
        workload: the step's factories when ``source`` is an estimate or a report (needed for fixes).
        device: the target, "cuda" (default) or "cpu" (a Workload's estimate; others carry theirs).
        world_size: the ranks, for a Config with a strategy across them (the figures are one rank's).
        profile: the CUDA card's profile (see :func:`memfit.estimate`).
        fixes: False skips the fixes (the anatomy and causes only; no extra estimates).
        top: how many groups of live tensors to list.

    Raises:
        UsageError: a bad source, config, budget or batch size.
    """
    notes: list[str] = []
    if isinstance(source, Workload):
        if not isinstance(config, Config):
            raise UsageError(f"explain(workload, config): give a memfit.Config as the second argument, got "
                             f"{type(config).__name__}")
        workload = source
    elif isinstance(source, Estimate):
        config = source.config if config is None else config
        device = source.device
        world_size = source.extra.get("world_size", world_size)
    elif not isinstance(source, MemoryReport):
        raise UsageError(f"explain() takes a memfit.Workload, Estimate or MemoryReport, got {type(source).__name__}")
    if workload is not None and not isinstance(workload, Workload):
        raise UsageError(f"explain(workload=...) takes a memfit.Workload, got {type(workload).__name__}")
    if budget is not None:
        budget = _budget(budget)
    positive_int(top, "top", hint="groups of live tensors to list")
    if batch_size is not None:
        positive_int(batch_size, "batch_size", hint="samples per optimizer step")
    if batch_size is None:
        batch_size = config.micro_batch * (world_size if config is not None and config.strategy != "single" else 1) \
            if config is not None else None
    share = -(-batch_size // world_size) if batch_size is not None else None
    if config is not None and share is not None and config.micro_batch > share:
        raise UsageError(f"batch_size {batch_size} over {world_size} rank(s) gives {share} samples a rank, fewer than "
                         f"the micro-batch {config.micro_batch}; give a batch_size of at least "
                         f"{config.micro_batch * world_size}")

    accumulation = 2 if config is not None and share is not None and config.micro_batch < share \
        and not config.optimizer_in_backward else 1
    ranks = world_size if config is not None and config.strategy != "single" else 1
    make = lambda sources: estimate(workload, config, device=device, accumulation=accumulation,  # noqa: E731
                                    profile=profile, world_size=ranks, sources=sources)
    if isinstance(source, MemoryReport) and source.history is None:
        raise UsageError("this report was read back from a dict (MemoryReport.from_dict) and keeps no record of "
                         "its tensors; explain the step's workload, or a report from memfit.track or memfit.measure")
    base = source if isinstance(source, Estimate) else None
    found = None
    if fixes and workload is not None and config is not None:
        reference = base if base is not None else lambda: make(isinstance(source, Workload))
        found = remedies(workload, config, reference, batch_size=batch_size, budget=budget, device=device,
                         profile=profile, world_size=world_size)
        if found.closest is not None:
            notes.append(_none_fits(found.closest, budget))
        if isinstance(source, Workload):
            base = found.base
        elif base is None:  # a measured report: the fixes are estimates, against the estimate of its config
            notes.append(f"fixes are estimates, each against the estimate of the step as run "
                         f"({found.base.required:,} bytes; measured peak {source.peak:,})")
    elif fixes:
        notes.append("no fixes: give the workload (and the config it ran under) to have each fix estimated")
    if isinstance(source, Workload) and base is None:
        base = make(True)
    report = base.report if base is not None else source
    if report.history is None:
        raise UsageError("this estimate keeps no record of its tensors (its report was read back from a dict); "
                         "explain the step's workload")
    required = base.required if base is not None else report.peak
    return Explanation(
        peak=report.peak, required=required, budget=budget, at_peak=dict(report.at_peak), phase=report.peak_phase,
        op=report.peak_op, module=report.peak_module, largest=largest_live(report.history, top),
        causes=causes(report.at_peak, micro_batch=config.micro_batch if config is not None else None,
                      accumulation=accumulation, reserved=base.reserved if base is not None else None,
                      peak=report.peak, parameters=base.parameters if base is not None else None),
        fixes=found.fixes if found else (), combined=found.combined if found else None,
        closest=found.closest if found else None,
        options=found.options if found else (), config=config, device=base.device if base else report.device,
        batch_size=batch_size, world_size=world_size, notes=tuple(notes) + (base.notes if base else ()),
        extra={"workload": workload.name if workload is not None else report.extra.get("workload")}, report=report,
    )


def _none_fits(closest: Fix, budget: int) -> str:
    """The note where nothing fits: the least any combination needs against the budget."""
    per_gpu = " per GPU" if closest.world_size > 1 else ""
    return (f"no fix fits the budget of {format_budget(budget)}, alone or together: the least found, {closest.lever}, "
            f"needs {format_bytes(closest.required)}{per_gpu} ({format_bytes(closest.required - budget)} short)")


def _budget(budget: int | str) -> int:
    """Bytes from "80GB", "24GiB", int bytes, or a card's name ("h100": what CUDA reports for it)."""
    value = parse_bytes(budget)
    positive_int(value, "budget", hint="bytes of device memory")
    return value
