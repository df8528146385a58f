"""memfit.explain: the anatomy of a peak, the seed's causes, and fixes each verified by a separate estimate."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn

import memfit
from memfit import presets
from memfit.cli import main
from memfit.explain import explain

_BLOW = 64  # the known big activation: the input repeated this many times


class _Blow(nn.Module):
    def forward(self, x):
        return x.repeat(1, _BLOW)  # the big activation (its line is checked)


_BLOW_LINE = inspect.getsourcelines(_Blow.forward)[1] + 1


def _blow_workload() -> memfit.Workload:
    def model():
        return nn.Sequential(nn.Linear(8, 16), _Blow(), nn.Linear(16 * _BLOW, 2))

    return memfit.Workload(model=model, batch=lambda n: (torch.randn(n, 8), torch.randint(0, 2, (n,))),
                           loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), name="blow")


def test_the_largest_tensor_is_the_known_activation_with_its_module_and_line():
    why = explain(_blow_workload(), memfit.Config(micro_batch=32), device="cpu", fixes=False)
    assert sum(why.at_peak.values()) == why.peak
    big = why.largest[0]
    assert (big.category, big.op, big.module, big.count) == ("activations", "aten.repeat.default", "1", 1)
    assert big.bytes == 32 * 16 * _BLOW * 4  # float32, exactly
    assert big.source == (f"{__file__.rpartition('/')[2]}:{_BLOW_LINE} in forward",) or \
        big.source[0].endswith(f"test_explain.py:{_BLOW_LINE} in forward")
    # The causes add up to what they name: the activations and the batch are the batch's cause.
    batch = next(c for c in why.causes if c.cause == "batch and input size")
    assert batch.bytes == why.at_peak["activations"] + why.at_peak["inputs"]
    model = next(c for c in why.causes if c.cause == "model size")
    assert model.bytes == sum(why.at_peak[k] for k in ("parameters", "buffers", "gradients", "optimizer_state"))


def test_alike_tensors_of_every_block_are_one_group_with_the_blocks_line():
    w = presets.load("gpt2-tiny", n_layer=3)
    why = explain(w, memfit.Config(micro_batch=4), device="cpu", fixes=False, top=40)
    per_block = [t for t in why.largest if t.module is not None and ".h.*." in t.module]
    assert per_block and all(t.count % 3 == 0 for t in per_block)  # one (or more) per block
    made = [t for t in per_block if t.category == "activations"]
    assert made and all(t.source and all(line.startswith("transformers/") for line in t.source) for t in made)
    assert any("modeling_gpt2.py:" in line for t in made for line in t.source)


def _verify(workload, base, why, device):
    """Each fix's figures against a separate estimate of the fixed configuration."""
    assert why.fixes
    share = -(-why.batch_size // why.world_size)
    for fix in why.fixes + ((why.combined,) if why.combined else ()):
        config = fix.config(base) or base
        w = workload if fix.optimizer is None else dataclasses.replace(workload, optimizer=fix.optimizer)
        rank_share = -(-why.batch_size // fix.world_size)
        est = memfit.estimate(w, config, device=device, world_size=fix.world_size,
                              accumulation=2 if config.micro_batch < rank_share else 1)
        assert fix.verified and est.required == fix.required, fix.lever
        assert fix.saves == why.required - est.required, fix.lever
        if why.budget is not None:
            assert fix.fits == (est.required <= why.budget), fix.lever
    assert share == why.batch_size


def test_every_fix_is_verified_by_a_separate_estimate_and_the_ranking_puts_fits_first():
    w = presets.load("gpt2-tiny", n_layer=3)
    base = memfit.Config(micro_batch=8)
    full = memfit.estimate(w, base, device="cuda").required
    # A budget between the step and the step with micro-batch 4: some fixes fit, some do not.
    half = memfit.estimate(w, dataclasses.replace(base, micro_batch=4), device="cuda", accumulation=2).required
    why = explain(w, base, budget=(full + half) // 2, device="cuda")
    assert why.required == full and why.fits is False
    _verify(w, base, why, "cuda")
    levers = [f.lever for f in why.fixes]
    assert any(lever.startswith("micro-batch ") for lever in levers)
    assert "checkpoint='all'" in levers and "precision bf16-true" in levers
    flags = [f.fits for f in why.fixes]
    assert flags == sorted(flags, reverse=True)  # the ones that fit come first
    fitting = [f.step_cost for f in why.fixes if f.fits]
    assert fitting == sorted(fitting)
    micro = next(f for f in why.fixes if f.lever.startswith("micro-batch "))
    assert micro.fits and dict(micro.change)["micro_batch"] < 8
    assert why.options and why.options[0].verified is False  # LoRA: named, by arithmetic
    data = json.loads(json.dumps(why.to_dict()))
    assert data["fixes"][0]["required"] == why.fixes[0].required and data["fits"] is False


def test_where_no_fix_fits_alone_a_combination_does_and_is_verified():
    # One sample a step: no smaller micro-batch and no GPUs to share it; precision and checkpointing
    # each save some, and only both together fit.
    w = presets.load("gpt2-tiny", seq_len=256)
    base = memfit.Config(micro_batch=1)
    both = memfit.estimate(w, memfit.Config(micro_batch=1, precision="bf16-true", checkpoint="all"), device="cpu")
    why = explain(w, base, budget=both.required + 512, device="cpu")
    assert not any(f.fits for f in why.fixes)
    assert why.combined is not None and why.combined.fits
    assert dict(why.combined.change)["precision"] == "bf16-true" and why.combined.lever.count("+") >= 1
    _verify(w, base, why, "cpu")


def test_an_estimate_or_a_measured_report_is_explained_too():
    w = _blow_workload()
    est = memfit.estimate(w, memfit.Config(micro_batch=16), device="cpu")
    why = explain(est, budget=est.required - 1, workload=w)
    assert why.peak == est.peak and why.fixes and all(f.verified for f in why.fixes)
    report = memfit.measure(w, config=memfit.Config(micro_batch=16))
    measured = explain(report)
    assert measured.peak == report.peak and measured.fixes == ()
    assert any("give the workload" in note for note in measured.notes)
    assert measured.largest[0].op == "aten.repeat.default"


def test_bad_input_is_one_clear_error():
    w = _blow_workload()
    with pytest.raises(memfit.UsageError, match="give a memfit.Config"):
        explain(w)
    with pytest.raises(memfit.UsageError, match="bad byte quantity"):
        explain(w, memfit.Config(micro_batch=2), budget="lots")
    with pytest.raises(memfit.UsageError, match="fewer than the micro-batch 4"):
        explain(w, memfit.Config(micro_batch=4), batch_size=2)
    with pytest.raises(memfit.UsageError, match="takes a memfit.Workload, Estimate or MemoryReport"):
        explain("gpt2")
    report = memfit.MemoryReport.from_dict(memfit.measure(w, config=memfit.Config(micro_batch=2)).to_dict())
    with pytest.raises(memfit.UsageError, match="keeps no record"):
        explain(report)


def test_plan_error_and_out_of_memory_carry_the_explanation():
    w = _blow_workload()
    with pytest.raises(memfit.PlanError) as caught:
        memfit.plan(w, 2048, 16, device="cpu")
    why = caught.value.explanation
    assert why is not None and why.budget == 2048 and sum(why.at_peak.values()) == why.peak
    assert "What the peak is made of" in why.table() and ("Fixes, each estimated" in why.table()) == bool(why.fixes)
    # Out of memory at micro-batch 1 under a simulated device: what was live, and fixes verified.
    trainer = memfit.Trainer(w, memfit.Config(micro_batch=4), device="cpu", budget="30KiB")
    with pytest.raises(memfit.OutOfMemory) as caught:
        trainer.step(w.batch(4))
    why = caught.value.explanation
    assert why is not None and why.budget == 30 * 1024
    assert sum(why.at_peak.values()) == why.peak and why.largest


def test_cli_explain_prints_the_tables_and_json_and_rejects_bad_flags(capsys):
    assert main(["explain", "gpt2-tiny", "-b", "4", "--device", "cpu", "--budget", "3MiB"]) == 0
    out = capsys.readouterr().out
    assert "What the peak is made of" in out and "Fixes, each estimated" in out
    assert main(["explain", "gpt2-tiny", "-b", "4", "--device", "cpu", "--no-fixes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fixes"] == [] and sum(data["at_peak"].values()) == data["peak"]
    assert main(["explain", "gpt2-tiny", "-b", "4", "--budget", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad byte quantity" in err


def test_cli_plan_that_nothing_fits_prints_the_explanation_then_one_line(capsys):
    assert main(["plan", "gpt2-tiny", "-b", "8", "--budget", "1MiB", "--device", "cpu", "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["explanation"]["budget"] == 1 << 20 and data["explanation"]["fixes"]
    assert all(f["verified"] for f in data["explanation"]["fixes"])
    assert captured.err.count("\n") == 1 and "nothing fits" in captured.err


def test_where_nothing_fits_the_closest_combination_is_named_and_the_step_in_backward_is_left_out_of_fsdp():
    # The seed's CNN at 4 samples in 1 MiB: no lever fits, alone or together. The greedy combination picks the
    # step in backward, which cannot run with FSDP or a smaller micro-batch: it is left out there, not raised
    # (it was: "Config.optimizer_in_backward runs on one process only", a Config the user never gave).
    w = presets.load("cifar-cnn")
    base = memfit.Config(micro_batch=4)
    why = explain(w, base, budget="1MiB", device="cpu")
    assert any(f.lever == "optimizer_in_backward=True" for f in why.fixes) and not any(f.fits for f in why.fixes)
    assert why.combined is None and why.closest is not None and why.closest.fits is False
    assert "optimizer_in_backward" not in why.closest.lever  # it cannot run with the micro-batch chosen
    # The closest is the least any fix needs, alone or together, and its figure is a separate estimate's.
    assert why.closest.required <= min(f.required for f in why.fixes)
    config = why.closest.config(base)
    est = memfit.estimate(w, config, device="cpu", world_size=why.closest.world_size,
                          accumulation=2 if config.micro_batch < 4 else 1)
    assert est.required == why.closest.required > 1 << 20
    note = next(n for n in why.notes if n.startswith("no fix fits"))
    assert f"the least found, {why.closest.lever}, needs " in note and "short" in note
    assert json.loads(json.dumps(why.to_dict()))["closest"]["required"] == est.required


def test_cli_explain_where_nothing_fits_says_so_and_exits_0(capsys):
    assert main(["explain", "cifar-cnn", "-b", "4", "--budget", "1MiB", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "No combination of these fixes fits" in captured.out
    assert "Note: no fix fits the budget of 1.00 MiB, alone or together: the least found" in captured.out
