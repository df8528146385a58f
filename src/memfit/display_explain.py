"""Rendering of an explanation (:class:`memfit.explain.Explanation`) as text tables.

Apart from :mod:`memfit.display` because an explanation has its own parts (live tensors, causes,
fixes); like it, this module measures nothing, prints nothing and imports no result type: it
reads the fields, and rich is imported when a table is made.
"""

from __future__ import annotations

import io
from typing import Any

from memfit.units import format_budget, format_bytes

__all__ = ["render_explanation", "render_fixes"]


def render_explanation(why: Any, *, width: int = 100) -> str:
    """An :class:`memfit.explain.Explanation` as plain text: the verdict, categories, live tensors, causes, fixes."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    where = f" in {why.module or '<root>'}" if why.module is not None else ""
    head = (f"Peak {format_bytes(why.peak)} of tensors, reached by {why.op} during {why.phase}{where}; "
            f"the device needs {format_bytes(why.required)}")
    if why.config is not None:
        head += f" ({why.config.describe()}" + (f", {why.world_size} GPUs" if why.world_size > 1 else "") + ")"
    if why.budget is not None:
        short = why.required - why.budget
        head += (f". Budget {format_budget(why.budget)}: " + (f"{format_bytes(short)} short." if short > 0 else
                                                               f"fits, {format_bytes(-short)} to spare."))
    console.print(head + ("" if head.endswith(".") else "."))

    categories = Table(title="What the peak is made of", title_justify="left", min_width=56)
    for column, justify in (("category", "left"), ("at peak", "right"), ("share", "right")):
        categories.add_column(column, justify=justify)
    for name, nbytes in why.at_peak.items():
        if nbytes:
            categories.add_row(name, format_bytes(nbytes), f"{100 * nbytes / why.peak:.1f}%" if why.peak else "-")
    console.print(categories)

    if why.largest:
        tensors = Table(title="Largest tensors alive at the peak", title_justify="left")
        for column in ("bytes", "category", "made by", "module", "line"):
            tensors.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
        for t in why.largest:
            size = format_bytes(t.bytes) + (f" x {t.count}" if t.count > 1 else "")
            tensors.add_row(size, t.category, t.op or "-", t.module or "-", "\n".join(t.source) or "-")
        console.print(tensors)

    reasons = Table(title="Causes of OOM (the seed articles'), for this step", title_justify="left")
    for column in ("cause", "bytes", "what it is"):
        reasons.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
    for cause in why.causes:
        reasons.add_row(cause.cause, format_bytes(cause.bytes), cause.detail)
    console.print(reasons)
    text = buffer.getvalue() + render_fixes(why, width=width)
    for note in why.notes:
        text += f"Note: {note}\n"
    return text


def render_fixes(why: Any, *, width: int = 100) -> str:
    """The fixes, the combination and the options of an explanation, as text tables ("" where there are none)."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    if why.fixes:
        table = Table(title="Fixes, each estimated" + (" (fitting ones first, fastest first)" if why.budget else ""),
                      title_justify="left")
        for column in ("fix", "saves", "needs", "step time", "fits"):
            table.add_column(column, justify="left" if column == "fix" else "right", overflow="fold")
        for fix in why.fixes:
            table.add_row(_lever(fix), format_bytes(fix.saves), _needs(fix), _cost(fix), _fits(fix))
        console.print(table)
    if why.combined is not None:
        fix = why.combined
        console.print(f"Together: {fix.lever} needs {_needs(fix)}, saves {format_bytes(fix.saves)}, step time "
                      f"{_cost(fix)} ({'fits' if fix.fits else 'does not fit'}; estimated). `memfit plan` finds "
                      "the fastest configuration that fits.")
    elif why.budget is not None and why.fixes and not any(f.fits for f in why.fixes):
        console.print("No combination of these fixes fits: more GPUs, a smaller model or a larger device.")
    for option in why.options:
        console.print(f"Option (changes the training, never applied): {option.lever}: {option.effect}; up to "
                      f"{format_bytes(option.saves)}" + ("" if option.verified else " by arithmetic") + ".")
    return buffer.getvalue()


def _lever(fix: Any) -> str:
    return f"{fix.lever}: {fix.effect}" if fix.effect else fix.lever


def _needs(fix: Any) -> str:
    if fix.required is None:
        return "-"
    return format_bytes(fix.required) + (" per GPU" if fix.world_size > 1 else "")


def _cost(fix: Any) -> str:
    return "-" if fix.step_cost is None else f"{fix.step_cost:.2f}x"


def _fits(fix: Any) -> str:
    return "-" if fix.fits is None else "yes" if fix.fits else "no"
