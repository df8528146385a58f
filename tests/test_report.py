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


def test_a_report_exports_pytorchs_memory_snapshot_whose_trace_peaks_at_the_reports_peak(tmp_path):
    import pickle

    from torch.cuda import _memory_viz

    from memfit import memory_viz

    report = memfit.measure(memfit.presets.load("gpt2-tiny", seq_len=16), config=memfit.Config(micro_batch=2))
    path = report.to_memory_viz(tmp_path / "step.pickle")
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert memory_viz.trace_peak(data) == report.peak
    alive = sum(b["size"] for s in data["segments"] for b in s["blocks"] if b["state"] == "active_allocated")
    assert alive == sum(report.at_end.values())
    assert {e["category"] for e in data["device_traces"][0] if e["action"] == "alloc"} <= set(report.at_peak)
    # PyTorch's own readers take it: the text trace, the segment summary, the HTML page memory_viz draws.
    assert "TOTAL MEM" in _memory_viz.trace(data)
    assert "segments: 1" in _memory_viz.segsum(data)
    assert "MemoryViz.js" in _memory_viz.trace_plot(data)
    with pytest.raises(memfit.MemfitError, match=r"read back from a dict \(MemoryReport.from_dict\)"):
        memfit.MemoryReport.from_dict(report.to_dict()).to_memory_viz(tmp_path / "x.pickle")


def test_an_estimate_exports_its_fake_step_with_fsdps_resized_storages_and_the_same_peak(tmp_path):
    import pickle
    import sys
    from pathlib import Path

    from memfit import memory_viz

    sys.path.insert(0, str(Path(__file__).parent))
    import dist_worker

    est = memfit.estimate(dist_worker.workload(), memfit.Config(micro_batch=4, strategy="fsdp"), device="cuda",
                          world_size=2)
    with open(est.report.to_memory_viz(tmp_path / "rank.pickle"), "rb") as f:
        data = pickle.load(f)
    assert memory_viz.trace_peak(data) == est.peak
    assert any(e.get("category") == "unsharded_parameters" for e in data["device_traces"][0])


def test_the_cli_writes_memory_viz_snapshots_and_refuses_a_missing_folder_in_one_line(capsys, tmp_path):
    import pickle

    from memfit import memory_viz
    from memfit.cli import main

    path = tmp_path / "est.pickle"
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--memory-viz", str(path), "--json"]) == 0
    est = json.loads(capsys.readouterr().out)  # --json prints only JSON
    with open(path, "rb") as f:
        assert memory_viz.trace_peak(pickle.load(f)) == est["peak"]
    assert main(["profile", "cifar-cnn", "-b", "2", "--steps", "1", "--memory-viz", str(tmp_path / "p.pickle")]) == 0
    assert "Memory snapshot written to" in capsys.readouterr().out and (tmp_path / "p.pickle").stat().st_size
    assert main(["profile", "cifar-cnn", "-b", "2", "--memory-viz", str(tmp_path / "no" / "p.pickle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the folder" in err and "does not exist" in err


def test_memory_viz_to_a_bad_path_is_refused_before_any_work_and_a_full_disk_leaves_nothing(capsys, tmp_path,
                                                                                             monkeypatch):
    import errno
    import os

    from memfit import estimator, memory_viz
    from memfit.cli import main

    est_argv = ["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--memory-viz"]
    # A directory, and a folder that cannot be written (refused with its errno): one line, exit 2, before the
    # step is estimated (the estimate would fail the test if it ran).
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if ".memfit-probe-" in os.fspath(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(estimator, "estimate", lambda *a, **k: pytest.fail("the work ran before the path was checked"))
        assert main([*est_argv, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"memfit: error: --memory-viz {tmp_path}: {str(tmp_path)!r} is a directory; give the path of " \
                      "a file (in it, or beside it)\n"
        m.setattr(os, "open", read_only)
        assert main([*est_argv, str(tmp_path / "s.pickle")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write in the folder {str(tmp_path)!r} (read-only file system)" in err
    assert sorted(os.listdir(tmp_path)) == []
    # A disk that fills while the snapshot is written: one line naming it, exit 1, no 0-byte file and no temporary
    # file; a snapshot already there is left as it was.
    (tmp_path / "old.pickle").write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for name in ("new.pickle", "old.pickle"):
        assert main([*est_argv, str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write the memory snapshot to {tmp_path / name}: disk full (" in err
        assert err.rstrip().endswith("the file already there is as it was" if name == "old.pickle"
                                     else "nothing was written")
    assert os.listdir(tmp_path) == ["old.pickle"] and (tmp_path / "old.pickle").read_bytes() == b"old"
    with pytest.raises(memfit.WriteError, match="disk full") as caught:
        memory_viz.write_atomically(tmp_path / "x.bin", b"1234", "the test file")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)


def test_a_plot_to_a_full_disk_is_a_write_error_and_leaves_the_old_plot(report, tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "timeline.png"
    path.write_bytes(b"the plot before")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(memfit.WriteError, match=f"cannot write the plot to {path}: disk full .*the file already there"):
        report.plot(path)
    assert path.read_bytes() == b"the plot before" and os.listdir(tmp_path) == ["timeline.png"]  # no temporary file
