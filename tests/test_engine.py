"""The engine's parts on their own: the probe's byte counts, the leak check's signals, the guard's helpers.

The Trainer's behaviour (tests/test_trainer.py) rests on these; here each is driven directly,
at its exact boundaries, with scripted inputs a whole training run could not produce on a CPU
(CUDA's device type, live-byte sequences chosen byte by byte).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn

from memfit import Config, LeakWarning
from memfit.engine.guard import OOMGuard, _uses_foreach
from memfit.engine.leak import LeakCheck
from memfit.engine.probe import Probe, model_state_bytes

MiB = 1 << 20
CUDA = torch.device("cuda")  # a device object only: nothing runs on it


def _bn_model() -> nn.Module:
    """Linear(4, 3) and BatchNorm1d(3) in float32: 15 + 6 parameters (84 B), 3 + 3 + 1 buffers (32 B)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_model_state_bytes_counts_each_storage_once_and_skips_meta_and_missing_gradients():
    model = _bn_model()
    model.register_buffer("placeholder", torch.empty(1000, device="meta"))  # no memory: not counted
    model.tied = nn.Linear(4, 3)
    model.tied.weight = model[0].weight  # the same storage twice: counted once
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert model_state_bytes(model, optimizer) == {"parameters": 84 + 12 + 32, "gradients": 0, "optimizer_state": 0}
    # Only the last parameter has a gradient: the ones before it (None) are skipped, not the end of the count.
    params = list(model.parameters())
    params[-1].grad = torch.ones_like(params[-1])
    assert model_state_bytes(model, optimizer)["gradients"] == params[-1].numel() * 4
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # a momentum buffer per parameter, tied ones once
    assert model_state_bytes(model, optimizer) == {"parameters": 128, "gradients": 96, "optimizer_state": 96}


def test_the_probe_without_a_simulated_budget_counts_model_states_and_the_rest():
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(torch.device("cpu"), None, model, optimizer)
    assert probe.live_bytes() is None  # no device count to read on the CPU without a budget
    assert probe.live_by_category(10_000) == {
        "parameters": 116, "gradients": 0, "optimizer_state": 0,
        "other (activations, inputs, or tensors kept from earlier steps)": 10_000 - 116}


def test_the_allocator_cache_is_released_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Probe(torch.device("cpu"), None, model, optimizer).release_cached_memory()
    assert calls == []
    Probe(CUDA, None, model, optimizer).release_cached_memory()
    assert calls == [1]


@pytest.mark.parametrize("foreach, device, expected", [
    (None, CUDA, True),  # torch.optim's default: foreach on CUDA...
    (None, torch.device("cpu"), False),  # ...the per-tensor loop elsewhere
    (False, CUDA, False),
    (True, torch.device("cpu"), True),
])
def test_which_optimizers_use_the_foreach_implementation(foreach, device, expected):
    model = _bn_model()
    assert _uses_foreach(torch.optim.Adam(model.parameters(), foreach=foreach), device) is expected
    assert _uses_foreach(torch.optim.LBFGS(model.parameters()), device) is False  # it has no foreach option


def _guard_on(device: torch.device, plan=None, live=None) -> OOMGuard:
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = types.SimpleNamespace(live_bytes=lambda: live)
    return OOMGuard(types.SimpleNamespace(model=model, optimizer=optimizer, device=device, plan=plan, _probe=probe,
                                          _workload=None))  # built from parts: no estimates


def test_out_of_memory_advice_on_cuda_names_offloading_the_plan_and_what_was_live():
    plan = types.SimpleNamespace(required=3 * MiB, budget=4 * MiB)
    advice = _guard_on(CUDA, plan, live=2 * MiB).advice(Config(micro_batch=8))
    assert advice == (
        "precision 'bf16-mixed' (or '16-mixed' on GPUs without bf16) halves activations",
        "checkpoint='all' recomputes each block's activations in backward",  # a Sequential's layers are blocks
        "offload_activations=True keeps saved activations in CPU memory",
        "the plan predicted 3.00 MiB of 4.00 MiB; if something else holds device memory, plan for less "
        "(memfit plan --budget)",
        "2.00 MiB was still live after the failure; the model states alone are 116 B",
        "a larger budget or device",
    )
    # Offloading already on, or a CPU run (nothing to offload to): not advised.
    offloaded = _guard_on(CUDA).advice(Config(micro_batch=8, precision="bf16-mixed", offload_activations=True))
    assert offloaded == ("checkpoint='all' recomputes each block's activations in backward", "a larger budget or device")
    assert not any("offload" in line for line in _guard_on(torch.device("cpu")).advice(Config(micro_batch=8)))


class _ScriptedProbe:
    """Live bytes read from a script, one value per read; model states from a function of them."""

    def __init__(self, lives, states=lambda live: {}):
        self.lives = iter(lives)
        self.states = states

    def live_bytes(self):
        return next(self.lives)

    def live_by_category(self, live):
        return {**self.states(live), "activations": live - sum(self.states(live).values())}


def _warned_at(lives, states=lambda live: {}) -> int | None:
    """The step at whose start the leak check warns, reading ``lives`` at steps 2, 3, ... (None: never)."""
    check = LeakCheck(_ScriptedProbe(lives, states))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps_run in range(1, len(lives) + 1):
            check.check(steps_run, steps_run + 1)
            if any(issubclass(w.category, LeakWarning) for w in caught):
                return steps_run + 1
    return None


def test_growth_over_the_baseline_warns_past_1_mib_or_1_percent_not_at_it():
    base = 10 * MiB
    assert _warned_at([base, base + MiB, base + MiB]) is None  # exactly 1 MiB more: tolerated
    assert _warned_at([base, base + MiB, base + MiB + 1]) == 4
    big = 1000 * MiB  # 1% of it (10 MiB) is the tolerance
    assert _warned_at([big, big + 5 * MiB, big + 10 * MiB, big + 10 * MiB + 1]) == 5
    assert _warned_at([base, base, None]) is None  # no count at a start: nothing to compare


def test_live_memory_rising_at_eight_starts_in_a_row_warns_outside_the_model_states():
    base = 10 * MiB
    rising = [base + 1024 * i for i in range(9)]  # 8 KiB in all: far below the 1 MiB tolerance
    assert _warned_at(rising) == 10
    assert _warned_at(rising[:-1] + [rising[-2]]) is None  # one start that did not grow: no signal
    assert _warned_at([base] * 9) is None
    # Every start above the one two before it, but not above the one before: not rising at each start.
    zigzag = [base + 1024 * k for k in (0, 2, 1, 3, 2, 4, 3, 5, 4)]
    assert _warned_at(zigzag) is None


def test_rising_live_memory_that_is_model_state_growth_is_not_a_leak():
    base = 10 * MiB
    rising = [base + 1024 * i for i in range(9)]
    params = {"parameters": 4 * MiB}  # unchanged since the baseline: not growth

    def optimizer_state(grown):
        return lambda live: {**params, "optimizer_state": max(live - base - grown, 0)}

    assert _warned_at(rising, optimizer_state(0)) is None  # all of the growth is optimizer state (created lazily)
    assert _warned_at(rising, optimizer_state(1)) == 10  # one byte of it is something else
