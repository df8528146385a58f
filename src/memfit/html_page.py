"""One self-contained HTML page for a report, an estimate, a plan or an explanation (:func:`write`).

The page opens offline (inline CSS, SVG and script; well-formed XML as well as HTML; all text escaped): live
bytes stacked by category over the ops with the peak marked (hover for an op's figures), the categories at the
peak, the peak of each phase, the top modules, an estimate's required, reserved and context bytes, a plan's
choice and alternatives, an explanation's causes and fixes. Like :mod:`memfit.display` it imports none of
the results it renders: it reads their fields.

Known limitations:
    * A timeline longer than :data:`MAX_POINTS` ops is drawn at one point per window of ops, the
      one with the most live bytes: the peak is never lost, but dips inside a window are not drawn.
    * The peak op's point shows the bytes at the peak itself (``report.at_peak``), which may be
      reached inside the op and so exceed what is alive after it.
    * Hover tooltips need JavaScript; everything else is static markup.
"""

from __future__ import annotations

import html
import json
import math
from itertools import groupby
from pathlib import Path
from typing import Any

from memfit.categories import CATEGORIES, PHASES
from memfit.errors import UsageError
from memfit.memory_viz import check_writable, write_atomically
from memfit.units import format_budget, format_bytes

__all__ = ["MAX_POINTS", "render", "write"]

MAX_POINTS = 2000
"""Most points the timeline is drawn with; longer timelines keep each window's highest total."""

_COLOURS = ("#4e79a7", "#a0cbe8", "#f28e2b", "#e15759", "#59a14f", "#edc948", "#b07aa1")
_EXTRA_COLOURS = ("#76b7b2", "#ff9da7", "#9c755f", "#bab0ac", "#8cd17d", "#86bcb6")
_PHASE_SHADE = {"backward": "#eef3fb", "optimizer": "#fbf3e6"}
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 960, 360, 84, 36, 24, 44  # SVG user units


class _Cell(str):
    """A table cell's finished markup (anything else put in a table is escaped text)."""


def render(*, title: str, report: Any = None, estimate: Any = None, plan: Any = None, explanation: Any = None) -> str:
    """The page as text: a :class:`memfit.MemoryReport`, :class:`memfit.Estimate`, :class:`memfit.Plan`
    and/or an explanation (an object with ``to_dict()`` or that dict), whichever are given.

    A plan brings its chosen estimate, and an estimate its report (whose timeline is drawn).
    All figures are int bytes in the results, binary units (``format_bytes``) on the page.

    Example:
        >>> p = memfit.plan(memfit.presets.load("cifar-cnn"), "40MiB", batch_size=256, device="cpu")
        >>> render(title="cifar-cnn in 40 MiB", plan=p).startswith("<!DOCTYPE html>")
        True
    """
    if not isinstance(title, str):
        raise UsageError(f"title must be a str, got {title!r}; pass e.g. title='gpt2, batch 8'")
    if report is None and estimate is None and plan is None and explanation is None:
        raise UsageError("nothing to show: pass report= (a MemoryReport), estimate= (an Estimate), plan= (a Plan) "
                         "or explanation= (memfit.explain's result or its to_dict())")
    explained = explanation.to_dict() if callable(getattr(explanation, "to_dict", None)) else explanation
    if explained is not None and not isinstance(explained, dict):
        raise UsageError(f"explanation must be memfit.explain's result or its to_dict(), got {explanation!r}")
    estimate = estimate if estimate is not None else getattr(plan, "estimate", None)
    report = report if report is not None else getattr(estimate, "report", None)
    body = [f"<header><h1>{_e(title)}</h1>{_summary(report, explained)}</header>"]
    body += [_timeline(report), _report_tables(report, estimate)] if report is not None else []
    body += [_estimate(estimate)] if estimate is not None else []
    body += [_plan(plan)] if plan is not None else []
    body += [_explanation(explained)] if explained is not None else []
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{''.join(body)}"
            f"<div id=\"tip\" class=\"tip\" hidden=\"hidden\"></div><script>//<![CDATA[{_SCRIPT}//]]></script>"
            "</body></html>\n")


def write(path: str | Path, *, title: str, report: Any = None, estimate: Any = None, plan: Any = None,
          explanation: Any = None) -> Path:
    """Write :func:`render`'s page to ``path`` (``.html`` or ``.htm``) and return the path.

    Example:
        >>> est = memfit.estimate(memfit.presets.load("gpt2-tiny"), memfit.Config(micro_batch=4), device="cuda")
        >>> write("gpt2-tiny.html", title="gpt2-tiny, micro-batch 4", estimate=est)
        PosixPath('gpt2-tiny.html')

    Raises:
        UsageError: a file name not ending in .html or .htm, or a path that cannot be written (a missing or
            read-only folder, a directory), before the page is made.
        memfit.WriteError: the write failed (a full disk); nothing partial is left at ``path``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"cannot write the page to {str(path)!r}: the file name must end in .html or .htm")
    check_writable(path, f"cannot write the page to {str(path)!r}")
    text = render(title=title, report=report, estimate=estimate, plan=plan, explanation=explanation)
    write_atomically(path, text.encode("utf-8"), "the page")  # a full disk leaves no half page
    return path


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _module_name(path: str | None) -> str:
    return "outside the model" if path is None else path or "<root>"


def _bytes(n: Any) -> _Cell:
    """A right-aligned cell of bytes that keeps the exact int in ``data-bytes``."""
    exact = isinstance(n, int) and not isinstance(n, bool)
    return _Cell(f'<td class="num" data-bytes="{n}">{_e(format_bytes(n))}</td>' if exact else '<td class="num">-</td>')


def _num(text: str) -> _Cell:
    return _Cell(f'<td class="num">{_e(text)}</td>')


def _yes(flag: Any, good: bool = True) -> _Cell:
    """yes / no / - (not a bool); ``good`` colours yes green and no red."""
    text = {True: "yes", False: "no"}[flag] if isinstance(flag, bool) else "-"
    return _Cell(f'<td class="{text if good else ""}">{text}</td>')


def _cost(value: Any) -> _Cell:
    return _num(f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-")


def _table(tid: str, caption: str, head: list[str], rows: list[list[Any]], foot: list[Any] | None = None,
           row_class: list[str] | None = None) -> str:
    def cells(row: list[Any], tag: str = "td") -> str:
        return "".join(c if isinstance(c, _Cell) else f"<{tag}>{_e(c)}</{tag}>" for c in row)

    body = "".join(f'<tr class="{c}">{cells(r)}</tr>' for r, c in zip(rows, row_class or [""] * len(rows)))
    tfoot = f"<tfoot><tr>{cells(foot, 'th')}</tr></tfoot>" if foot else ""
    return (f'<table id="{tid}"><caption>{_e(caption)}</caption><thead><tr>{cells(head, "th")}</tr></thead>'
            f"<tbody>{body}</tbody>{tfoot}</table>")


def _facts(items: list[tuple[str, str, Any]]) -> str:
    """A definition list of (id, label, value): an int value is bytes, kept exact in ``data-bytes``."""
    out = [f'<dt>{_e(label)}</dt>' + (f'<dd id="{fid}" data-bytes="{value}">{_e(format_bytes(value))}</dd>'
                                      if isinstance(value, int) and not isinstance(value, bool)
                                      else f'<dd id="{fid}">{_e(value)}</dd>') for fid, label, value in items]
    return f'<dl class="facts">{"".join(out)}</dl>'


def _colours(names: list[str]) -> dict[str, str]:
    extra = iter(_EXTRA_COLOURS * (1 + len(names) // len(_EXTRA_COLOURS)))
    return {n: _COLOURS[CATEGORIES.index(n)] if n in CATEGORIES else next(extra) for n in names}


def _summary(report: Any, explained: dict[str, Any] | None) -> str:
    if report is None:  # an explanation alone: its own section says where and why
        peak = (explained or {}).get("peak")
        shown = f'<strong id="peak">{_e(format_bytes(peak))}</strong> ({peak:,} bytes)' if isinstance(peak, int) \
            else "-"
        return f'<p class="summary">Peak {shown}.</p>'
    kind = "fake tensors (no memory used)" if report.fake else report.device
    where = f"{report.peak_op} during {report.peak_phase}" + (
        f", in {_module_name(report.peak_module)}" if report.peak_module is not None else "")
    return (f'<p class="summary">Peak <strong id="peak">{_e(format_bytes(report.peak))}</strong> ({report.peak:,} '
            f"bytes) on {_e(kind)}, over {report.steps} optimizer step(s); reached by {_e(where)}.</p>")


def _downsample(totals: list[int], limit: int, keep_position: int) -> tuple[list[int], int]:
    """Positions to draw: the first highest total of each of at most ``limit`` equal windows, or ``keep_position``."""
    width = -(-len(totals) // limit)
    keep = [start + (window := totals[start:start + width]).index(max(window))
            for start in range(0, len(totals), width)]
    if 0 <= keep_position < len(totals):
        keep[keep_position // width] = keep_position
    return keep, width


def _binary_ticks(top: int) -> tuple[int, int]:
    """A power-of-two tick step (4 to 8 ticks) and the axis top, a multiple of it above ``top``."""
    step = 2 ** max(0, math.floor(math.log2(max(top, 1) / 4)))
    return step, step * max(1, math.ceil(top * 1.08 / step))


def _tick_label(n: int) -> str:
    number, _, unit = format_bytes(n).partition(" ")
    return (number.rstrip("0").rstrip(".") if "." in number else number) + " " + unit


def _timeline(report: Any) -> str:
    entries = report.timeline
    if not entries:
        return ('<section id="timeline-section"><h2>Timeline</h2><p class="note">No timeline recorded '
                "(a report read back from a dict without one).</p></section>")
    names = list(report.peak_by_category) or list(report.at_peak)
    colours = _colours(names)
    peak_pos = report.peak_index if 0 <= report.peak_index < len(entries) else -1
    totals = [sum(e.live.values()) for e in entries]
    if peak_pos >= 0:  # the bytes at the peak itself, which may be reached inside the op
        totals[peak_pos] = report.peak
    keep, width = _downsample(totals, MAX_POINTS, peak_pos)
    live = [[(report.at_peak if k == peak_pos else entries[k].live).get(n, 0) for n in names] for k in keep]
    # Each point is drawn over its whole window (every op in it is at most as high), labelled with its own op.
    xs, at = [entries[k].index for k in keep], [entries[w * width].index for w in range(len(keep))]
    x0, x1 = at[0], entries[-1].index + 1  # the last op's step reaches one op past it
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    step, ymax = _binary_ticks(max(totals[k] for k in keep))

    def px(v: float) -> float:
        return _LEFT + (v - x0) / max(x1 - x0, 1) * pw

    def py(v: float) -> float:
        return _TOP + ph - v / ymax * ph

    svg = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" role="img" '
           f'aria-label="live bytes by category over {len(entries)} ops">']
    for phase, run in groupby(range(len(keep)), key=lambda i: entries[keep[i]].phase):
        run = list(run)
        if phase in _PHASE_SHADE:
            a, b = px(at[run[0]]), px(at[run[-1] + 1] if run[-1] + 1 < len(at) else x1)
            svg.append(f'<rect class="phase" x="{a:.1f}" y="{_TOP}" width="{b - a:.1f}" height="{ph}" '
                       f'fill="{_PHASE_SHADE[phase]}"><title>{phase}</title></rect>')
    for v in range(0, ymax + 1, step):
        svg.append(f'<line class="gridline" x1="{_LEFT}" x2="{_LEFT + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}"/>'
                   f'<text class="ytick" x="{_LEFT - 6}" y="{py(v) + 4:.1f}">{_e(_tick_label(v))}</text>')
    power = 10 ** math.floor(math.log10(max((x1 - x0) / 8, 1)))  # x ticks every 1, 2 or 5 x 10**k ops
    xstep = next(m * power for m in (1, 2, 5, 10) if m * power >= (x1 - x0) / 8)
    for v in range(math.ceil(x0 / xstep) * xstep, x1 + 1, xstep):
        svg.append(f'<text class="xtick" x="{px(v):.1f}" y="{_TOP + ph + 16}">{v:,}</text>')
    sx = [f"{px(x):.1f}" for x in at[1:]] + [f"{px(x1):.1f}"]
    cumulative = [0] * len(keep)
    stacks = []
    for j, name in enumerate(names):  # each category's area from the axis to its top, drawn largest first
        cumulative = [c + row[j] for c, row in zip(cumulative, live)]
        if any(row[j] for row in live):
            steps = "".join(f"V{py(c):.1f}H{x}" for c, x in zip(cumulative, sx))
            stacks.append(f'<path class="area" data-category="{_e(name)}" fill="{colours[name]}" '
                          f'd="M{px(x0):.1f} {py(0):.1f}{steps}V{py(0):.1f}Z"/>')
    total = "".join(f"V{py(c):.1f}H{x}" for c, x in zip(cumulative, sx))  # outlined: a one-op spike stays visible
    svg += [*reversed(stacks), f'<path id="total-line" d="M{px(x0):.1f} {py(0):.1f}{total}"/>']
    peak_x, peak_y = px(entries[max(peak_pos, 0)].index), py(report.peak)
    anchor, dx = ("end", -6) if peak_x > _LEFT + 0.7 * pw else ("start", 6)
    svg.append(f'<line id="peak-line" x1="{peak_x:.1f}" x2="{peak_x:.1f}" y1="{_TOP}" y2="{_TOP + ph}"/>'
               f'<circle id="peak-dot" cx="{peak_x:.1f}" cy="{peak_y:.1f}" r="3.5"/>'
               f'<text id="peak-label" x="{peak_x + dx:.1f}" y="{max(peak_y - 8, _TOP + 12):.1f}" '
               f'text-anchor="{anchor}">peak {_e(format_bytes(report.peak))}</text>'
               f'<line class="axis" x1="{_LEFT}" x2="{_LEFT + pw}" y1="{_TOP + ph}" y2="{_TOP + ph}"/>'
               f'<text class="xlabel" x="{_LEFT + pw / 2:.0f}" y="{_H - 6}">op index</text>'
               f'<line id="hover-line" y1="{_TOP}" y2="{_TOP + ph}" x1="0" x2="0" visibility="hidden"/>'
               f'<rect id="plot-area" x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="transparent"/></svg>')
    data = {"names": names, "x": xs, "at": at, "x1": x1, "ymax": ymax, "live": live, "plot": [_LEFT, _TOP, pw, ph],
            "phase": [entries[k].phase for k in keep], "step": [entries[k].step for k in keep]}
    data["ops"], data["op"] = _intern([entries[k].op for k in keep])  # each text once, points index it
    data["modules"], data["module"] = _intern([_module_name(entries[k].module) for k in keep])
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    legend = "".join(f'<li><span class="swatch" style="background:{colours[n]}"></span>{_e(n)}</li>' for n in names)
    where = f"{report.peak_op} " + (f"in {report.peak_module or '<root>'}" if report.peak_module is not None
                                     else "outside the model") + f" during {report.peak_phase}"
    drawn = f"{len(entries):,} ops" + (f", drawn as {len(keep):,} points (each the highest of its window)"
                                       if len(keep) < len(entries) else "")
    return (f'<section id="timeline-section"><h2>Live memory over the step</h2><figure>{"".join(svg)}'
            f'<figcaption><ul class="legend">{legend}</ul><p>Peak {_e(format_bytes(report.peak))} at op '
            f"{report.peak_index:,}: {_e(where)}. {_e(drawn)}; backward shaded blue, optimizer orange.</p>"
            f'</figcaption></figure><script type="application/json" id="timeline-data">{payload}</script></section>')


def _intern(values: list[str]) -> tuple[list[str], list[int]]:
    table: dict[str, int] = {}
    ids = [table.setdefault(v, len(table)) for v in values]
    return list(table), ids


def _report_tables(report: Any, estimate: Any) -> str:
    names = list(report.peak_by_category) or list(report.at_peak)
    at_peak = {n: report.at_peak.get(n, 0) for n in names}
    out = [_categories("categories", at_peak, report.peak, ("own max", report.peak_by_category, False),
                       ("at end", report.at_end, True))]
    if estimate is not None:
        phases = [[p, _bytes(estimate.phases["first"].get(p)), _bytes(estimate.phases["steady"].get(p))]
                  for p in (*PHASES, "step")]
        out.append(_table("phases", "Peak by phase", ["phase", "first step", "steady state"], phases))
    else:
        out.append(_table("phases", "Peak by phase", ["phase", "peak"],
                          [[p, _bytes(report.peak_by_phase.get(p, 0))] for p in PHASES]))
    ranked = sorted(report.by_module.items(), key=lambda kv: (-kv[1], kv[0]))[:15]
    if ranked:
        out.append(_table("modules", f"Top modules (of {len(report.by_module)}): bytes their forward and backward "
                          "allocated", ["module", "peak allocated"], [[_module_name(m), _bytes(n)] for m, n in ranked]))
    return f'<section id="tables"><h2>Where the bytes are</h2><div class="grid">{"".join(out)}</div></section>'


def _categories(tid: str, at_peak: dict[str, int], peak: int, *more: tuple[str, dict[str, int], bool]) -> str:
    """Bytes and share of each category at the peak, then ``more`` columns: (head, bytes by category, total them)."""
    colours = _colours(list(at_peak))
    rows = [[_Cell(f'<td><span class="swatch" style="background:{colours[n]}"></span>{_e(n)}</td>'), _bytes(b),
             _num(f"{100 * b / peak:.1f}%" if peak else "-"),
             *(_bytes(figures.get(n)) for _, figures, _ in more)] for n, b in at_peak.items()]
    foot = ["total", _bytes(sum(at_peak.values())), _num("100%"),
            *(_bytes(sum(f.values())) if total else "" for _, f, total in more)]
    return _table(tid, "Categories at the peak", ["category", "at peak", "share", *(c for c, _, _ in more)], rows, foot)


def _estimate(est: Any) -> str:
    items = [("est-config", "config", est.config.describe()), ("est-device", "target device", est.device),
             ("est-parameters", "parameters", f"{est.parameters:,}"), ("est-peak", "tensors at the peak", est.peak)]
    if est.allocator is not None:
        items += [("est-allocated", "allocated, with workspaces", est.allocator.allocated),
                  ("est-reserved", "reserved by the caching allocator", est.allocator.reserved),
                  ("est-context", "CUDA context", est.context)]
    items.append(("est-required", "required on the device", est.required))
    if est.checkpointed:
        items.append(("est-checkpointed", "checkpointed", ", ".join(est.checkpointed)))
    notes = "".join(f"<li>{_e(n)}</li>" for n in est.notes)
    return (f'<section id="estimate"><h2>Estimate</h2>{_facts(items)}'
            + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</section>")


def _runs(sizes: tuple[int, ...]) -> str:
    """``(52, 52, 52, 52, 48)`` -> ``"4 × 52 + 48"``."""
    return " + ".join(f"{len(g)} × {size}" if len(g) > 1 else str(size)
                      for size, g in ((s, list(g)) for s, g in groupby(sizes)))


def _plan(plan: Any) -> str:
    items = [("plan-config", "chosen config", plan.config.describe()), ("plan-batch", "batch", f"{plan.batch_size:,}"),
             ("plan-micro-batches", "micro-batches",
              f"{_runs(plan.accumulation)} = {sum(plan.accumulation):,} in {len(plan.accumulation)} micro-step(s)"),
             ("plan-budget", "budget", format_budget(plan.budget)), ("plan-required", "required", plan.required),
             ("plan-headroom", "headroom", plan.budget - plan.required),
             ("plan-cost", "step cost", f"{plan.step_cost:.2f} (1.00 = the whole batch at once, unconstrained)")]
    reasons = "".join(f"<li>{_e(r)}</li>" for r in plan.reasons)
    rows = [[str(i + 1), a.config.describe(), _num(str(len(a.accumulation))), _bytes(a.required), _cost(a.step_cost),
             _yes(a.fits), _yes(a.predicted, good=False)] for i, a in enumerate(plan.alternatives)]
    chosen = ["chosen" if a.config == plan.config else "" for a in plan.alternatives]
    table = _table("alternatives", "Alternatives considered (fastest first)",
                   ["#", "config", "micro-steps", "required", "step cost", "fits", "predicted"], rows, row_class=chosen)
    return (f'<section id="plan"><h2>Plan</h2>{_facts(items)}<h3>Why</h3><ul id="reasons">{reasons}</ul>'
            f"{table}</section>")


def _fix_rows(fixes: list[dict[str, Any]]) -> list[list[Any]]:
    def change(c: Any) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in c.items()) if isinstance(c, dict) and c else "-"

    return [[f.get("lever", "-"), _bytes(f.get("saves")), _bytes(f.get("required")), _cost(f.get("step_cost")),
             _yes(f.get("fits")), _yes(f.get("verified"), good=False), change(f.get("change"))] for f in fixes]


def _explanation(x: dict[str, Any]) -> str:
    items = [(f"x-{k}", label, x[k]) for k, label in (("peak", "peak"), ("required", "required"),
                                                     ("budget", "budget")) if x.get(k) is not None]
    if isinstance(x.get("fits"), bool):
        verdict = "yes" if x["fits"] else "no"
        if isinstance(x.get("budget"), int) and isinstance(x.get("required"), int):
            gap = x["budget"] - x["required"]
            verdict += f" ({format_bytes(abs(gap))} {'headroom' if gap >= 0 else 'over the budget'})"
        items.append(("x-fits", "fits", verdict))
    items += [(f"x-{k}", k, _module_name(x[k]) if k == "module" else x[k]) for k in ("op", "phase", "module")
              if k in x and (x[k] is not None or k == "module")]
    out = [f'<section id="explanation"><h2>Why this peak</h2>{_facts(items)}']
    if x.get("at_peak"):
        out.append(_categories("x-at-peak", x["at_peak"], sum(x["at_peak"].values())))
    if x.get("largest"):
        out.append(_table("x-largest", "Largest tensors alive at the peak",
                          ["bytes", "category", "op", "module", "source"],
                          [[_bytes(t.get("bytes")), t.get("category", "-"), t.get("op") or "-",
                            _module_name(t.get("module")), t.get("source") or "-"] for t in x["largest"]]))
    if x.get("causes"):
        out.append(_table("x-causes", "Causes", ["cause", "bytes", "detail"],
                          [[c.get("cause", "-"), _bytes(c.get("bytes")), c.get("detail") or ""] for c in x["causes"]]))
    head = ["lever", "saves", "required", "step cost", "fits", "verified", "change"]
    for key, caption in (("fixes", "Fixes (the same training)"), ("options", "Options that change the training")):
        if x.get(key):
            out.append(_table(f"x-{key}", caption, head, _fix_rows(x[key])))
    return "".join(out) + "</section>"


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1040px;
padding:16px 24px;color:#222;background:#fff}h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #ddd}h3{font-size:15px}figure{margin:0}svg{width:100%;height:auto;display:block}
line.gridline{stroke:#e4e4e4;stroke-width:1}line.axis{stroke:#888}text{font-size:11px;fill:#555}.ytick{text-anchor:end}
.xtick,.xlabel{text-anchor:middle}#peak-line{stroke:#111;stroke-dasharray:4 3}#peak-dot{fill:#111}
#peak-label{font-weight:600;fill:#111;font-size:12px}#total-line{fill:none;stroke:#333;stroke-width:.8}
#hover-line{stroke:#555;stroke-width:1}.legend{list-style:none;padding:0;margin:6px 0;display:flex;flex-wrap:wrap;
gap:4px 16px}.swatch{display:inline-block;width:11px;height:11px;margin-right:6px;vertical-align:-1px;
border-radius:2px}table{border-collapse:collapse;margin:8px 0 16px;min-width:320px}caption{text-align:left;
font-weight:600;padding:4px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums}td.yes{color:#1a7f37}td.no{color:#b42318}
tr.chosen td{background:#eef6ee;font-weight:600}div.grid{display:flex;flex-wrap:wrap;gap:0 32px;align-items:flex-start}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#666}dd{margin:0}
.tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #bbb;border-radius:4px;padding:6px 8px;
font-size:12px;box-shadow:0 2px 6px rgba(0,0,0,.15);max-width:420px;word-break:break-all}.note{color:#666}
"""

# Hover: the point under the cursor (the last drawn point at or before it), its op and bytes by category.
_SCRIPT = """
(function(){var el=document.getElementById('timeline-data');if(!el)return;
var d=JSON.parse(el.textContent),svg=document.getElementById('timeline'),tip=document.getElementById('tip');
var line=document.getElementById('hover-line'),P=d.plot,x0=d.at[0];
function fmt(n){var u=['KiB','MiB','GiB','TiB','PiB'],s=n<0?'-':'',e=0;n=Math.abs(n);if(n<1024)return s+n+' B';
while(e<5&&n>=Math.pow(1024,e+1))e++;return s+(n/Math.pow(1024,e)).toFixed(2)+' '+u[e-1];}
function pick(x){var lo=0,hi=d.at.length-1;while(lo<hi){var m=(lo+hi+1)>>1;if(d.at[m]<=x)lo=m;else hi=m-1;}return lo;}
function add(text,bold){var e=document.createElement(bold?'b':'div');e.textContent=text;tip.appendChild(e);}
function hide(){tip.hidden=true;line.setAttribute('visibility','hidden');}
svg.addEventListener('mouseleave',hide);svg.addEventListener('mousemove',function(ev){
var p=new DOMPoint(ev.clientX,ev.clientY).matrixTransform(svg.getScreenCTM().inverse());
if(p.x<P[0]||p.x>P[0]+P[2]||p.y<P[1]||p.y>P[1]+P[3]){hide();return;}
var i=pick(x0+(p.x-P[0])/P[2]*(d.x1-x0)),live=d.live[i],total=0,k,lx=P[0]+(d.x[i]-x0)/(d.x1-x0)*P[2];
for(k=0;k<live.length;k++)total+=live[k];tip.textContent='';add('op '+d.x[i].toLocaleString()+': '+d.ops[d.op[i]],1);
add(d.modules[d.module[i]]);add(d.phase[i]+', after '+d.step[i]+' optimizer step(s)');add('total '+fmt(total),1);
for(k=0;k<live.length;k++)if(live[k])add(d.names[k]+': '+fmt(live[k]));
line.setAttribute('x1',lx);line.setAttribute('x2',lx);line.setAttribute('visibility','visible');tip.hidden=false;
var left=ev.clientX+14,top=ev.clientY+14;if(left+tip.offsetWidth>window.innerWidth)left=ev.clientX-14-tip.offsetWidth;
if(top+tip.offsetHeight>window.innerHeight)top=ev.clientY-14-tip.offsetHeight;
tip.style.left=left+'px';tip.style.top=top+'px';});})();
"""
