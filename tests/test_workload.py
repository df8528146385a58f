"""Workload and measure(): factories, loss forms, clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import MemfitError, UsageError, Workload, measure


def _workload(loss=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)):
    return Workload(
        model=lambda: nn.Linear(8, 3),
        batch=lambda n: {"x": torch.randn(n, 8), "y": torch.randint(0, 3, (n,))},
        loss=loss or (lambda m, b: F.cross_entropy(m(b["x"]), b["y"])),
        optimizer=optimizer,
    )


def test_measure_counts_the_whole_batch_as_inputs():
    report = measure(_workload(), 10, steps=1)
    # x: 10*8 float32, y: 10 int64.
    assert report.peak_by_category["inputs"] == 10 * 8 * 4 + 10 * 8
    assert report.peak_by_category["parameters"] == (8 * 3 + 3) * 4
    assert report.steps == 1


def test_token_level_loss_sum_and_count():
    def loss(model, b):
        logits = model(b["x"])
        return F.cross_entropy(logits, b["y"], reduction="sum"), b["y"].numel()

    report = measure(_workload(loss=loss), 10, steps=2)
    assert report.steps == 2
    assert report.peak_by_category["gradients"] == (8 * 3 + 3) * 4


def test_workload_without_optimizer():
    report = measure(_workload(optimizer=None), 4)
    assert report.steps == 0
    assert report.peak_by_category["gradients"] == (8 * 3 + 3) * 4


def test_workload_fields_must_be_factories():
    with pytest.raises(UsageError, match="Workload.model must be callable"):
        Workload(nn.Linear(2, 2)(torch.ones(1, 2)), lambda n: n, lambda m, b: b, None)
    with pytest.raises(UsageError, match="Workload.optimizer must be a factory"):
        Workload(lambda: nn.Linear(2, 2), lambda n: n, lambda m, b: b, optimizer=torch.ones(1))
    with pytest.raises(UsageError, match=r"Workload\.batch must be callable .* pass e\.g\. batch=lambda n: "):
        Workload(lambda: nn.Linear(2, 2), torch.ones(4, 2), lambda m, b: b, None)
    with pytest.raises(UsageError, match=r"pass e\.g\. loss=lambda model, batch: "):
        Workload(lambda: nn.Linear(2, 2), lambda n: n, 3.0, None)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_measure_rejects_bad_micro_batch(bad):
    with pytest.raises(UsageError, match="micro_batch must be a positive int"):
        measure(_workload(), bad)


def test_measure_rejects_wrong_loss_and_model():
    with pytest.raises(MemfitError, match="shape"):
        measure(_workload(loss=lambda m, b: m(b["x"])), 2)
    with pytest.raises(MemfitError, match="scalar mean tensor or \\(loss_sum, n_items\\)"):
        measure(_workload(loss=lambda m, b: "oops"), 2)
    wl = Workload(lambda: "model", lambda n: torch.ones(n), lambda m, b: b.sum(), None)
    with pytest.raises(MemfitError, match="returned str, expected a torch.nn.Module"):
        measure(wl, 2)


def test_measure_on_missing_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match="torch.cuda.is_available"):
        measure(_workload(), 2, device="cuda")


def test_batch_helpers():
    from memfit.workload import batch_size_of, move_batch

    batch = {"a": torch.ones(5, 2), "b": [torch.zeros(5), (torch.ones(5, 1, 1),)]}
    assert batch_size_of(batch) == 5
    moved = move_batch(batch, "cpu")
    assert isinstance(moved["b"][1], tuple)
    with pytest.raises(UsageError, match="first dimensions \\[3, 5\\]"):
        batch_size_of({"a": torch.ones(5), "b": torch.ones(3)})
    assert memfit.presets.load("cifar-cnn").name == "cifar-cnn"
