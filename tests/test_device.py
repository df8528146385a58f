"""One device lookup for every real step: what it accepts, and what it says otherwise."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.device import default_device, resolve_device


def test_devices_memfit_runs_on():
    assert resolve_device(None) == default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu0", "device 'gpu0' is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"),
    (3.5, "device 3.5 is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"),
    ("meta", "device 'meta': memfit trains on 'cpu' or 'cuda'"),
])
def test_what_is_not_a_device_memfit_runs_on_is_refused_in_one_line(device, message):
    with pytest.raises(memfit.UsageError) as info:
        resolve_device(device)
    assert str(info.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_cuda_where_torch_sees_none_says_so_or_gives_the_callers_fix():
    with pytest.raises(memfit.UsageError) as info:
        resolve_device("cuda:1")
    assert str(info.value) == "device 'cuda:1' was asked for but torch.cuda.is_available() is False; use device='cpu'"
    with pytest.raises(memfit.UsageError, match="^use the CPU$"):
        resolve_device("cuda", no_cuda="use the CPU")


def test_measure_refuses_a_device_that_is_not_one_in_one_line():
    # Before the device was looked up in one place, measure() let torch.device() raise its own RuntimeError.
    with pytest.raises(memfit.UsageError, match=r"^device 'gpu' is not a torch device"):
        memfit.measure(memfit.presets.load("cifar-cnn"), 2, device="gpu")
