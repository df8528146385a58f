"""Depth extrapolation (memfit/depth.py): estimates from cut models equal full traces byte for byte, or fall back."""

import pytest
import torch
from torch import nn

import memfit
from memfit import Config, estimate
from memfit.depth import Run, repeated_run, truncated
from memfit.workload import Workload


def _same(extrapolated, full):
    """Every figure of the two estimates, the timeline and the allocator's replay included."""
    a, b = extrapolated.to_dict(), full.to_dict()
    a.pop("notes"), b.pop("notes")
    assert a == b
    assert extrapolated.report.timeline == full.report.timeline
    assert extrapolated.allocator == full.allocator


def _extrapolated(est) -> bool:
    return any(note.startswith("extrapolated from") for note in est.notes)


@pytest.mark.parametrize("device, config, accumulation", [
    ("cpu", Config(micro_batch=3), 1),
    ("cpu", Config(micro_batch=2, precision="bf16-mixed", zero_grad="zeros"), 2),
    ("cpu", Config(micro_batch=2, zero_grad="after-forward"), 1),
    ("cuda", Config(micro_batch=2, precision="16-mixed", checkpoint="all"), 1),
    ("cuda", Config(micro_batch=2, precision="bf16-true", checkpoint=("transformer.h.*.mlp",)), 2),
    ("cuda", Config(micro_batch=2, optimizer_in_backward=True, offload_activations=True), 1),
])
def test_extrapolated_gpt2_equals_the_full_trace(device, config, accumulation):
    workload = memfit.presets.load("gpt2-tiny", n_layer=7, seq_len=32)
    full = estimate(workload, config, device=device, accumulation=accumulation, extrapolate=False)
    est = estimate(workload, config, device=device, accumulation=accumulation, extrapolate=True)
    assert _extrapolated(est), est.notes
    assert "of the 7 identical blocks of transformer.h" in est.notes[0]
    _same(est, full)
    assert not full.notes


def test_presets_are_extrapolated_by_default_and_exactly():
    # GPT-2's 12 blocks and Llama 2 7B's 32: 8 or more blocks is worth it without being asked.
    for name, config in (("gpt2", Config(micro_batch=2, precision="bf16-mixed")),
                         ("llama-7b", Config(micro_batch=1, precision="bf16-true"))):
        workload = memfit.presets.load(name, seq_len=16)
        est = estimate(workload, config, device="cuda")
        assert _extrapolated(est), (name, est.notes)
        _same(est, estimate(workload, config, device="cuda", extrapolate=False))


def test_a_short_run_is_traced_in_full_unless_asked():
    workload = memfit.presets.load("gpt2-tiny", n_layer=6, seq_len=16)
    assert estimate(workload, Config(micro_batch=2)).notes == ()
    assert _extrapolated(estimate(workload, Config(micro_batch=2), extrapolate=True))


class _Stack(nn.Module):
    """Identical blocks of parameters; ``odd_every`` makes every such block allocate more in its forward."""

    def __init__(self, depth: int = 8, width: int = 16, odd_every: int = 0, wide_first: bool = False) -> None:
        super().__init__()
        first = nn.Sequential(nn.Linear(width, width * (2 if wide_first else 1)), nn.ReLU(),
                              nn.Linear(width * (2 if wide_first else 1), width))
        self.blocks = nn.ModuleList([first] + [nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                                             nn.Linear(width, width)) for _ in range(depth - 1)])
        self.odd_every = odd_every
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            y = block(x)
            if self.odd_every and i % self.odd_every == self.odd_every - 1:
                y = y * torch.cat([y, y], dim=1)[:, : y.shape[1]]  # a temporary and a saved product more
            x = x + y
        return self.head(x)


def _stack(**kwargs) -> Workload:
    return Workload(model=lambda: _Stack(**kwargs), batch=lambda n: (torch.randn(n, 16), torch.randint(0, 2, (n,))),
                    loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), name="stack")


def test_blocks_that_allocate_differently_fall_back_and_say_so():
    # Every second or third block allocates more: the full model is traced, and the note says why
    # the last cuts tried (2 and 3 blocks) failed: the third block differs from the second.
    for odd_every in (2, 3):
        workload = _stack(odd_every=odd_every)
        est = estimate(workload, Config(micro_batch=4), extrapolate=True)
        assert est.notes == ("traced in full: the step with one more block of blocks is not the step plus that "
                             "block's records",), est.notes
        _same(est, estimate(workload, Config(micro_batch=4), extrapolate=False))
    # Every fourth: the cuts to 2 and 3 blocks agree with each other; the check at 4 sees the odd one.
    workload = _stack(odd_every=4)
    est = estimate(workload, Config(micro_batch=4), extrapolate=True)
    assert est.notes == ("traced in full: the step with two more blocks of blocks is not predicted by those with "
                         "none and one more (the blocks differ in what they allocate)",), est.notes
    _same(est, estimate(workload, Config(micro_batch=4), extrapolate=False))
    # Without the odd blocks the same model is extrapolated.
    plain = _stack()
    assert _extrapolated(est := estimate(plain, Config(micro_batch=4), extrapolate=True))
    _same(est, estimate(plain, Config(micro_batch=4), extrapolate=False))


def test_a_first_block_that_differs_stays_outside_the_run():
    workload = _stack(depth=9, wide_first=True)
    run = repeated_run(workload.model())
    assert run == Run("blocks", start=1, count=8, modules=8 * 4)
    est = estimate(workload, Config(micro_batch=4), device="cuda", extrapolate=True)
    assert "of the 8 identical blocks of blocks" in est.notes[0]
    _same(est, estimate(workload, Config(micro_batch=4), device="cuda", extrapolate=False))


def test_a_checkpoint_set_that_alternates_is_traced_in_full():
    workload = _stack()
    config = Config(micro_batch=4, checkpoint=("blocks.0", "blocks.3"))
    est = estimate(workload, config, extrapolate=True)
    assert est.notes == ("traced in full: the checkpoint set alternates over the 8 blocks of blocks (4 segments; at "
                         "most 2, such as the first k blocks, are extrapolated)",)
    _same(est, estimate(workload, config, extrapolate=False))


@pytest.mark.parametrize("checkpoint", [("blocks.0", "blocks.1", "blocks.2"), ("blocks.*.0",),
                                        tuple(f"blocks.{i}" for i in range(3, 9))])
def test_a_checkpoint_set_over_the_first_or_last_blocks_is_extrapolated(checkpoint):
    workload = _stack(depth=9)
    config = Config(micro_batch=4, checkpoint=checkpoint)
    est = estimate(workload, config, device="cuda", extrapolate=True)
    assert _extrapolated(est), est.notes
    full = estimate(workload, config, device="cuda", extrapolate=False)
    _same(est, full)
    assert est.checkpointed == full.checkpointed


def test_repeated_run_finds_the_largest_run_and_no_shared_block():
    model = _Stack(depth=6)
    assert repeated_run(model) == Run("blocks", start=0, count=6, modules=6 * 4)
    assert repeated_run(model, minimum=7) is None
    shared = nn.Linear(4, 4)
    assert repeated_run(nn.Sequential(*[shared] * 6)) is None  # one module called six times


def test_truncated_restores_the_container_also_after_an_error():
    model = _Stack(depth=6)
    run = repeated_run(model)
    with pytest.raises(RuntimeError), truncated(model, run, 2) as cut:
        assert len(cut.blocks) == 2
        raise RuntimeError("boom")
    assert len(model.blocks) == 6


def test_the_cli_says_how_the_estimate_was_traced(capsys):
    from memfit.cli import main

    assert main(["estimate", "gpt2", "--seq-len", "16", "-b", "1", "--precision", "bf16-true"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Note: extrapolated from the step with 2 and 3 of the 12 identical blocks of transformer.h" in out
    assert main(["estimate", "gpt2", "--seq-len", "16", "-b", "1", "--precision", "bf16-true", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["notes"][0].startswith("extrapolated from the step with 2 and 3")


def test_a_bad_extrapolate_value_is_named_with_the_valid_ones():
    with pytest.raises(memfit.UsageError, match=r"extrapolate must be None \(.*\), True or False, got 'yes'"):
        estimate(_stack(), Config(micro_batch=2), extrapolate="yes")
