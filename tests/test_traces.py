"""Traces (memfit/traces.py): cached steps, and micro-batches derived from a line through three traced ones."""

import pytest

import memfit
from memfit import Config, estimate
from memfit import traces


def _same(a, b):
    x, y = a.to_dict(), b.to_dict()
    x.pop("notes"), y.pop("notes")
    assert x == y
    assert a.report.timeline == b.report.timeline and a.allocator == b.allocator


@pytest.mark.parametrize("device, config", [
    ("cpu", Config(micro_batch=1, precision="bf16-mixed")),
    ("cuda", Config(micro_batch=1, precision="16-mixed", checkpoint="all")),
    ("cuda", Config(micro_batch=1, optimizer_impl="foreach", zero_grad="after-forward")),
])
def test_micro_batches_derived_from_the_line_equal_traced_ones(device, config):
    traces.clear()
    workload = memfit.presets.load("gpt2-tiny", seq_len=32)
    for m in (2, 3, 5):  # traced: the third checks the line through the first two
        assert not any(n.startswith("derived") for n in estimate(workload, Config(**{**_fields(config), "micro_batch": m}),
                                                                  device=device, accumulation=2).notes)
    for m in (1, 4, 9):
        cfg = Config(**{**_fields(config), "micro_batch": m})
        derived = estimate(workload, cfg, device=device, accumulation=2)
        assert (derived.notes[-1:] == ("derived from the step traced at micro-batches 2 and 3 (exact: a third was "
                                       "predicted byte for byte)",)) == (m > 1)  # 1 is off GPT-2's line: traced
        _same(derived, estimate(workload, cfg, device=device, accumulation=2, extrapolate=False))


def _fields(config):
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def test_a_repeated_estimate_is_reused_and_a_different_config_is_not():
    traces.clear()
    workload = memfit.presets.load("gpt2-tiny", seq_len=32)
    first = estimate(workload, Config(micro_batch=2))
    assert len(traces._CACHE) == 1
    again = estimate(workload, Config(micro_batch=2))
    assert len(traces._CACHE) == 1
    _same(first, again)
    estimate(workload, Config(micro_batch=2, precision="bf16-true"))
    assert len(traces._CACHE) == 2
    estimate(workload, Config(micro_batch=2), extrapolate=False)  # a full trace, kept nowhere
    assert len(traces._CACHE) == 2


def test_a_step_whose_ops_depend_on_the_micro_batch_gets_no_line():
    import torch
    from torch import nn

    def loss(model, batch):
        x = batch[0]
        if x.shape[0] % 2:  # odd micro-batches take another path
            x = torch.cat([x, x]) [: x.shape[0]]
        return model(x).sum()

    workload = memfit.Workload(model=lambda: nn.Linear(8, 8), batch=lambda n: (torch.randn(n, 8),), loss=loss,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    traces.clear()
    for m in (2, 4, 3, 5, 6):
        est = estimate(workload, Config(micro_batch=m))
        assert not any(n.startswith("derived") for n in est.notes)
        _same(est, estimate(workload, Config(micro_batch=m), extrapolate=False))


def test_a_model_instance_changed_between_estimates_is_traced_again():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    workload = memfit.Workload(model=model, batch=lambda n: (torch.randn(n, 16),), loss=lambda m, b: m(b[0]).sum(),
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    before = estimate(workload, Config(micro_batch=8))
    model[2] = nn.Linear(16, 64)  # the same object, a wider head
    after = estimate(workload, Config(micro_batch=8))
    assert after.model_states > before.model_states
    assert after.peak == estimate(workload, Config(micro_batch=8), extrapolate=False).peak
