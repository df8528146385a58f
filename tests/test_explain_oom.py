"""memfit.explain_oom: a user's own loop, unchanged; its out-of-memory error explained."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import memfit


class _Blow(nn.Module):
    def forward(self, x):
        return x.repeat(1, 64)  # the big activation (its line is checked)


_LINE = inspect.getsourcelines(_Blow.forward)[1] + 1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), _Blow(), nn.ReLU(), nn.Linear(16 * 64, 2))


def _loop(model, optimizer, sizes):
    for n in sizes:
        x, y = torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), torch.arange(n) % 2
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_an_oom_in_a_plain_loop_is_explained_by_what_was_live():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(memfit.OutOfMemory) as caught:
        with memfit.explain_oom(model, optimizer, simulate="400KiB"):
            # At 64 samples the repeat's 256 KiB output is live when the ReLU's 256 KiB do not fit.
            _loop(model, optimizer, [4, 8, 64])
    err = caught.value
    assert isinstance(err, torch.OutOfMemoryError) and isinstance(err.__cause__, torch.OutOfMemoryError)
    why = err.explanation
    assert why.budget == 400 * 1024 and sum(why.at_peak.values()) == why.peak == err.report.peak
    assert why.peak <= why.budget  # what was live when the next allocation did not fit
    big = why.largest[0]
    assert (big.op, big.module, big.bytes) == ("aten.repeat.default", "1", 64 * 16 * 64 * 4)
    assert big.source[0].endswith(f"test_explain_oom.py:{_LINE} in forward")
    assert "was live" in str(err) and f"test_explain_oom.py:{_LINE}" in str(err)
    assert "Tried to allocate 256.00 KiB" in str(err) and "at " + __file__ in str(err)  # the failing line
    assert why.fixes == ()  # no workload: nothing to estimate


def test_a_loop_that_fits_runs_as_without_it():
    plain, watched = _model(), _model()
    _loop(plain, torch.optim.SGD(plain.parameters(), lr=0.1), [4, 8])
    optimizer = torch.optim.SGD(watched.parameters(), lr=0.1)
    with memfit.explain_oom(watched, optimizer, simulate="1MiB") as tracker:
        _loop(watched, optimizer, [4, 8])
    assert tracker.report().peak > 0
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)


def test_with_the_workload_and_config_its_fixes_are_estimated():
    workload = memfit.Workload(model=_model, batch=lambda n: (torch.randn(n, 8), torch.arange(n) % 2),
                               loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(memfit.OutOfMemory) as caught:
        with memfit.explain_oom(model, optimizer, simulate="200KiB", workload=workload,
                                config=memfit.Config(micro_batch=64)):
            _loop(model, optimizer, [64])
    why = caught.value.explanation
    micro = next(f for f in why.fixes if f.lever.startswith("micro-batch "))
    assert micro.verified and micro.fits
    est = memfit.estimate(workload, micro.config(memfit.Config(micro_batch=64)), device="cpu", accumulation=2)
    assert est.required == micro.required


def test_bad_input_is_one_clear_error():
    with pytest.raises(memfit.UsageError, match="give both"):
        with memfit.explain_oom(_model(), workload=memfit.Workload(model=_model, batch=lambda n: n,
                                                                     loss=lambda m, b: b, optimizer=None)):
            pass
    with pytest.raises(memfit.UsageError, match="bad byte quantity"):
        with memfit.explain_oom(_model(), budget="lots"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's snapshot needs a CUDA device")
def test_on_cuda_the_allocators_snapshot_is_written(tmp_path):  # pragma: no cover - needs CUDA
    model = _model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(memfit.OutOfMemory) as caught:
        with memfit.explain_oom(model, optimizer, snapshot=tmp_path / "oom.pickle"):
            torch.empty(free * 2, dtype=torch.uint8, device="cuda")
    assert (tmp_path / "oom.pickle").stat().st_size > 0 and caught.value.snapshot == str(tmp_path / "oom.pickle")


def test_where_no_fix_fits_the_explanation_still_comes_and_names_the_closest():
    # The seed's CNN at 4 samples in 1 MiB: no fix fits, alone or together. The explanation was None (its
    # combination raised a Config error the user never gave); it names the least any combination needs.
    from memfit import presets
    from memfit.workload import build_model

    workload = presets.load("cifar-cnn")
    model = build_model(workload)
    optimizer = workload.optimizer(model.parameters())
    with pytest.raises(memfit.OutOfMemory) as caught:
        with memfit.explain_oom(model, optimizer, simulate="1MiB", workload=workload,
                                config=memfit.Config(micro_batch=4)):
            workload.loss(model, workload.batch(4)).backward()
    why = caught.value.explanation
    assert why is not None and why.combined is None and why.closest is not None
    assert why.closest.required > why.budget == 1 << 20
    assert any(note.startswith("no fix fits the budget of 1.00 MiB, alone or together") for note in why.notes)
