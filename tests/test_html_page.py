"""memfit.html_page: one self-contained page whose figures are the results', checked as markup and in a browser.

The browser tests load the page in Chromium (Debian's package, driven by playwright; tools/install_browser.sh
installs both) and skip with the reason where no browser can be started.
"""

from __future__ import annotations

import gc
import io
import json
import random
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import memfit
from memfit import html_page
from memfit.report import MemoryReport, TimelineEntry
from memfit.units import format_budget

EVIL = "<script>alert(1)</script>"


# ---------------------------------------------------------------- helpers

def _tree(page: str) -> ET.Element:
    """The page parsed as XML: it fails on any unbalanced tag or unescaped text."""
    assert page.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(page.split("\n", 1)[1])


def _by_id(root: ET.Element, ident: str) -> ET.Element:
    found = [e for e in root.iter() if e.get("id") == ident]
    assert len(found) == 1, (ident, len(found))
    return found[0]


def _has_id(root: ET.Element, ident: str) -> bool:
    return any(e.get("id") == ident for e in root.iter())


def _text(e: ET.Element) -> str:
    return "".join(e.itertext())


def _rows(root: ET.Element, table: str) -> list[list[ET.Element]]:
    return [list(tr) for tr in _by_id(root, table).find("tbody")]


def _data(page: str) -> dict:
    return json.loads(_text(_by_id(_tree(page), "timeline-data")))


def _totals(data: dict) -> list[int]:
    return [sum(live) for live in data["live"]]


def _report(lives: list[dict[str, int]], *, peak_index: int | None = None, at_peak: dict[str, int] | None = None,
            module: str = "blocks.0", op: str = "aten.mm.default", by_module: dict[str, int] | None = None,
            entry=TimelineEntry) -> MemoryReport:
    """A report over ``lives`` (bytes by category after each op); the peak is the highest total unless given."""
    totals = [sum(live.values()) for live in lives]
    peak_index = totals.index(max(totals)) if peak_index is None else peak_index
    at_peak = dict(lives[peak_index]) if at_peak is None else at_peak
    half = len(lives) // 2
    gc.disable()  # a million small objects: the collector's passes over them would take most of the time
    try:
        timeline = tuple(entry(i, op, module, "forward" if i < half else "backward", 0, live)
                         for i, live in enumerate(lives))
    finally:
        gc.enable()
    distinct = list({id(live): live for live in lives}.values()) + [at_peak]
    return MemoryReport(
        device="cpu", peak=sum(at_peak.values()), at_peak=at_peak,
        peak_by_category={n: max(live[n] for live in distinct) for n in lives[0]},
        peak_by_phase={"forward": max(totals[:half]), "backward": sum(at_peak.values()), "optimizer": 0},
        by_module=by_module or {module: 1024}, timeline=timeline, at_end=dict(lives[-1]), peak_index=peak_index,
        peak_op=op, peak_module=module, peak_phase="backward" if peak_index >= half else "forward", steps=1)


def _random_lives(n: int, seed: int = 0) -> list[dict[str, int]]:
    rng = random.Random(seed)
    pool = [{c: rng.randrange(1 << 20) for c in memfit.CATEGORIES} for _ in range(257)]  # shared: fast to build
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def _mlp_workload() -> memfit.Workload:
    return memfit.Workload(
        model=lambda: nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)),
        batch=lambda n: (torch.randn(n, 64),),
        loss=lambda m, b: m(b[0]).pow(2).mean(),
        optimizer=lambda p: torch.optim.AdamW(p),
    )


@pytest.fixture(scope="module")
def tracked() -> MemoryReport:
    """A real measured step, two optimizer steps of a small MLP."""
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters())
    with memfit.track(model, opt) as tracker:
        for _ in range(2):
            model(torch.randn(16, 32)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.report()


@pytest.fixture(scope="module")
def a_plan() -> memfit.Plan:
    """A plan that cannot run the whole batch in fp32 at once: several alternatives, some predicted."""
    workload = _mlp_workload()
    full = memfit.estimate(workload, memfit.Config(micro_batch=64), device="cpu")
    return memfit.plan(workload, full.required - 1, 64, device="cpu", precisions=("32-true", "bf16-mixed"))


EXPLANATION = {
    "peak": 3 << 30, "required": 3 * (1 << 30) + (600 << 20), "budget": 3 << 30, "fits": False,
    "at_peak": {"parameters": 1 << 30, "gradients": 1 << 30, "activations": 1 << 30},
    "phase": "backward", "op": "aten.mm.default", "module": "transformer.h.11.mlp",
    "largest": [
        {"bytes": 512 << 20, "category": "activations", "op": "aten.gelu.default", "module": "transformer.h.11.mlp",
         "source": "saved by GELU for backward"},
        {"bytes": 256 << 20, "category": "gradients", "op": "aten.mm.default", "module": None, "source": None},
    ],
    "causes": [{"cause": "activations saved for backward", "bytes": 1 << 30, "detail": "12 blocks x 85 MiB"}],
    "fixes": [
        {"lever": "checkpoint='all'", "saves": 900 << 20, "required": 2 * (1 << 30) + (724 << 20), "step_cost": 1.33,
         "fits": True, "verified": True, "change": {"checkpoint": "all"}},
        {"lever": "micro_batch=4", "saves": 700 << 20, "required": None, "step_cost": None, "fits": None,
         "verified": False, "change": {"micro_batch": 4}},
    ],
    "options": [{"lever": "LoRA rank 8", "saves": 2 << 30, "required": 1 << 30, "step_cost": 0.8, "fits": True,
                 "verified": False, "change": {}}],
}


# ---------------------------------------------------------------- markup

def test_the_page_shows_the_reports_figures_and_the_categories_sum_to_the_peak(tracked):
    page = html_page.render(title="mlp", report=tracked)
    root = _tree(page)
    assert _text(_by_id(root, "peak")) == memfit.format_bytes(tracked.peak)
    rows = {_text(r[0]): r for r in _rows(root, "categories")}
    assert list(rows) == list(tracked.peak_by_category)
    assert {n: int(r[1].get("data-bytes")) for n, r in rows.items()} == tracked.at_peak
    assert {n: _text(r[1]) for n, r in rows.items()} == {n: memfit.format_bytes(b) for n, b in tracked.at_peak.items()}
    assert sum(int(r[1].get("data-bytes")) for r in rows.values()) == tracked.peak
    assert {n: int(r[3].get("data-bytes")) for n, r in rows.items()} == tracked.peak_by_category
    assert int(_by_id(root, "categories").find("tfoot")[0][1].get("data-bytes")) == tracked.peak
    phases = {_text(r[0]): int(r[1].get("data-bytes")) for r in _rows(root, "phases")}
    assert phases == tracked.peak_by_phase
    top = sorted(tracked.by_module.items(), key=lambda kv: -kv[1])[:15]
    modules = [(_text(r[0]), int(r[1].get("data-bytes"))) for r in _rows(root, "modules")]
    assert modules == [(m or "<root>", b) for m, b in top]
    # A short timeline is drawn op for op; the peak's point holds the bytes at the peak.
    data = _data(page)
    assert data["x"] == data["at"] == [e.index for e in tracked.timeline]
    expected = [[e.live[n] for n in data["names"]] for e in tracked.timeline]
    expected[tracked.peak_index] = [tracked.at_peak[n] for n in data["names"]]
    assert data["live"] == expected and max(_totals(data)) == tracked.peak
    assert [data["ops"][i] for i in data["op"]] == [e.op for e in tracked.timeline]
    assert _text(_by_id(root, "peak-label")) == f"peak {memfit.format_bytes(tracked.peak)}"


def test_the_page_is_well_formed_and_reaches_for_nothing_outside(tracked, a_plan):
    for page in (html_page.render(title="mlp", report=tracked),
                 html_page.render(title="plan", plan=a_plan, explanation=EXPLANATION)):
        root = _tree(page)
        assert root.tag == "html" and _text(root.find("head/title")) in ("mlp", "plan")
        assert not [e.tag for e in root.iter() if e.get("src") is not None or e.get("href") is not None]
        assert page.count("http") == page.count("http://www.w3.org/2000/svg") == 1  # the SVG namespace only
        assert "@import" not in page and "url(" not in page
        assert [e.get("type") for e in root.iter("script")] == ["application/json", None]


def test_every_text_is_escaped():
    lives = _random_lives(50)
    report = _report(lives, module=EVIL, op="aten.<b>op</b>", by_module={EVIL: 1 << 20, "a&b": 5})
    title = "<img src=x onerror=alert(2)> & co"
    page = html_page.render(title=title, report=report, explanation={**EXPLANATION, "module": EVIL})
    assert EVIL not in page and "<b>op</b>" not in page and "<img" not in page
    root = _tree(page)
    assert _text(root.find("head/title")) == title and _text(root.find("body/header/h1")) == title
    assert [_text(r[0]) for r in _rows(root, "modules")] == [EVIL, "a&b"]
    assert _text(_by_id(root, "x-module")) == EVIL
    data = _data(page)
    assert data["modules"] == [EVIL] and data["ops"] == ["aten.<b>op</b>"]


def test_downsampling_keeps_each_windows_highest_total_and_the_peak_exactly():
    n, spike = 100_000, 54_321  # not on a window boundary
    lives = _random_lives(n, seed=1)
    lives[spike] = {**lives[spike], "activations": 3 << 30}
    report = _report(lives)
    assert report.peak_index == spike
    page = html_page.render(title="spike", report=report)
    data = _data(page)
    assert len(data["x"]) <= html_page.MAX_POINTS
    totals = [sum(live.values()) for live in lives]
    drawn = dict(zip(data["x"], _totals(data)))
    assert drawn[spike] == report.peak == max(drawn.values())
    # Independently: cut the ops into as many equal windows as points drawn; each point is its window's highest.
    width = -(-n // len(data["x"]))
    assert data["at"] == list(range(0, n, width))  # each point is drawn over its whole window
    for w, (x, total) in enumerate(zip(data["x"], _totals(data))):
        window = totals[w * width:(w + 1) * width]
        assert w * width <= x < (w + 1) * width and total == max(window) == totals[x]
    assert _text(_by_id(_tree(page), "peak")) == memfit.format_bytes(report.peak)


def test_a_peak_reached_inside_an_op_is_drawn_at_its_height():
    lives = _random_lives(5000, seed=2)
    inside = {**lives[1234], "temporaries": 1 << 30}  # a temporary allocated and freed within op 1234
    # The op before it ends as high as the peak, in the same window of 3 ops: the peak's own op is still drawn.
    before = lives[1233]
    lives[1233] = {**before, "activations": before["activations"] + sum(inside.values()) - sum(before.values())}
    report = _report(lives, peak_index=1234, at_peak=inside)
    data = _data(html_page.render(title="inside", report=report))
    assert -(-5000 // len(data["x"])) == 3 and 1233 // 3 == 1234 // 3
    drawn = dict(zip(data["x"], _totals(data)))
    assert drawn[1234] == report.peak == sum(inside.values()) > sum(lives[1234].values())
    assert max(drawn.values()) == report.peak <= data["ymax"]  # the axis reaches the peak


def test_a_category_the_tracker_added_gets_its_own_colour():
    lives = [{**live, "kv_cache": 1 << 20} for live in _random_lives(100)]
    root = _tree(html_page.render(title="added", report=_report(lives)))
    areas = {p.get("data-category"): p.get("fill") for p in root.iter("{http://www.w3.org/2000/svg}path")
             if p.get("data-category")}
    assert list(areas) == [*memfit.CATEGORIES, "kv_cache"][::-1]  # drawn top of the stack first
    assert len(set(areas.values())) == len(areas)
    assert [_text(li) for li in root.iter("li")][-1] == "kv_cache"
    assert int(_rows(root, "categories")[-1][1].get("data-bytes")) == 1 << 20


class _Entry(NamedTuple):
    """TimelineEntry's fields, cheaper to build a million of."""

    index: int
    op: str
    module: str | None
    phase: str
    step: int
    live: dict[str, int]


def test_a_million_ops_make_a_page_under_two_megabytes():
    lives = _random_lives(1_000_000, seed=3)
    lives[777_777] = {**lives[777_777], "activations": 1 << 33}
    report = _report(lives, entry=_Entry)
    page = html_page.render(title="long", report=report)
    assert len(page.encode()) < 2 << 20
    data = _data(page)
    assert len(data["x"]) <= html_page.MAX_POINTS and 777_777 in data["x"] and max(_totals(data)) == report.peak


def test_an_estimate_shows_what_the_card_needs():
    est = memfit.estimate(_mlp_workload(), memfit.Config(micro_batch=16), device="cuda")
    assert est.allocator is not None and est.context > 0
    root = _tree(html_page.render(title="estimate", estimate=est))
    figures = {name: int(_by_id(root, f"est-{name}").get("data-bytes"))
               for name in ("peak", "allocated", "reserved", "context", "required")}
    assert figures == {"peak": est.peak, "allocated": est.allocator.allocated, "reserved": est.reserved,
                       "context": est.context, "required": est.required}
    assert figures["required"] == figures["reserved"] + figures["context"]
    assert _text(_by_id(root, "est-config")) == est.config.describe()
    phases = {_text(r[0]): (int(r[1].get("data-bytes")), int(r[2].get("data-bytes"))) for r in _rows(root, "phases")}
    assert phases == {p: (est.phases["first"][p], est.phases["steady"][p]) for p in (*memfit.PHASES, "step")}
    assert _text(_by_id(root, "peak")) == memfit.format_bytes(est.report.peak)  # its report's timeline is drawn
    assert _has_id(root, "timeline")


def test_a_plan_shows_its_choice_and_every_alternative(a_plan):
    assert len(a_plan.alternatives) >= 2 and any(a.predicted for a in a_plan.alternatives)
    root = _tree(html_page.render(title="plan", plan=a_plan))
    assert _text(_by_id(root, "plan-config")) == a_plan.config.describe()
    assert _text(_by_id(root, "plan-budget")) == format_budget(a_plan.budget)
    assert int(_by_id(root, "plan-required").get("data-bytes")) == a_plan.required
    micro = _text(_by_id(root, "plan-micro-batches"))
    assert f"= {a_plan.batch_size} in {len(a_plan.accumulation)} micro-step(s)" in micro
    assert [_text(li) for li in _by_id(root, "reasons")] == list(a_plan.reasons)
    rows = _rows(root, "alternatives")
    assert len(rows) == len(a_plan.alternatives)
    for row, alt in zip(rows, a_plan.alternatives):
        assert _text(row[1]) == alt.config.describe()
        assert int(_text(row[2])) == len(alt.accumulation)
        assert int(row[3].get("data-bytes")) == alt.required
        assert _text(row[4]) == f"{alt.step_cost:.2f}"
        assert _text(row[5]) == ("yes" if alt.fits else "no") and _text(row[6]) == ("yes" if alt.predicted else "no")
    chosen = [i for i, tr in enumerate(_by_id(root, "alternatives").find("tbody")) if tr.get("class") == "chosen"]
    assert chosen == [i for i, a in enumerate(a_plan.alternatives) if a.config == a_plan.config]
    assert int(_by_id(root, "est-required").get("data-bytes")) == a_plan.estimate.required


def test_accumulation_is_summarised_as_runs():
    assert html_page._runs((52, 52, 52, 52, 48)) == "4 × 52 + 48"
    assert html_page._runs((7,)) == "7" and html_page._runs((3, 3)) == "2 × 3"


def test_an_explanation_renders_what_is_present():
    page = html_page.render(title="why", explanation=EXPLANATION)
    root = _tree(page)
    assert _text(_by_id(root, "peak")) == memfit.format_bytes(EXPLANATION["peak"]) == "3.00 GiB"
    assert not _has_id(root, "timeline")
    for key in ("peak", "required", "budget"):
        assert int(_by_id(root, f"x-{key}").get("data-bytes")) == EXPLANATION[key]
    assert _text(_by_id(root, "x-fits")) == "no (600.00 MiB over the budget)"
    assert (_text(_by_id(root, "x-op")), _text(_by_id(root, "x-module"))) == ("aten.mm.default", "transformer.h.11.mlp")
    at_peak = {_text(r[0]): int(r[1].get("data-bytes")) for r in _rows(root, "x-at-peak")}
    assert at_peak == EXPLANATION["at_peak"] and sum(at_peak.values()) == EXPLANATION["peak"]
    largest = _rows(root, "x-largest")
    assert [int(r[0].get("data-bytes")) for r in largest] == [t["bytes"] for t in EXPLANATION["largest"]]
    assert [_text(c) for c in largest[1][1:]] == ["gradients", "aten.mm.default", "outside the model", "-"]
    assert [_text(c) for c in _rows(root, "x-causes")[0]] == ["activations saved for backward", "1.00 GiB",
                                                               "12 blocks x 85 MiB"]
    fixes = _rows(root, "x-fixes")
    assert [_text(c) for c in fixes[0]] == ["checkpoint='all'", "900.00 MiB", "2.71 GiB", "1.33", "yes", "yes",
                                            "checkpoint='all'"]
    assert [_text(c) for c in fixes[1]] == ["micro_batch=4", "700.00 MiB", "-", "-", "-", "no", "micro_batch=4"]
    assert [_text(c) for c in _rows(root, "x-options")[0]][:2] == ["LoRA rank 8", "2.00 GiB"]

    class Explanation:  # what memfit.explain returns: anything with to_dict()
        def to_dict(self):
            return EXPLANATION

    assert html_page.render(title="why", explanation=Explanation()) == page
    partial = _tree(html_page.render(title="why", explanation={"peak": 1024, "causes": EXPLANATION["causes"]}))
    assert _has_id(partial, "x-causes") and not _has_id(partial, "x-fixes") and not _has_id(partial, "x-fits")
    with pytest.raises(memfit.UsageError, match="explanation must be memfit.explain's result"):
        html_page.render(title="why", explanation=["not", "a", "dict"])


def test_write_checks_its_arguments(tmp_path, tracked):
    path = html_page.write(tmp_path / "step.html", title="mlp", report=tracked)
    assert path == tmp_path / "step.html"
    assert path.read_text(encoding="utf-8") == html_page.render(title="mlp", report=tracked)
    with pytest.raises(memfit.UsageError, match=r"must end in \.html or \.htm"):
        html_page.write(tmp_path / "step.png", title="mlp", report=tracked)
    with pytest.raises(memfit.UsageError, match="the folder .* does not exist; create it first"):
        html_page.write(tmp_path / "no-such" / "step.html", title="mlp", report=tracked)
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(memfit.UsageError, match=r"dir\.html' is a directory; give the path of a file"):
        html_page.write(tmp_path / "dir.html", title="mlp", report=tracked)
    with pytest.raises(memfit.UsageError, match="nothing to show: pass report="):
        html_page.render(title="empty")
    with pytest.raises(memfit.UsageError, match="title must be a str, got None"):
        html_page.render(title=None, report=tracked)


def test_a_full_disk_leaves_no_half_page_and_an_old_page_as_it_was(tmp_path, tracked, monkeypatch):
    import errno
    import os

    from memfit import WriteError

    old = tmp_path / "old.html"
    old.write_text("<p>old</p>", encoding="utf-8")
    written = []

    def full(fd):  # the page's bytes went to the temporary file; the disk says it is full on the flush to disk
        written.append(os.fstat(fd).st_size)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for path, left in ((tmp_path / "new.html", "nothing was written"), (old, "the file already there is as it was")):
        with pytest.raises(WriteError, match=f"cannot write the page to {path}: disk full .*; {left}$") as caught:
            html_page.write(path, title="mlp", report=tracked)
        assert caught.value.errno == errno.ENOSPC
    assert written and all(n > 1000 for n in written)  # the page was in the temporary file when the disk filled
    assert os.listdir(tmp_path) == ["old.html"] and old.read_text(encoding="utf-8") == "<p>old</p>"


def test_a_report_read_back_without_its_timeline_says_so(tracked):
    data = tracked.to_dict()
    del data["timeline"]
    root = _tree(html_page.render(title="no timeline", report=MemoryReport.from_dict(data)))
    assert not _has_id(root, "timeline") and "No timeline recorded" in _text(_by_id(root, "timeline-section"))
    assert _text(_by_id(root, "peak")) == memfit.format_bytes(tracked.peak)


# ---------------------------------------------------------------- in a browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: run tools/install_browser.sh (or pip install playwright)")
    executable = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                       if p and Path(p).exists()), None)
    if executable is None:
        pytest.skip("no Chromium found (/usr/bin/chromium): run tools/install_browser.sh (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - any failure to start means there is no browser to test in
            pytest.skip(f"Chromium at {executable} could not be started: {exc}")
        yield chromium
        chromium.close()


def _load(browser, page_html: str, tmp_path: Path):
    """Open the page from a file; returns the tab, its console errors and page errors, and dialogs it opened."""
    path = tmp_path / "page.html"
    path.write_text(page_html, encoding="utf-8")
    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, dialogs = [], []
    tab.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    tab.goto(path.as_uri(), wait_until="load")
    return tab, errors, dialogs


def _pixels(tab, selector: str):
    from PIL import Image

    box = tab.locator(selector).bounding_box()
    shot = tab.screenshot(clip=box)
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    return list(image.getdata())


def test_in_a_browser_the_page_loads_cleanly_and_draws_each_category(browser, tmp_path, a_plan):
    page_html = html_page.render(title="plan", plan=a_plan)
    tab, errors, _ = _load(browser, page_html, tmp_path)
    try:
        assert errors == []
        report = a_plan.estimate.report
        assert tab.locator("#peak").inner_text() == memfit.format_bytes(report.peak)
        assert tab.locator("#alternatives tbody tr").count() == len(a_plan.alternatives)
        # Each category covers the share of the plot its bytes predict (its exact colour, areas are opaque).
        data = _data(page_html)
        pixels = _pixels(tab, "#plot-area")
        xs, span = data["at"] + [data["x1"]], data["x1"] - data["at"][0]
        colours = dict(zip(data["names"], (html_page._colours(data["names"])[n] for n in data["names"])))
        checked = 0
        for j, name in enumerate(data["names"]):
            expected = sum(live[j] * (xs[i + 1] - xs[i]) for i, live in enumerate(data["live"])) / span / data["ymax"]
            rgb = tuple(int(colours[name][k:k + 2], 16) for k in (1, 3, 5))
            seen = sum(p == rgb for p in pixels) / len(pixels)
            assert abs(seen - expected) <= 0.01 + 0.15 * expected, (name, seen, expected)
            checked += expected > 0.02
        assert checked >= 3
    finally:
        tab.close()


def test_in_a_browser_hovering_the_peak_shows_its_op_and_bytes(browser, tmp_path, tracked):
    tab, errors, _ = _load(browser, html_page.render(title="mlp", report=tracked), tmp_path)
    try:
        assert tab.locator("#tip").is_hidden()
        line = tab.locator("#peak-line").bounding_box()
        area = tab.locator("#plot-area").bounding_box()
        tab.mouse.move(line["x"] + line["width"] / 2 + 1, area["y"] + area["height"] / 2)
        tip = tab.locator("#tip").inner_text().splitlines()
        assert tip[0] == f"op {tracked.peak_index:,}: {tracked.peak_op}"
        assert f"total {memfit.format_bytes(tracked.peak)}" in tip
        assert f"activations: {memfit.format_bytes(tracked.at_peak['activations'])}" in tip or \
            not tracked.at_peak["activations"]
        tab.mouse.move(1, 1)
        assert tab.locator("#tip").is_hidden() and errors == []
    finally:
        tab.close()


def test_in_a_browser_escaped_names_run_no_script(browser, tmp_path):
    report = _report(_random_lives(200), module=EVIL, by_module={EVIL: 1 << 20})
    tab, errors, dialogs = _load(browser, html_page.render(title="<img src=x onerror=alert(2)>", report=report),
                                 tmp_path)
    try:
        box = tab.locator("#plot-area").bounding_box()
        tab.mouse.move(box["x"] + box["width"] / 3, box["y"] + box["height"] / 2)  # the tooltip shows the name too
        assert EVIL in tab.locator("#tip").inner_text()
        assert tab.locator("#modules tbody td").first.inner_text() == EVIL
        assert tab.title() == "<img src=x onerror=alert(2)>"
        assert dialogs == [] and errors == []
    finally:
        tab.close()


def test_the_browser_harness_catches_script_errors(browser, tmp_path, tracked):
    # The checks above mean something only if a broken script would be seen.
    page_html = html_page.render(title="mlp", report=tracked)
    broken = page_html.replace("</body>", "<script>document.getElementById('nope').remove();</script></body>")
    _, errors, _ = _load(browser, broken, tmp_path)
    assert len(errors) == 1 and "page error" in errors[0]
    logged = page_html.replace("</body>", "<script>console.error('bad');</script></body>")
    _, errors, _ = _load(browser, logged, tmp_path)
    assert errors == ["console.error: bad"]
