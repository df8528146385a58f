"""simulate_budget: raises CUDA's OOM exactly when the counted bytes cross the budget."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import memfit
from memfit import simulate_budget
from memfit.step import run_steps


def _run(workload, n, budget):
    model = workload.model()
    optimizer = workload.optimizer(model.parameters())
    with simulate_budget(budget, model, optimizer) as sim:
        run_steps(workload, model, optimizer, n, 2, tracker=sim)
    return sim


@pytest.mark.parametrize("name", ["cifar-cnn", "gpt2-tiny"])  # the presets small enough to run for real
def test_budget_equal_to_the_peak_passes_and_one_byte_less_raises(name):
    workload = memfit.presets.load(name)
    peak = memfit.measure(workload, 8).peak
    assert _run(workload, 8, peak).report().peak == peak
    with pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate"):
        _run(workload, 8, peak - 1)


def test_message_names_the_simulated_budget():
    model = nn.Linear(1024, 1024)
    with pytest.raises(torch.OutOfMemoryError) as info:
        with simulate_budget("5MiB", model):
            model(torch.ones(512, 1024))
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 2.00 MiB.")
    assert "Simulated budget of 5.00 MiB" in message
    assert "memfit.simulate_budget" in message


def test_budget_takes_strings_and_ints_and_rejects_nonsense():
    assert simulate_budget("1.5 GiB").budget == 3 * 2**29
    assert simulate_budget(1000).budget == 1000
    with pytest.raises(ValueError, match="bad byte quantity"):
        simulate_budget("24 gigs")


def test_oom_in_backward_keeps_its_type_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    x = torch.randn(64, 256)
    with memfit.track(model) as t:
        model(x).pow(2).mean().backward()
    report = t.report()
    model.zero_grad(set_to_none=True)
    assert report.peak_by_phase["backward"] > report.peak_by_phase["forward"]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(torch.OutOfMemoryError):
        with simulate_budget(report.peak_by_phase["forward"] + 1, model) as sim:
            loss = model(x).pow(2).mean()
            reached_backward = True
            loss.backward()
    assert reached_backward
    assert sim.report().peak <= report.peak_by_phase["forward"] + 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_process_goes_on_normally_after_the_error():
    model = nn.Linear(64, 64)
    with pytest.raises(torch.OutOfMemoryError):
        with simulate_budget(20_000, model):
            model(torch.randn(1000, 64))
    assert _get_current_dispatch_mode() is None
    big = torch.zeros(10**6)  # no budget outside the block
    assert big.numel() == 10**6
    assert model(torch.randn(1000, 64)).shape == (1000, 64)


def test_model_states_alone_over_budget_raise_on_entry():
    model = nn.Linear(1000, 1000)
    states = (1000 * 1000 + 1000) * 4
    with simulate_budget(states, model) as sim:  # exactly the weights: they fit
        pass
    assert sim.peak == states
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 3\.91 KiB\. Simulated budget of 3\.82 MiB"):
        with simulate_budget(states - 1, model):  # one byte short: the bias (4000 bytes) no longer fits
            pass
    assert _get_current_dispatch_mode() is None


def test_lightning_and_accelerate_recognise_the_error():
    from accelerate.utils.memory import should_reduce_batch_size
    from lightning.pytorch.utilities.memory import is_oom_error

    model = nn.Linear(64, 64)
    with pytest.raises(torch.OutOfMemoryError) as info:
        with simulate_budget(20_000, model):
            model(torch.randn(1000, 64))
    assert is_oom_error(info.value)
    assert should_reduce_batch_size(info.value)


def test_accelerate_find_executable_batch_size_backs_off_under_the_budget():
    from accelerate.utils import find_executable_batch_size

    workload = memfit.presets.load("cifar-cnn")
    budget = memfit.measure(workload, 16).peak
    tried = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size):
        tried.append(batch_size)
        _run(workload, batch_size, budget)
        return batch_size

    found = train()
    # Accelerate shrinks by 0.9x per OOM; every size above 16 must have failed.
    assert tried[0] == 128 and tried[-1] == found
    assert all(a > b for a, b in zip(tried, tried[1:]))
    assert found <= 16 < tried[-2]
    assert memfit.measure(workload, found).peak <= budget


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4096), min_size=1, max_size=16), st.integers(0, 40_000))
def test_the_budget_raises_at_the_first_allocation_that_would_cross_it(sizes, budget):
    totals = list(itertools.accumulate(sizes))
    crossing = next((i for i, total in enumerate(totals) if total > budget), None)
    kept = []
    try:
        with simulate_budget(budget, device="cpu") as sim:
            for n in sizes:
                kept.append(torch.empty(n, dtype=torch.uint8))
    except torch.OutOfMemoryError as exc:
        assert crossing is not None and len(kept) == crossing  # nothing before it failed, it did
        assert str(exc).startswith(f"CUDA out of memory. Tried to allocate {memfit.format_bytes(sizes[crossing])}.")
        assert sim.live_bytes() == (totals[crossing - 1] if crossing else 0)
    else:
        assert crossing is None and sim.peak == totals[-1] <= budget


@pytest.mark.parametrize("budget, free", [(128, "0 B"), (150, "22 B")])
def test_the_out_of_memory_message_in_full(budget, free):
    # 64 B of weights and a 64 B input are live; the 64 B output is one allocation too many.
    model = nn.Linear(4, 4, bias=False)
    with pytest.raises(torch.OutOfMemoryError) as info, simulate_budget(budget, model):
        model(torch.ones(4, 4))
    assert str(info.value) == (
        f"CUDA out of memory. Tried to allocate 64 B. Simulated budget of {budget} B ({budget} bytes) by "
        f"memfit.simulate_budget on cpu: 128 B in use, {free} free. No real device ran out; reduce the "
        "micro-batch or raise the budget.")
