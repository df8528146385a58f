"""MemoryReport: plain data, JSON round trip, table and plot rendering."""

import dataclasses
import json

import pytest
import torch

import memfit
from memfit import CATEGORIES, PHASES, MemoryReport, UsageError


@pytest.fixture(scope="module")
def report():
    return memfit.measure(memfit.presets.load("cifar-cnn"), 16)


def test_report_is_frozen_plain_int_data(report):
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.peak = 0
    assert isinstance(report.peak, int)
    for mapping in (report.at_peak, report.peak_by_category, report.at_end):
        assert list(mapping) == list(CATEGORIES)
        assert all(type(v) is int for v in mapping.values())
    assert list(report.peak_by_phase) == list(PHASES)
    assert report.peak == sum(report.at_peak.values()) == max(e.total for e in report.timeline)
    assert all(report.peak_by_category[c] >= report.at_peak[c] for c in CATEGORIES)
    assert report.timeline[report.peak_index].total == report.peak
    assert report.peak_phase == report.timeline[report.peak_index].phase
    assert report.extra == {"workload": "cifar-cnn", "micro_batch": 16, "precision": "32-true"}


def test_json_round_trip(report):
    data = json.loads(report.to_json())
    assert data["peak"] == report.peak
    assert MemoryReport.from_dict(data) == report
    short = json.loads(report.to_json(timeline=False))
    assert "timeline" not in short and short["at_peak"] == report.at_peak


def test_table_names_every_category_and_the_peak(report):
    text = report.table()
    for name in CATEGORIES:
        assert name in text
    assert f"{report.peak:,} bytes" in text
    assert memfit.format_bytes(report.peak) in text
    assert "conv1" in text  # a module of the seed CNN


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_writes_the_format_its_suffix_names(report, tmp_path, suffix, magic):
    path = report.plot(tmp_path / f"timeline{suffix}")
    assert path.read_bytes().startswith(magic)
    assert path.stat().st_size > 1000


def test_plot_rejects_an_unknown_suffix(report, tmp_path):
    with pytest.raises(UsageError, match=r"\.png, \.svg, \.pdf"):
        report.plot(tmp_path / "timeline.jpg")


def test_empty_tracker_gives_an_empty_report():
    with memfit.track(device="cpu") as t:
        pass
    r = t.report()
    assert r.peak == 0 and r.timeline == () and r.peak_op is None
    assert "Peak 0 B" in r.table()


def test_tracked_model_states_without_ops():
    model = torch.nn.Linear(10, 10)
    with memfit.track(model) as t:
        pass
    r = t.report()
    assert r.peak == r.at_peak["parameters"] == 440


def test_kept_by_module_is_what_each_forward_left_for_backward():
    # Linear(4, 8)'s output dies in ReLU (which saves its own output, 5 x 8 fp32 = 160 bytes);
    # the logits die in the sum; the batch was allocated before the forward: not the model's.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with memfit.track(model) as tracker:
        for _ in range(2):  # the second step's gradients from the first are not the forward's
            model(torch.randn(5, 4)).sum().backward()
    assert tracker.report().kept_by_module == {"": 160, "1": 160}
