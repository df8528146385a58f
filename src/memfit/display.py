"""Rendering of memfit's results for people: rich tables as text, matplotlib plots.

Nothing here measures anything, and nothing here prints: functions return
text or write the file they are asked to write. rich and matplotlib are
imported lazily so that measuring never pays for them.

The results render themselves through this module (``report.table()``,
``estimate.table()``, ``plan.table()``), so it imports none of them: it reads
their fields, and the type each function takes is named in its docstring.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from memfit.categories import PHASES
from memfit.errors import UsageError
from memfit.units import format_budget, format_bytes

__all__ = ["render_report", "render_estimate", "render_plan", "plot_report", "PLOT_SUFFIXES"]

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_report(report: Any, *, top: int = 10, width: int = 100) -> str:
    """A :class:`memfit.MemoryReport` as plain text: a summary line, categories, phases and the top modules."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    where = f"{report.peak_phase}" + (f", in {report.peak_module or '<root>'}" if report.peak_module is not None else "")
    kind = "fake tensors (no memory used)" if report.fake else report.device
    console.print(
        f"Peak {format_bytes(report.peak)} ({report.peak:,} bytes) on {kind}, "
        f"over {report.steps} optimizer step(s); reached by {report.peak_op} during {where}."
    )

    categories = Table(title="Memory by category", title_justify="left", min_width=64)
    categories.add_column("category")
    categories.add_column("at peak", justify="right")
    categories.add_column("share", justify="right")
    categories.add_column("own max", justify="right")
    categories.add_column("at end", justify="right")
    for name in report.peak_by_category:  # the tracker's categories, added ones included
        categories.add_row(
            name,
            format_bytes(report.at_peak[name]),
            _share(report.at_peak[name], report.peak),
            format_bytes(report.peak_by_category[name]),
            format_bytes(report.at_end[name]),
        )
    categories.add_row("total", format_bytes(report.peak), "100%", "", format_bytes(sum(report.at_end.values())))
    console.print(categories)

    phases = Table(title="Peak by phase", title_justify="left", min_width=64)
    phases.add_column("phase")
    phases.add_column("peak", justify="right")
    for name in PHASES:
        phases.add_row(name, format_bytes(report.peak_by_phase[name]))
    console.print(phases)

    if report.by_module:
        modules = Table(title="Top modules: bytes their forward and backward allocated", title_justify="left", min_width=64)
        modules.add_column("module")
        modules.add_column("peak allocated", justify="right")
        ranked = sorted(report.by_module.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        for path, nbytes in ranked:
            modules.add_row(path or "<root>", format_bytes(nbytes))
        console.print(modules)
    return buffer.getvalue()


def render_estimate(est: Any, *, top: int = 10, width: int = 100) -> str:
    """A :class:`memfit.Estimate` as plain text: what it needs, categories at the peak, phases, top modules."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    report = est.report
    ranks = f", one rank of {est.extra['world_size']}" if est.config.strategy != "single" else ""
    console.print(
        f"Estimate for {est.extra.get('workload', 'workload')} ({est.parameters:,} parameters) on {est.device}{ranks}: "
        f"{est.config.describe()}."
    )
    if est.allocator is not None:
        console.print(
            f"Needs {format_bytes(est.required)}: tensors peak at {format_bytes(est.peak)}, "
            f"{format_bytes(est.allocator.allocated)} allocated with cuBLAS workspaces, "
            f"{format_bytes(est.allocator.reserved)} reserved by the caching allocator, "
            f"+ {format_bytes(est.context)} CUDA context"
            + (f" (device profile {est.profile.name}: {est.profile.source})." if est.profile is not None
               and est.profile.name != "default" else ".")
        )
    else:
        console.print(f"Needs {format_bytes(est.required)} ({est.required:,} bytes) at the peak.")
    if est.checkpointed:
        shown = ", ".join(est.checkpointed[:6]) + (f" and {len(est.checkpointed) - 6} more" if len(est.checkpointed) > 6 else "")
        console.print(f"Checkpointed: {shown}.")
    console.print(f"Peak reached by {report.peak_op} during {report.peak_phase}" + (f", in {report.peak_module or '<root>'}." if report.peak_module is not None else "."))
    for note in est.notes:  # how it was traced: extrapolated by depth or micro-batch, or why in full
        console.print(f"Note: {note}.")

    categories = Table(title="Memory at the peak", title_justify="left", min_width=64)
    categories.add_column("category")
    categories.add_column("at peak", justify="right")
    categories.add_column("share", justify="right")
    categories.add_column("own max", justify="right")
    for name in report.peak_by_category:
        categories.add_row(name, format_bytes(est.at_peak[name]), _share(est.at_peak[name], est.peak), format_bytes(report.peak_by_category[name]))
    categories.add_row("total", format_bytes(est.peak), "100%", "")
    console.print(categories)

    phases = Table(title="Peak by phase", title_justify="left", min_width=64)
    phases.add_column("phase")
    phases.add_column("first step", justify="right")
    phases.add_column("steady state", justify="right")
    for name in (*PHASES, "step"):
        phases.add_row(name, format_bytes(est.phases["first"][name]), format_bytes(est.phases["steady"][name]))
    console.print(phases)

    if est.by_module:
        modules = Table(title="Top modules: bytes their forward and backward allocated", title_justify="left", min_width=64)
        modules.add_column("module")
        modules.add_column("peak allocated", justify="right")
        for path, nbytes in sorted(est.by_module.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            modules.add_row(path or "<root>", format_bytes(nbytes))
        console.print(modules)
    return buffer.getvalue()


def render_plan(plan: Any, *, width: int = 100) -> str:
    """A :class:`memfit.Plan` as text: the choice, why, and the alternatives considered."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    c = plan.config
    steps = len(plan.accumulation)
    split = f"{steps} x {c.micro_batch}" if len(set(plan.accumulation)) == 1 else f"{steps - 1} x {c.micro_batch} + {plan.accumulation[-1]}"
    console.print(f"Plan for batch {plan.batch_size} in {format_budget(plan.budget)}: {c.describe()}; "
                  f"accumulate {split}.")
    console.print(f"Predicted {format_bytes(plan.required)} needed, {format_bytes(plan.headroom)} headroom; "
                  f"relative step cost {plan.step_cost:.2f} (1.00 = the whole batch at once, unconstrained; "
                  f"{plan.extra.get('estimates', 0)} estimates).")
    for reason in plan.reasons:
        console.print(f"  - {reason}")
    table = Table(title="Alternatives considered (fastest first)", title_justify="left", min_width=64)
    ranks = plan.extra.get("world_size", 1) > 1
    columns = ("strategy",) * ranks + ("precision", "checkpoint", "micro-batch", "micro-steps", "needs", "cost")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("strategy", "precision", "checkpoint") else "left")
    for a in plan.alternatives[:12]:
        n = len(a.config.checkpoint)
        ckpt = f"{n} block{'s' if n > 1 else ''}" if n else "none"
        strategy = a.config.strategy + ("" if a.config.reshard_after_forward else " no-reshard") + (
            " sync-each" if a.config.sync_every_micro_step else "")
        table.add_row(*(strategy,) * ranks, a.config.precision + (" +offload" if a.config.offload_activations else ""),
                      ckpt, str(a.config.micro_batch), str(len(a.accumulation)), format_bytes(a.required),
                      f"{a.step_cost:.2f}")
    console.print(table)
    return buffer.getvalue()


def plot_report(report: Any, path: str | Path) -> Path:
    """A :class:`memfit.MemoryReport`'s categories stacked over the op timeline, the peak marked, modules labelled.

    The format follows the suffix: ``.png``, ``.svg`` or ``.pdf``. Written atomically.

    Raises:
        memfit.WriteError: the write failed ("disk full" named); a file already at ``path`` is as it was.
    """
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"cannot plot to {str(path)!r}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")
    if not path.resolve().parent.is_dir():  # a typo in a folder name should not create folders
        raise UsageError(f"cannot plot to {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first")
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    timeline = report.timeline
    xs = [e.index for e in timeline]
    scale, unit = _plot_unit(report.peak)
    names = list(report.peak_by_category)
    ys = [[e.live[name] / scale for e in timeline] for name in names]

    fig, ax = plt.subplots(figsize=(12, 5.5))
    try:
        if timeline:
            ax.stackplot(xs, ys, labels=names, step="post", alpha=0.85)
            _shade_phases(ax, timeline)
            _label_modules(ax, timeline, report.peak / scale)
            ax.axvline(report.peak_index, color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"peak {format_bytes(report.peak)}",
                xy=(report.peak_index, report.peak / scale),
                xytext=(8, 6),
                textcoords="offset points",
                fontsize=9,
            )
        ax.set_xlabel("op index")
        ax.set_ylabel(f"live memory ({unit})")
        source = "fake tensors" if report.fake else report.device
        ax.set_title(f"memfit: memory over {len(timeline)} ops on {source}, peak {format_bytes(report.peak)}")
        ax.set_ylim(0, max(report.peak / scale, 1e-9) * 1.25)
        ax.margins(x=0)
        ax.legend(loc="upper left", fontsize=8, ncol=4)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format=path.suffix.lower()[1:])
    finally:
        plt.close(fig)
    from memfit.memory_viz import write_atomically

    write_atomically(path, image.getvalue(), "the plot")  # a full disk leaves no half image
    return path


def _plot_unit(peak: int) -> tuple[int, str]:
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if peak >= factor:
            return factor, unit
    return 1, "bytes"


def _spans(timeline, key):
    """Runs of consecutive entries with the same key: (key, first index, last index)."""
    spans: list[tuple[object, int, int]] = []
    for entry in timeline:
        k = key(entry)
        if spans and spans[-1][0] == k:
            spans[-1] = (k, spans[-1][1], entry.index)
        else:
            spans.append((k, entry.index, entry.index))
    return spans


def _shade_phases(ax, timeline) -> None:
    colors = {"forward": "#ffffff", "backward": "#eef3fb", "optimizer": "#fbf3e6"}
    for phase, start, end in _spans(timeline, lambda e: e.phase):
        if phase != "forward":
            ax.axvspan(start, end + 1, color=colors[phase], zorder=0)


def _label_modules(ax, timeline, top: float) -> None:
    """Mark where each top-level submodule's work starts, with its name."""

    def top_level(entry):
        if not entry.module:
            return None
        return entry.module.split(".")[0]

    spans = [s for s in _spans(timeline, top_level) if s[0] is not None]
    width = max(timeline[-1].index, 1)
    last_x = -width
    for name, start, _end in spans:
        ax.axvline(start, color="grey", linewidth=0.4, alpha=0.5, zorder=1)
        if start - last_x >= width / 40:  # keep labels from piling on each other
            ax.text(start, top * 1.02, str(name), rotation=90, fontsize=6, va="bottom", ha="center", color="dimgrey")
            last_x = start
