"""Trainer: exact accumulation against full-batch runs, the OOM guard against fault-free runs, resume, leaks."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import random
import re
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import memfit
import memfit.statefile
from memfit import Config, LeakWarning, OutOfMemory, StepResult, Trainer
from memfit.engine.comm import FAILED, OK, OOM, LocalComm, PeerOutOfMemory
from memfit.planner import Alternative


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_same_weights(a: nn.Module, b: nn.Module, rel: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert _rel(p.detach(), q.detach()) <= rel, f"{name}: relative difference {_rel(p.detach(), q.detach()):.2e} > {rel}"


# ---------------------------------------------------------------------- models and losses


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def classification_batches(k: int, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(k)]


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def token_loss(model, batch):
    """Token-level: the sum over non-padding tokens and their count (labels == -100 is padding)."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()


def token_batches(k: int, n: int, seq: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(0, 11, (n, seq), generator=g)
        labels = ids.roll(-1, dims=1).clone()
        lengths = torch.randint(1, seq + 1, (n,), generator=g)  # variable padding per row
        labels[torch.arange(seq)[None, :] >= lengths[:, None]] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def full_batch_run(model, optimizer, loss_fn, batches):
    """The reference: each batch in one piece, the loss's own mean (sum / items for token losses)."""
    for batch in batches:
        out = loss_fn(model, batch)
        loss = out[0] / out[1] if isinstance(out, tuple) else out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


# ---------------------------------------------------------------------- exact accumulation


@pytest.mark.parametrize("micro", range(1, 8))
@pytest.mark.parametrize("task", ["classification", "token"])
def test_any_split_equals_the_full_batch(task, micro):
    n, k = 7, 3
    if task == "classification":
        make, loss_fn, batches = mlp, classification_loss, classification_batches(k, n)
    else:
        make, loss_fn, batches = (lambda: (torch.manual_seed(0), TinyLM())[1]), token_loss, token_batches(k, n)
    ref = make()
    model = copy.deepcopy(ref)
    full_batch_run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), loss_fn, batches)

    trainer = Trainer.from_parts(model, torch.optim.AdamW(model.parameters(), lr=1e-2), loss_fn, Config(micro_batch=micro))
    for batch in batches:
        result = trainer.step(batch)
        assert sum(result.micro_batches) == n and max(result.micro_batches) == min(micro, n)
    assert_same_weights(model, ref, 1e-6)


def test_token_loss_is_divided_by_the_whole_batch_items_not_per_micro_batch():
    # Two micro-batches with 1 and 5 tokens: the naive per-micro-batch mean weighs the lone token 5x.
    batch = token_batches(1, 2)[0]
    batch["labels"][0, 1:] = -100
    batch["labels"][1, :5] = batch["input_ids"][1, :5]
    batch["labels"][1, 5:] = -100
    torch.manual_seed(0)
    ref = TinyLM()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        out = token_loss(ref, batch)
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=1.0), token_loss, Config(micro_batch=1))
    result = trainer.step(batch)
    assert result.items == 6
    assert result.loss == pytest.approx(float(out[0] / out[1]), rel=1e-6)
    with torch.no_grad():
        per_row = [token_loss(ref, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(2)]
    naive = sum(float(s / n) for s, n in per_row) / 2
    assert abs(naive - result.loss) > 1e-3  # the per-micro-batch mean is a different number


def test_step_result_reports_the_batch_mean_loss():
    batches = classification_batches(1, 10)
    model = mlp()
    with torch.no_grad():
        expected = float(classification_loss(model, batches[0]))
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, Config(micro_batch=4))
    result = trainer.step(batches[0])
    assert result.micro_batches == (4, 4, 2)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.samples == 10 and result.items == 10 and result.retries == 0 and not result.skipped
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


def test_a_transformers_style_mapping_batch_is_split_and_left_unchanged():
    from collections import UserDict

    class Encoding(UserDict):  # what a tokenizer returns (BatchEncoding is a UserDict)
        def __getattr__(self, name):
            try:
                return self.data[name]
            except KeyError:
                raise AttributeError(name) from None

    batch = Encoding(token_batches(1, 5)[0])
    ids = batch["input_ids"]
    torch.manual_seed(0)
    model = TinyLM()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 lambda m, b: token_loss(m, {"input_ids": b.input_ids, "labels": b.labels}),
                                 Config(micro_batch=2))
    assert trainer.step(batch).micro_batches == (2, 2, 1)
    assert batch["input_ids"] is ids and batch["input_ids"].shape[0] == 5


# ---------------------------------------------------------------------- precision, checkpointing


class DropoutBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_checkpointed_training_equals_plain_with_dropout_on():
    torch.manual_seed(0)
    plain_model = DropoutBlocks()
    ckpt_model = copy.deepcopy(plain_model)
    keys = list(plain_model.state_dict())
    batches = classification_batches(3, 8)
    results = []
    for model, config in ((plain_model, Config(micro_batch=4)), (ckpt_model, Config(micro_batch=4, checkpoint="all"))):
        trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.5), classification_loss, config)
        torch.manual_seed(123)  # the same dropout masks in both runs
        results.append([trainer.step(b).loss for b in batches])
    assert list(ckpt_model.state_dict()) == keys  # checkpointing leaves state_dict keys alone
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    assert_same_weights(ckpt_model, plain_model, 1e-6)
    assert "forward" in ckpt_model.blocks[0].__dict__  # it really was checkpointed


def test_16_mixed_reports_a_step_the_grad_scaler_skipped():
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4, precision="16-mixed"))
    x, y = classification_batches(1, 8)[0]
    assert not trainer.step((x, y)).skipped
    before = [p.detach().clone() for p in model.parameters()]
    x[3, 0] = float("inf")  # inf activations -> inf/nan gradients -> the scaler skips the step
    result = trainer.step((x, y))
    assert result.skipped and trainer.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_true_half_precision_casts_in_place_and_keeps_the_optimizer_valid():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = [id(p) for p in model.parameters()]
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4, precision="bf16-true"))
    assert [id(p) for p in model.parameters()] == ids
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    before = model[0].weight.detach().clone()
    trainer.step(classification_batches(1, 8)[0])
    assert not torch.equal(before, model[0].weight)


def test_trainer_from_a_workload_builds_its_own_model():
    workload = memfit.presets.load("cifar-cnn")
    trainer = Trainer(workload, Config(micro_batch=2))
    result = trainer.step(workload.batch(5))
    assert result.micro_batches == (2, 2, 1) and isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["params"][0] is next(trainer.model.parameters())


# ---------------------------------------------------------------------- the OOM guard


class FaultInjector(TorchDispatchMode):
    """Raises CUDA's OOM at the ``op``-th aten op of the chosen steps' micro-steps (never in optimizer.step)."""

    def __init__(self, trainer, optimizer, faults: dict[int, int]) -> None:
        super().__init__()
        self.in_step = False
        step = trainer.step

        def watched(batch):  # count only the ops of trainer.step, not fit's bookkeeping
            self.in_step = True
            try:
                return step(batch)
            finally:
                self.in_step = False

        trainer.step = watched
        self.faults = dict(faults)  # step index (0-based) -> op index within that step
        self.step = 0
        self.ops = 0
        self.in_optimizer = False
        self.fired = 0
        optimizer.register_step_pre_hook(lambda *a: setattr(self, "in_optimizer", True))
        optimizer.register_step_post_hook(lambda *a: self._stepped())

    def _stepped(self) -> None:
        self.in_optimizer = False
        self.step += 1
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_step and not self.in_optimizer and func.namespace != "profiler":  # profiler marks allocate nothing
            self.ops += 1
            if self.faults.get(self.step) == self.ops:
                del self.faults[self.step]
                self.fired += 1
                self.ops = 0
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return func(*args, **(kwargs or {}))


def test_random_ooms_over_100_steps_give_the_fault_free_weights(caplog):
    # BatchNorm, dropout and batches of unequal sizes: a retried batch must leave no trace.
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(9, 17, (100,), generator=g).tolist()
    batches = [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]
    torch.manual_seed(0)
    ref = NormDropNet()
    model = copy.deepcopy(ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=16))
    results = []
    step = trainer.step
    trainer.step = lambda batch: results.append(step(batch)) or results[-1]
    rng = random.Random(7)
    # Three faults at random ops of random steps (a micro-step of this model runs > 20 ops); each
    # halves the micro-batch that failed (16, or the batch if shorter), so the last runs at 1 or 2.
    faults = {step: rng.randrange(1, 20) for step in rng.sample(range(100), 3)}
    injector = FaultInjector(trainer, optimizer, faults)
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="memfit"), injector:
        result = trainer.fit(batches, progress=False)
    assert injector.fired == 3 and result.retries == 3 and sum(r.retries for r in results) == 3
    assert result.steps == 100 and result.samples == sum(sizes) and trainer.samples_seen == sum(sizes)
    assert [sum(r.micro_batches) for r in results] == sizes
    assert trainer.config.micro_batch <= 2 and len({r.micro_batches for r in results}) > 3
    first = min(faults)
    recoveries = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(recoveries) == 3 and f"with micro-batch {min(16, sizes[first])} " in recoveries[0]

    # The reference never failed: each batch split as the trainer finally ran it, by hand.
    torch.manual_seed(3)
    reference_run(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), batches,
                  [r.micro_batches for r in results])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_oom_under_a_simulated_budget_retries_smaller_and_keeps_the_math():
    batches = classification_batches(4, 16, seed=3)
    ref = spread()
    model = copy.deepcopy(ref)
    full_batch_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1), classification_loss, batches)
    # The budget: what micro-batch 4 needs (its peak under a roomy simulated device).
    sizing = copy.deepcopy(model)
    small_peak = Trainer.from_parts(sizing, torch.optim.SGD(sizing.parameters(), lr=0.1), classification_loss,
                                    Config(micro_batch=4), budget="1GiB").step(batches[0]).peak
    assert small_peak > sum(p.numel() * 4 for p in model.parameters())  # more than the weights: it ran

    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=16), budget=small_peak)
    results = []
    for batch in batches:
        r = trainer.step(batch)
        results.append((r.retries, r.micro_batches, r.peak))
        # A StepResult holds its loss and item count on the device (8 bytes): the budget is exact to the byte.
        del r
    assert results[0] == (2, (4, 4, 4, 4), small_peak)  # 16 and 8 did not fit, 4 fits to the byte
    assert results[1:] == [(0, (4, 4, 4, 4), small_peak)] * 3 and trainer.config.micro_batch == 4
    assert_same_weights(model, ref, 1e-6)


def test_micro_batch_1_out_of_memory_raises_with_a_report_and_leaves_the_model_as_it_was():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8), budget="2KiB")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OutOfMemory, match="micro-batch 1 does not fit") as info:
        trainer.step(classification_batches(1, 8)[0])
    assert isinstance(info.value, torch.OutOfMemoryError)  # CUDA-OOM handlers still recognise it
    assert info.value.micro_batch == 1 and info.value.retries == 4
    assert isinstance(info.value.report, memfit.MemoryReport) and info.value.report.peak <= 2048
    assert any("bf16-mixed" in a for a in info.value.advice)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_out_of_memory_from_a_workload_trainer_carries_an_estimated_report():
    workload = memfit.presets.load("cifar-cnn")
    trainer = Trainer(workload, Config(micro_batch=1))
    every_step = {step: 5 for step in range(10)}
    with FaultInjector(trainer, trainer.optimizer, every_step), pytest.raises(OutOfMemory) as info:
        trainer.step(workload.batch(1))
    expected = memfit.estimate(workload, Config(micro_batch=1), device="cpu").report
    assert info.value.report.peak == expected.peak and info.value.report.peak_by_category == expected.peak_by_category


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_oom_is_recovered_and_the_peak_is_the_allocators():
    torch.cuda.empty_cache()
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda m, b: m(b[0]).square().mean(),
                                 Config(micro_batch=32768))
    batch = (torch.randn(32768, 4096),)  # 512 MiB on the host; a micro-batch of it and its activations need ~2 GiB
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(free - (1 << 30), 0), dtype=torch.uint8, device="cuda")  # leave ~1 GiB free
    try:
        result = trainer.step(batch)
    finally:
        del ballast
    assert result.retries >= 1 and max(result.micro_batches) < 32768 and sum(result.micro_batches) == 32768
    assert result.peak == torch.cuda.max_memory_allocated()


class _OptimizerFault(TorchDispatchMode):
    """OOM at the ``at``-th op inside optimizer.step() of step ``step``."""

    def __init__(self, optimizer, step: int, at: int) -> None:
        super().__init__()
        self.target, self.at, self.step, self.ops, self.active = step, at, 0, 0, False
        optimizer.register_step_pre_hook(lambda *a: setattr(self, "active", True))
        optimizer.register_step_post_hook(lambda *a: self._done())

    def _done(self):
        self.active, self.ops = False, 0
        self.step += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and self.step == self.target:
            self.ops += 1
            if self.ops == self.at:
                self.target = -1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return func(*args, **(kwargs or {}))


def test_oom_while_adam_creates_its_state_is_undone_and_retried():
    batches = classification_batches(3, 8)
    ref = mlp()
    model = copy.deepcopy(ref)
    for m, fault in ((ref, None), (model, 3)):
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
        trainer = Trainer.from_parts(m, optimizer, classification_loss, Config(micro_batch=8))
        with _OptimizerFault(optimizer, step=0, at=fault) if fault else memfit.simulate_budget("1GiB"):
            results = [trainer.step(b) for b in batches]
    assert results[0].retries == 1
    assert_same_weights(model, ref, 1e-6)


def test_oom_after_the_optimizer_wrote_in_place_says_it_cannot_be_undone():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8))
    batches = classification_batches(2, 8)
    trainer.step(batches[0])
    with _OptimizerFault(optimizer, step=0, at=4), pytest.raises(OutOfMemory, match="cannot be restored") as info:
        trainer.step(batches[1])
    assert [(e.step, e.phase, e.action) for e in info.value.events] == [(2, "optimizer", "raised")]


def test_a_plan_re_plans_to_its_next_alternative_that_needs_less():
    workload = memfit.Workload(
        model=DropoutBlocks, batch=lambda n: classification_batches(1, n)[0], loss=classification_loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    plan = memfit.plan(workload, "1GiB", batch_size=16, device="cpu")
    assert plan.config.micro_batch == 16
    # An alternative at micro-batch 4 (the planner lists those it considered; here the first fitted).
    small = dataclasses.replace(plan.config, micro_batch=4)
    alternative = Alternative(small, (4, 4, 4, 4), memfit.estimate(workload, small).required, 1.5, True)
    plan = dataclasses.replace(plan, alternatives=plan.alternatives + (alternative,))
    budget = (alternative.required + plan.required) // 2  # the plan's choice no longer fits, the alternative does
    assert alternative.required < budget < plan.required

    trainer = Trainer(workload, plan, budget=budget)
    result = trainer.step(workload.batch(16))
    assert result.retries == 1 and result.micro_batches == (4, 4, 4, 4)
    assert trainer.config == small  # the alternative, not half of 16


# ---------------------------------------------------------------------- fit, resume, leaks


def test_resuming_after_a_stop_equals_an_uninterrupted_run():
    batches = classification_batches(6, 8, seed=11)

    def trainer_for(model):
        return Trainer.from_parts(model, torch.optim.Adam(model.parameters(), lr=1e-2), classification_loss,
                                  Config(micro_batch=3))

    torch.manual_seed(0)
    whole = DropoutBlocks()
    stopped = copy.deepcopy(whole)
    resumed = copy.deepcopy(whole)
    state = torch.random.get_rng_state()
    trainer_for(whole).fit(batches, epochs=2, progress=False)

    torch.random.set_rng_state(state)
    first = trainer_for(stopped)
    first.fit(batches, epochs=2, max_steps=8, progress=False)
    assert (first.step_count, first.epoch, first.batch_in_epoch) == (8, 1, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(999)  # the resumed process starts with other RNG state
    second = trainer_for(resumed)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    result = second.fit(batches, epochs=2, progress=False)
    assert result.steps == 4 and second.step_count == 12
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_fit_saves_its_state_atomically_every_n_steps(tmp_path):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    path = tmp_path / "run.pt"
    saved_at = []
    real_save = trainer.save
    trainer.save = lambda p: (saved_at.append(trainer.step_count), real_save(p))
    trainer.fit(classification_batches(8, 8), save_to=path, save_every=3, progress=False)
    assert saved_at == [3, 6, 8]  # every 3 steps, and at the end
    state = memfit.statefile.read(path)
    assert state["counters"]["step"] == 8 and not (tmp_path / "run.pt.tmp").exists()
    assert torch.equal(state["model"]["0.weight"], model[0].weight)
    with pytest.raises(memfit.UsageError, match="save_every=2 needs save_to=PATH"):
        trainer.fit([], save_every=2)


def test_a_saved_state_keeps_the_re_planned_micro_batch_and_refuses_another_precision():
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=16), budget="4KiB")
    trainer.step(classification_batches(1, 16)[0])
    reduced = trainer.config.micro_batch
    assert reduced < 16
    state = trainer.state_dict()
    fresh = mlp()
    again = Trainer.from_parts(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), classification_loss, Config(micro_batch=16))
    again.load_state_dict(state)
    assert again.config.micro_batch == reduced and again.step_count == 1
    third = mlp()
    other = Trainer.from_parts(third, torch.optim.SGD(third.parameters(), lr=0.1), classification_loss,
                               Config(micro_batch=16, precision="bf16-mixed"))
    with pytest.raises(memfit.UsageError, match="trained with precision='32-true', this Trainer with 'bf16-mixed'"):
        other.load_state_dict(state)


def _fit_warnings(loss_fn, budget="1GiB", steps: int = 8, micro_batch: int = 16):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                                 Config(micro_batch=micro_batch), budget=budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(classification_batches(steps, 64), progress=False)
    return [str(w.message) for w in caught if issubclass(w.category, LeakWarning)]


@pytest.mark.parametrize("budget", ["1GiB", None], ids=["simulated", "plain-cpu"])
def test_the_leak_check_fires_on_a_loss_summed_with_its_graph(budget):
    kept = {"total": 0}

    def leaky(model, batch):
        loss = classification_loss(model, batch)
        kept["total"] += loss  # the seed article's warning: this keeps every step's graph alive
        return loss

    leaks = _fit_warnings(leaky, budget)
    assert len(leaks) == 1, leaks
    assert "the autograd graphs of 2 earlier steps (the first from step 1)" in leaks[0]
    assert "total_loss += loss" in leaks[0]
    # Backward freed the graphs' saved tensors: on the device they hold (next to) nothing.
    assert ("live device memory" in leaks[0]) == (budget is not None)


def test_the_leak_check_names_device_memory_growth_and_its_category():
    kept = []

    def keeps_logits(model, batch):
        logits = model(batch[0])
        kept.append(batch[0] * 1)  # a tensor of every step kept (512 KiB), without a graph
        return F.cross_entropy(logits, batch[1])

    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), keeps_logits,
                                 Config(micro_batch=16384), budget="1GiB")
    batches = classification_batches(6, 16384)
    with pytest.warns(LeakWarning, match=r"1\.\d\d MiB more than at step 2, most of it activations and outputs of "
                                         r"earlier steps \(\+1\.\d\d MiB\)"):
        trainer.fit(batches, progress=False)


def test_the_leak_check_stays_quiet_on_a_clean_loop():
    assert _fit_warnings(classification_loss) == []
    last = {}

    def keeps_the_last_loss(model, batch):  # one graph kept, replaced each step: not a leak
        last["loss"] = classification_loss(model, batch)
        return last["loss"]

    # One micro-batch: the graph kept is the one the leak check watches, so it sees exactly one.
    assert _fit_warnings(keeps_the_last_loss, micro_batch=64) == []
    assert _fit_warnings(keeps_the_last_loss, budget=None, micro_batch=64) == []


# ---------------------------------------------------------------------- bad input


def test_bad_arguments_say_what_to_pass():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(memfit.UsageError, match="Trainer.from_parts"):
        Trainer(model, Config(micro_batch=2))
    with pytest.raises(memfit.UsageError, match="plan_or_config must be a memfit.Plan"):
        Trainer.from_parts(model, optimizer, classification_loss, 32)
    with pytest.raises(memfit.UsageError, match="max_retries"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), max_retries=-1)
    with pytest.raises(memfit.UsageError, match="device 'cuda'|torch device"):
        if torch.cuda.is_available():
            raise memfit.UsageError("torch device")
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), device="cuda")
    if not torch.cuda.is_available():  # the device a Trainer built from a workload is asked for is the one checked
        with pytest.raises(memfit.UsageError, match=r"^device 'cuda' was asked for but torch.cuda.is_available\(\)"):
            Trainer(memfit.presets.load("cifar-cnn"), Config(micro_batch=2), device="cuda")
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2))
    with pytest.raises(memfit.UsageError, match=r"first dimensions \[3, 4\]"):
        trainer.step((torch.randn(4, 8), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(memfit.UsageError, match="epochs"):
        trainer.fit([], epochs=0)
    bad = Trainer.from_parts(model, optimizer, lambda m, b: m(b[0]), Config(micro_batch=2))
    with pytest.raises(memfit.MemfitError, match=r"shape \(2, 4\)"):
        bad.step(classification_batches(1, 4)[0])
    with pytest.raises(memfit.UsageError, match="lacks"):
        trainer.load_state_dict({"model": {}})
    with pytest.raises(memfit.UsageError, match="empty batch"):
        trainer.step((torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(memfit.UsageError, match="clip_grad_norm must be a positive number or None, got -1"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), clip_grad_norm=-1)
    with pytest.raises(memfit.UsageError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        Trainer.from_parts(model, {}, classification_loss, Config(micro_batch=2))
    with pytest.raises(memfit.UsageError, match="device 'meta': memfit trains on 'cpu' or 'cuda'"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), device="meta")
    with pytest.raises(memfit.UsageError, match="is not a torch device"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), device="gpu please")
    for kwargs, text in (({"log_every": 0}, "log_every"), ({"max_steps": -1}, "max_steps"),
                         ({"save_every": -3}, "save_every must be a whole number")):
        with pytest.raises(memfit.UsageError, match=text):
            trainer.fit([], **kwargs)
    flip = {"calls": 0}

    def mixed_forms(m, b):  # a mean first, then (loss_sum, n_items)
        flip["calls"] += 1
        loss = classification_loss(m, b)
        return loss if flip["calls"] == 1 else (loss * len(b[1]), len(b[1]))

    mixed = Trainer.from_parts(model, optimizer, mixed_forms, Config(micro_batch=2))
    with pytest.raises(memfit.MemfitError, match="a mean for some micro-batches and"):
        mixed.step(classification_batches(1, 4)[0])


# ---------------------------------------------------------------------- the guard at its boundaries


class NormDropNet(nn.Module):
    """BatchNorm statistics and dropout masks: what a retry must put back as they were."""

    def __init__(self) -> None:
        super().__init__()
        # BatchNorm over 4 channels of 4 positions each: it trains on micro-batches of one sample too.
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)), nn.BatchNorm1d(4), nn.Flatten(),
                                  nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def reference_run(model, optimizer, batches, splits):
    """Exact accumulation by hand: batch ``i`` split into ``splits[i]``, each mean loss weighted by its share."""
    for (x, y), sizes in zip(batches, splits):
        n, start = len(y), 0
        for size in sizes:
            loss = F.cross_entropy(model(x[start:start + size]), y[start:start + size]) * (size / n)
            loss.backward()
            start += size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _oom_in_backward(module: nn.Module, on_calls: set[int]) -> dict:
    """Make ``module``'s backward raise CUDA's OOM on the given calls (1-based), after forward ran in full."""
    calls = {"n": 0}

    def hook(mod, grad_input, grad_output):
        calls["n"] += 1
        if calls["n"] in on_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    module.register_full_backward_hook(hook)
    return calls


@pytest.mark.parametrize("failing_step", [1, 3], ids=["first-step", "after-buffers-are-learned"])
def test_a_retry_equals_running_the_smaller_micro_batch_from_the_start(failing_step):
    # The failed attempt ran forward in full (BatchNorm updated its statistics, dropout drew
    # masks) before backward ran out: the retry must start from the state before it.
    batches = classification_batches(4, 8, seed=21)
    torch.manual_seed(0)
    ref = NormDropNet()
    model = copy.deepcopy(ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8))
    _oom_in_backward(model.body[-1], {failing_step})
    torch.manual_seed(7)
    results = [trainer.step(b) for b in batches]
    splits = [r.micro_batches for r in results]
    assert [r.retries for r in results] == [int(i + 1 == failing_step) for i in range(4)]
    assert splits[failing_step - 1] == (4, 4) and splits[0 if failing_step > 1 else 1] == ((8,) if failing_step > 1 else (4, 4))

    torch.manual_seed(7)
    reference_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), batches, splits)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name  # weights, running_mean, running_var and num_batches_tracked


class Spread(nn.Module):
    """Activations dominate: each of the 8 features is spread over 256 channels by a few shared weights."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(1, 256)
        self.down = nn.Linear(256, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x.unsqueeze(-1)))).mean(1)


def spread(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Spread()


def _first_step_peak(micro: int, batch) -> int:
    model = spread()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=micro), budget="1GiB")
    return trainer.step(batch).peak


def test_a_micro_batch_larger_than_the_batch_is_halved_from_the_batch():
    batch = classification_batches(1, 5, seed=4)[0]
    fits = _first_step_peak(2, batch)
    assert _first_step_peak(5, batch) > fits  # the whole batch does not fit in that budget, 2 does
    model = spread()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=64), budget=fits, max_retries=1)
    result = trainer.step(batch)
    assert result.retries == 1 and result.micro_batches == (2, 2, 1)  # 64 -> min(64, 5) // 2, not 32, 16, ...
    assert result.peak <= fits


def test_max_retries_re_plans_are_allowed_and_one_more_is_not():
    batch = classification_batches(1, 16, seed=4)[0]
    fits = _first_step_peak(2, batch)
    assert _first_step_peak(4, batch) > fits  # 16 -> 8 -> 4 -> 2: exactly three re-plans

    model = spread()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=16), budget=fits, max_retries=3)
    result = trainer.step(batch)
    assert result.retries == 3 and result.micro_batches == (2,) * 8 and trainer.retries == 3

    model = spread()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=16), budget=fits,
                                 max_retries=2)
    with pytest.raises(OutOfMemory, match=r"out of memory at step 1 in the forward phase: 2 re-plans did not fit") as info:
        trainer.step(batch)
    assert info.value.retries == 3 and info.value.micro_batch == 4  # the third failure was at 4
    assert [(e.micro_batch, e.action, e.config and e.config.micro_batch) for e in info.value.events] == [
        (16, "re-planned", 8), (8, "re-planned", 4), (4, "raised", None)]
    assert trainer.step_count == 0 and trainer.samples_seen == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_fit_reports_the_per_sample_mean_loss_of_a_window_with_a_short_last_batch():
    batches = classification_batches(2, 8, seed=9) + classification_batches(1, 3, seed=10)
    torch.manual_seed(0)
    ref = mlp()
    model = copy.deepcopy(ref)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.5)
    losses = []
    for x, y in batches:  # the same updates by hand, each batch's loss read before its update
        loss = F.cross_entropy(ref(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    per_sample = sum(loss * len(b[1]) for loss, b in zip(losses, batches)) / sum(len(b[1]) for b in batches)
    unweighted = sum(losses) / len(losses)
    assert abs(per_sample - unweighted) > 1e-3  # the short batch makes the two means differ

    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.5), classification_loss,
                                 Config(micro_batch=4))
    result = trainer.fit(batches, log_every=100, progress=False)
    assert result.loss == pytest.approx(per_sample, rel=1e-6)
    assert result.steps == 3 and result.samples == 19


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), micro=st.integers(1, 14), token=st.booleans(), seed=st.integers(0, 2**16))
def test_any_split_of_any_batch_gives_the_full_batch_gradients(n, micro, token, seed):
    if token:
        make, loss_fn, batch = (lambda: (torch.manual_seed(seed), TinyLM())[1]), token_loss, token_batches(1, n, seed=seed)[0]
    else:
        make, loss_fn, batch = (lambda: mlp(seed)), classification_loss, classification_batches(1, n, seed=seed)[0]
    ref = make()
    out = loss_fn(ref, batch)
    (out[0] / out[1] if token else out).backward()
    expected = [p.grad for p in ref.parameters()]

    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.extend(p.grad.clone() for p in model.parameters()))
    result = Trainer.from_parts(model, optimizer, loss_fn, Config(micro_batch=micro)).step(batch)
    assert sum(result.micro_batches) == n and len(result.micro_batches) == -(-n // micro)
    assert all(0 < m <= micro for m in result.micro_batches)
    for got, want in zip(seen, expected, strict=True):
        assert _rel(got, want) <= 1e-5


# ---------------------------------------------------------------------- exact resume with randomness

from resume_job import EPOCHS, seed_everything  # noqa: E402
from resume_job import loader as job_loader  # noqa: E402
from resume_job import trainer as job_trainer  # noqa: E402


def _uninterrupted(kind: str) -> dict[str, torch.Tensor]:
    seed_everything(1234)
    run = job_trainer()
    run.fit(job_loader(kind), EPOCHS, progress=False)
    return run.model.state_dict()


class _Crash(BaseException):
    """A process dying right after a save (what SIGKILL does, in-process)."""


@pytest.mark.parametrize("kind", ["generator", "global", "set_epoch", "wrapped"])
def test_resume_after_a_crash_equals_the_uninterrupted_run_bit_for_bit(kind, tmp_path):
    # Dropout, a shuffling loader (its own generator, the global one, set_epoch, inside a custom
    # iterable) and augmentations drawing from NumPy and Python: killed mid-epoch in each epoch
    # and at an epoch's end, the resumed run must equal the run that was never stopped.
    expected = _uninterrupted(kind)
    for kill_at in (3, 7, 10, 13):
        path = tmp_path / f"{kind}-{kill_at}.pt"
        _crash_at(kind, path, kill_at)
        resumed = job_trainer()
        seed_everything(999)  # a new process: every generator elsewhere
        resumed.load(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", memfit.ResumeWarning)
            result = resumed.fit(job_loader(kind), EPOCHS, progress=False)
        assert result.steps == 15 - kill_at and resumed.step_count == 15
        for key, value in resumed.model.state_dict().items():
            assert torch.equal(value, expected[key]), (kind, kill_at, key)


def test_a_job_killed_with_sigkill_resumes_bit_for_bit(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    expected = _uninterrupted("generator")
    path = tmp_path / "run.pt"
    job = subprocess.run([sys.executable, str(Path(__file__).parent / "resume_job.py"), "generator", str(path), "8"],
                         capture_output=True, text=True, timeout=240)
    assert job.returncode == -signal.SIGKILL, job.stderr
    assert memfit.statefile.read(path)["counters"]["step"] == 8 and not Path(f"{path}.tmp").exists()
    resumed = job_trainer()
    seed_everything(7)
    resumed.load(path)
    resumed.fit(job_loader("generator"), EPOCHS, progress=False)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


class _OwnShuffle(torch.utils.data.Sampler):
    """A sampler with its own unseeded random.Random: an order memfit cannot see or restore."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rng = random.Random()

    def __iter__(self):
        order = list(range(self.n))
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


def test_resume_warns_when_the_loader_order_cannot_be_replayed(tmp_path):
    data = torch.utils.data.TensorDataset(*classification_batches(1, 40, seed=3)[0])
    path = tmp_path / "run.pt"
    model = mlp()
    run = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, Config(micro_batch=8))
    run.fit(torch.utils.data.DataLoader(data, batch_size=8, sampler=_OwnShuffle(40)), max_steps=3, save_to=path,
            progress=False)
    model = mlp()
    resumed = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=8))
    resumed.load(path)
    with pytest.warns(memfit.ResumeWarning, match="resuming at batch 3 of epoch 0, but the loader did not give the "
                                                   "batch the saved run trained on last"):
        resumed.fit(torch.utils.data.DataLoader(data, batch_size=8, sampler=_OwnShuffle(40)), progress=False)
    one_shot = iter(classification_batches(3, 8))
    with pytest.warns(memfit.ResumeWarning, match=r"fit got a one-shot iterator \(list_iterator\)"):
        resumed.fit(one_shot, save_to=tmp_path / "again.pt", progress=False)


# ---------------------------------------------------------------------- atomic steps


def _snapshot_of(trainer: Trainer):
    return (copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()),
            torch.get_rng_state(), random.getstate(), trainer.step_count, trainer.samples_seen)


def _assert_unchanged(trainer: Trainer, before) -> None:
    model, optimizer, cpu_rng, py_rng, steps, samples = before
    assert all(torch.equal(model[k], v) for k, v in trainer.model.state_dict().items())  # weights and BatchNorm
    now = trainer.optimizer.state_dict()
    assert now["state"].keys() == optimizer["state"].keys()
    for pid, state in optimizer["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(now["state"][pid][k])) for k, v in state.items())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(torch.get_rng_state(), cpu_rng) and random.getstate() == py_rng
    assert (trainer.step_count, trainer.samples_seen) == (steps, samples)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exception", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("steps_before", [0, 2], ids=["first-step", "later-step"])
def test_an_exception_in_micro_batch_2_leaves_model_optimizer_and_gradients_as_they_were(exception, steps_before):
    batches = classification_batches(4, 8, seed=12)
    calls = {"n": 0, "fail": None}

    def loss(model, batch):
        calls["n"] += 1
        out = classification_loss(model, batch)
        random.random()  # the loss draws from Python's generator too
        if calls["n"] == calls["fail"]:
            raise exception("in the loss of micro-batch 2")
        return out

    torch.manual_seed(0)
    model = NormDropNet()
    reference = copy.deepcopy(model)
    trainer = Trainer.from_parts(model, torch.optim.Adam(model.parameters(), lr=1e-2), loss, Config(micro_batch=4))
    torch.manual_seed(5)
    random.seed(5)
    for b in batches[:steps_before]:
        trainer.step(b)
    before = _snapshot_of(trainer)
    calls["fail"] = calls["n"] + 2
    with pytest.raises(exception, match="micro-batch 2"):
        trainer.step(batches[steps_before])
    _assert_unchanged(trainer, before)
    for b in batches[steps_before:]:  # and the run goes on as if the failure never happened
        trainer.step(b)

    calls["fail"] = None
    torch.manual_seed(0)
    ref = Trainer.from_parts(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), loss, Config(micro_batch=4))
    torch.manual_seed(5)
    random.seed(5)
    for b in batches:
        ref.step(b)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_user_gradient_left_on_the_model_is_put_back_after_a_failed_step():
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 lambda m, b: (_ for _ in ()).throw(_Boom("no")), Config(micro_batch=4))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.raises(_Boom):
        trainer.step(classification_batches(1, 8)[0])
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[0].bias.grad is None


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_nan_loss_skips_the_update_counts_it_and_warns_once(precision):
    batches = classification_batches(5, 8, seed=6)
    for i in (1, 3):
        batches[i][0][2, 1] = float("nan")  # one NaN feature: the batch's loss is NaN
    torch.manual_seed(0)
    model = NormDropNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4, precision=precision))
    trainer.step(batches[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(memfit.NonFiniteLossWarning, match=r"the loss at step 2 is nan; its update was skipped") as caught:
        result = trainer.fit(batches[1:], progress=False)
    assert len([w for w in caught if issubclass(w.category, memfit.NonFiniteLossWarning)]) == 1  # once, not twice
    assert result.nonfinite == 2 and result.skipped == 2 and result.steps == 4 and trainer.nonfinite_steps == 2
    assert math.isfinite(result.loss)  # the logged loss is the trained steps'
    assert all(torch.isfinite(v.float()).all() for v in model.state_dict().values())
    # Step 2 changed nothing: not the weights (weight decay did not run), not BatchNorm's statistics.
    model2 = NormDropNet()
    model2.load_state_dict(before)
    fresh = Trainer.from_parts(model2, optimizer := torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1),
                               classification_loss, Config(micro_batch=4, precision=precision), on_nonfinite="raise")
    state = fresh.optimizer.state_dict()
    with pytest.raises(memfit.NonFiniteLoss, match="the loss at step 1 is nan; the step was undone"):
        fresh.step(batches[1])
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
    assert fresh.optimizer.state_dict()["state"] == state["state"] == {} and fresh.step_count == 0


def test_token_losses_with_no_items_skip_and_negative_counts_are_refused():
    torch.manual_seed(0)
    model = TinyLM()
    trainer = Trainer.from_parts(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), token_loss,
                                 Config(micro_batch=2))
    padding = token_batches(1, 4)[0]
    padding["labels"][:] = -100
    before = copy.deepcopy(model.state_dict())
    result = trainer.step(padding)
    assert result.skipped and result.skip_reason == "no items" and result.items == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no weight decay either

    def negative(m, b):
        loss_sum, n = token_loss(m, b)
        return loss_sum, n - 100

    bad = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), negative, Config(micro_batch=2))
    with pytest.raises(memfit.UsageError, match=r"n_items = -9\d for a micro-batch at step 1; .* it is >= 0"):
        bad.step(token_batches(1, 4)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_grad_scaler_skip_is_reported_as_such():
    # A finite loss with an infinite gradient: only the GradScaler (16-mixed) sees it.
    model = mlp()
    model[2].bias.register_hook(lambda g: g * float("inf"))
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4, precision="16-mixed"))
    before = copy.deepcopy(model.state_dict())
    result = trainer.step(classification_batches(1, 8)[0])
    assert result.skipped and result.skip_reason == "grad scaler" and math.isfinite(result.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float64_models_keep_float64_accuracy_under_accumulation():
    batch = token_batches(1, 7, seed=3)[0]
    torch.manual_seed(0)
    ref = TinyLM().double()
    model = copy.deepcopy(ref)
    out = token_loss(ref, batch)
    (out[0] / out[1]).backward()
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_pre_hook(lambda *a: seen.extend(p.grad.clone() for p in model.parameters()))
    Trainer.from_parts(model, optimizer, token_loss, Config(micro_batch=3)).step(batch)
    assert max(_rel(g, p.grad) for g, p in zip(seen, ref.parameters())) < 1e-12  # float32 scales give ~1e-8


def test_construction_refuses_a_foreign_optimizer_and_a_bad_scheduler():
    model, other = mlp(), mlp()
    with pytest.raises(memfit.UsageError, match=r"4 of the optimizer's 4 parameters are not the model's"):
        Trainer.from_parts(model, torch.optim.SGD(other.parameters(), lr=0.1), classification_loss, Config(micro_batch=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(memfit.UsageError, match=r"scheduler must be an LR scheduler .* got 'x'"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), scheduler="x")
    with pytest.raises(memfit.UsageError, match=r"on_nonfinite must be one of 'skip', 'raise', got 'ignore'"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2), on_nonfinite="ignore")
    with pytest.raises(memfit.UsageError, match="Trainer\\(scheduler=...\\) takes a factory"):
        Trainer(memfit.presets.load("cifar-cnn"), Config(micro_batch=2), scheduler=42)
    with pytest.raises(memfit.UsageError, match="bad byte quantity"):
        Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=2, checkpoint="0"), budget="lots")
    assert "forward" not in model[0].__dict__  # refused before the model was touched


# ---------------------------------------------------------------------- verified, atomic loads


def _trained(tmp_path, model_fn=mlp, optimizer_fn=lambda p: torch.optim.Adam(p, lr=1e-2)):
    model = model_fn()
    trainer = Trainer.from_parts(model, optimizer_fn(model.parameters()), classification_loss, Config(micro_batch=4))
    trainer.fit(classification_batches(3, 8), progress=False, save_to=tmp_path / "run.pt")
    return trainer, tmp_path / "run.pt"


def _fresh(model_fn=mlp, optimizer_fn=lambda p: torch.optim.Adam(p, lr=1e-2), seed=3):
    model = model_fn(seed)
    trainer = Trainer.from_parts(model, optimizer_fn(model.parameters()), classification_loss, Config(micro_batch=4))
    return trainer, copy.deepcopy(model.state_dict())


def test_a_saved_file_loads_and_resumes(tmp_path):
    trained, path = _trained(tmp_path)
    trainer, _ = _fresh()
    trainer.load(path)
    assert trainer.step_count == 3 and all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(),
                                                                             trained.model.parameters()))
    again, _ = _fresh()
    again.load_state_dict(torch.load(path, weights_only=True))  # the file's content, checksum verified
    assert again.step_count == 3


@pytest.mark.parametrize("damage, message", [
    ("missing_key", r"the saved model lacks 2\.bias"),
    ("other_shapes", r"0\.weight has shape \(16, 8\) in the file, \(32, 8\) here"),
    ("other_optimizer", r"the saved optimizer is torch\.optim\.adam\.Adam, this one torch\.optim\.sgd\.SGD"),
    ("none", r"load_state_dict takes a dict from trainer\.state_dict\(\), got NoneType"),
    ("groups", r"the saved optimizer has 1 parameter groups, this one 2"),
    ("counters", r"the saved counters are not whole numbers >= 0"),
    ("precision", r"trained with precision='32-true', this Trainer with 'bf16-true'"),
])
def test_a_bad_state_is_refused_in_one_line_and_changes_nothing(tmp_path, damage, message):
    trained, path = _trained(tmp_path)
    state = memfit.statefile.read(path)
    model_fn, optimizer_fn, config = mlp, lambda p: torch.optim.Adam(p, lr=1e-2), Config(micro_batch=4)
    if damage == "missing_key":
        del state["model"]["2.bias"]
    elif damage == "other_shapes":
        model_fn = lambda seed=0: (torch.manual_seed(seed), nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)))[1]
    elif damage == "other_optimizer":
        optimizer_fn = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    elif damage == "none":
        state = None
    elif damage == "groups":
        optimizer_fn = lambda p: torch.optim.Adam([{"params": list(p)[:2]}, {"params": []}], lr=1e-2)
    elif damage == "counters":
        state["counters"]["step"] = -1
    elif damage == "precision":
        config = Config(micro_batch=4, precision="bf16-true")
    model = model_fn(3)
    optimizer = optimizer_fn(model.parameters())
    if damage == "groups":
        optimizer.add_param_group({"params": list(model.parameters())[2:]})
        optimizer.param_groups.pop(1)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, config)
    before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(memfit.UsageError, match=message) as info:
        trainer.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict() == optimizer_before and trainer.step_count == 0


def test_a_truncated_or_damaged_file_is_refused_naming_it(tmp_path):
    _, path = _trained(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    # 64 bytes zeroed in the middle of the largest tensor's data (an Adam moment, say): torch.load reads it.
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    local = data[entry.header_offset:entry.header_offset + 30]
    start = entry.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    middle = start + entry.file_size // 2 - 32
    assert entry.file_size >= 128 and any(data[middle:middle + 64])
    zeroed = tmp_path / "zeroed.pt"
    zeroed.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    assert torch.load(zeroed, weights_only=True)["state"]["counters"]["step"] == 3  # it loads without complaint
    trainer, before = _fresh()
    with pytest.raises(memfit.UsageError, match=rf"{truncated} cannot be read as a saved memfit state .* truncated"):
        trainer.load(truncated)
    with pytest.raises(memfit.UsageError, match=rf"{zeroed} is damaged: its content does not match the checksum"):
        trainer.load(zeroed)
    with pytest.raises(memfit.UsageError, match=r"no saved state at .*missing\.pt"):
        trainer.load(tmp_path / "missing.pt")
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


# ---------------------------------------------------------------------- warnings people see


def _keeps_logits(kept: list, detach: bool):
    def loss(model, batch):
        logits = model(batch[0])
        # Every step's logits (8 x 4 floats, 128 bytes), with their graph or without.
        kept.append(logits.detach().clone() if detach else logits)
        return F.cross_entropy(logits, batch[1])

    return loss


@pytest.mark.parametrize("detach, budget", [(False, "1GiB"), (False, None), (True, "1GiB")],
                         ids=["graph-simulated", "graph-plain-cpu", "detached-simulated"])
def test_a_small_leak_of_logits_is_flagged_within_ten_steps(detach, budget):
    # With their graph, the graph's mark on the model's output outlives its step; without, only
    # live memory shows it, rising at every step start (128 bytes, far under the 1 MiB threshold).
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), _keeps_logits([], detach),
                                 Config(micro_batch=8), budget=budget)
    with pytest.warns(LeakWarning) as caught:
        trainer.fit(classification_batches(40, 8), progress=False)
    leaks = [str(w.message) for w in caught if issubclass(w.category, LeakWarning)]
    assert len(leaks) == 1
    step = int(leaks[0].split("at the start of step ")[1].split(":")[0])
    assert step <= 11, leaks[0]  # not after 1 MiB of growth (8000 steps at 128 bytes)
    if budget is not None:
        assert "most of it activations and outputs of earlier steps" in leaks[0]


def test_the_leak_check_does_not_mistake_lazily_created_optimizer_state_for_a_leak():
    # A parameter that first gets a gradient at step k gets Adam state then: live memory rises
    # at every step start for 16 steps (a new head each step), and it is not a leak.
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(16))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.heads[min(self.calls - 1, 15)](x)

    torch.manual_seed(0)
    model = Late()
    trainer = Trainer.from_parts(model, torch.optim.Adam(model.parameters()), classification_loss,
                                 Config(micro_batch=8), budget="1GiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(classification_batches(30, 8), progress=False)
    assert not [w for w in caught if issubclass(w.category, LeakWarning)]


def test_memfit_warnings_are_shown_by_a_plain_python_run(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import torch, memfit\n"
        "model = torch.nn.Linear(8, 4)\n"
        "kept = []\n"
        "def loss(m, b):\n"
        "    out = m(b[0]).square().mean()\n"
        "    kept.append(out)\n"
        "    return out\n"
        "trainer = memfit.Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), loss,\n"
        "                                    memfit.Config(micro_batch=4))\n"
        "trainer.fit([(torch.randn(4, 8),) for _ in range(6)], progress=False)\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "LeakWarning: memfit: possible memory leak at the start of step 3" in run.stderr
    assert issubclass(LeakWarning, UserWarning) and issubclass(memfit.NonFiniteLossWarning, UserWarning)


# ---------------------------------------------------------------------- everyday models


def _tiny_llama_workload() -> memfit.Workload:
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)

    def batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 64, (n, 24), generator=g)
        mask = torch.ones(n, 24, dtype=torch.long)
        mask[0, 16:] = 0  # a padded row: attention takes a mask
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return memfit.Workload(model=lambda: transformers.LlamaForCausalLM(config), batch=batch,
                           loss=lambda m, b: m(**b).loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                           name="tiny-llama")


def test_a_transformers_llama_with_padding_plans_and_trains_with_checkpointing(caplog):
    # With the KV cache on, checkpointing's recomputation appends keys and values twice and a
    # padded batch fails in backward; memfit turns the cache off, as gradient_checkpointing_enable does.
    workload = _tiny_llama_workload()
    plain = memfit.estimate(workload, Config(micro_batch=8), device="cpu").required
    ckpt = memfit.estimate(workload, Config(micro_batch=8, checkpoint="all"), device="cpu").required
    assert ckpt < plain
    chosen = memfit.plan(workload, (plain + ckpt) // 2, 8, device="cpu")
    assert chosen.required <= (plain + ckpt) // 2 and sum(chosen.accumulation) == 8

    batches = [workload.batch(4, seed) for seed in range(2)]
    torch.manual_seed(0)
    reference = workload.model()
    model = copy.deepcopy(reference)
    for m, config in ((reference, Config(micro_batch=2)), (model, Config(micro_batch=2, checkpoint="all"))):
        with caplog.at_level(logging.INFO, logger="memfit"):
            trainer = Trainer.from_parts(m, workload.optimizer(m.parameters()), workload.loss, config)
        for b in batches:
            trainer.step(b)
    assert model.config.use_cache is False and reference.config.use_cache is True
    assert any("turned off the KV cache of LlamaForCausalLM" in r.getMessage() for r in caplog.records)
    assert_same_weights(model, reference, 1e-5)


def test_a_cpu_budget_larger_than_the_machine_is_refused_and_a_long_run_keeps_a_bounded_history(monkeypatch):
    import memfit.host

    model = mlp()
    monkeypatch.setattr(memfit.host, "available_memory", lambda: 1 << 30)
    with pytest.raises(memfit.errors.NotEnoughMemory, match=r"simulated budget of 2\.00 GiB \(2\.15 GB\) needs "
                                                            r"2\.00 GiB of host memory and this machine has 1\.00 GiB"):
        Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                           Config(micro_batch=4, checkpoint="0"), budget="2GiB")
    assert "forward" not in model[0].__dict__  # refused before the model was touched
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4), budget="512MiB")
    batches = classification_batches(40, 8)
    trainer.fit(batches[:5], progress=False)
    after_5 = len(trainer._sim.allocation_events())
    trainer.fit(batches[5:], progress=False)
    assert len(trainer._sim.allocation_events()) == after_5  # one attempt's history, not the run's


# ---------------------------------------------------------------------- the progress bar


def _render_progress(monkeypatch, trainer, loader, epochs, advances, times, console=None):
    """Drive fit's progress bar by hand under a clock that reads ``times`` in turn; its final text."""
    from rich.console import Console

    from memfit.engine import progress

    clock = iter(times)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = progress.ProgressBar(loader, epochs, epoch=trainer.epoch, batch_in_epoch=trainer.batch_in_epoch,
                               budget=trainer.budget, console=console or Console(file=out, width=150))
    for samples, loss, peak in advances:
        result = StepResult(step=1, samples=samples, micro_batches=(samples,), retries=0, skipped=False, peak=peak,
                            loss_tensor=torch.tensor(0.0), items_tensor=torch.tensor(float(samples)))
        bar.advance(result, loss, peak)
    bar.close()
    return bar, out.getvalue()


def test_the_progress_bar_shows_steps_samples_per_second_loss_and_peak_against_the_budget(monkeypatch):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4), budget="1MiB")
    trainer.epoch, trainer.batch_in_epoch = 1, 2  # resumed: 4 batches an epoch, 6 done of 12
    _, text = _render_progress(monkeypatch, trainer, [None] * 4, 3,
                               [(8, None, 2048), (8, 1.234567, 3072), (24, 1.5, 1024)], [100.0, 104.0, 108.0, 110.0])
    # 40 samples in the 10 s since the bar began; the last loss logged; the highest peak it was given last.
    assert re.fullmatch(r"train ━━━━━━━╸    9/12 \d:\d\d:\d\d 4 samples/s loss 1\.5000 peak 1\.00 KiB/1\.00 MiB\s*",
                        text), text


def test_the_progress_bar_without_length_budget_peak_or_loss(monkeypatch):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    bar, text = _render_progress(monkeypatch, trainer, iter([]), 2, [(16, None, None)], [0.0, 8.0])
    assert re.fullmatch(r"train ━+ 1/\? \d:\d\d:\d\d 2 samples/s loss - \s*", text), text
    _, fresh = _render_progress(monkeypatch, trainer, [None] * 3, 2, [], [0.0])
    assert re.fullmatch(r"train {12}0/6 \d:\d\d:\d\d  loss -  \s*", fresh), fresh
    _, peaked = _render_progress(monkeypatch, trainer, [None], 1, [(4, 2.0, 512)], [0.0, 1.0])
    assert re.fullmatch(r"train ━{10} 1/1 \d:\d\d:\d\d 4 samples/s loss 2\.0000 peak 512 B\s*", peaked), peaked
    # By default the bar goes to stderr and stays on screen when done.
    from memfit.engine import progress

    monkeypatch.setattr(progress.time, "perf_counter", lambda: 0.0)
    default = progress.ProgressBar([None], 1, epoch=0, batch_in_epoch=0, budget=None)
    default.close()
    assert default.progress.console.stderr is True and default.progress.live.transient is False


def _three_layers(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))


def _good_state(**trainer_kwargs) -> dict:
    model = _three_layers()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), classification_loss,
                                 Config(micro_batch=4), **trainer_kwargs)
    trainer.step(classification_batches(1, 8)[0])
    return trainer.state_dict()


def _wider(state):
    return dict(state, model=_three_layers(width=32).state_dict())


def _momentum_shape(state):
    state = copy.deepcopy(state)
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    return state


def _many_optimizer_problems(state):
    state = copy.deepcopy(state)
    for pid in range(6):  # six wrong shapes: the message names four
        state["optimizer"]["state"][pid]["momentum_buffer"] = torch.zeros(1) if pid % 2 else torch.zeros(1, 1)
    return state


_PREFIX = "cannot resume from this state (nothing was changed): "


@pytest.mark.parametrize("damage, message", [
    (lambda s: None, "load_state_dict takes a dict from trainer.state_dict(), got NoneType"),
    (lambda s: [s], "load_state_dict takes a dict from trainer.state_dict(), got list"),
    (lambda s: dict(s, model={k: v.double() if k[0] in "02" else v for k, v in s["model"].items()}),
     _PREFIX + "0.weight is torch.float64 in the file, torch.float32 here; 0.bias is torch.float64 in the file, "
               "torch.float32 here; 2.weight is torch.float64 in the file, torch.float32 here; 2.bias is "
               "torch.float64 in the file, torch.float32 here"),  # four differ: all named, no "more"
    (lambda s: {"model": s["model"], "counters": {}},
     "not a memfit Trainer state_dict: it lacks ['config', 'optimizer', 'rng']; save one with trainer.save(path) or "
     "torch.save(trainer.state_dict(), path)"),
    (lambda s: dict(s, model={k: v for k, v in s["model"].items() if k != "4.bias"} | {"extra.weight": torch.ones(1)}),
     _PREFIX + "the saved model lacks 4.bias; the saved model has extra.weight, which this model does not"),
    (lambda s: dict(s, model={}),
     _PREFIX + "the saved model lacks 0.weight, 0.bias, 2.weight, 2.bias and 2 more"),
    (_wider, _PREFIX + "0.weight has shape (32, 8) in the file, (16, 8) here; 0.bias has shape (32,) in the file, "
                       "(16,) here; 2.weight has shape (32, 32) in the file, (16, 16) here; 2.bias has shape (32,) in "
                       "the file, (16,) here; and 1 more tensors differ"),
    (lambda s: dict(s, model=dict(s["model"], **{"0.bias": s["model"]["0.bias"].double(), "2.bias": 3})),
     _PREFIX + "0.bias is torch.float64 in the file, torch.float32 here; 2.bias is not a tensor in the file (int)"),
    (lambda s: dict(s, model=[1]), _PREFIX + "the saved model state is a list, not a state_dict"),
    (lambda s: dict(s, optimizer=[], optimizer_type=None), _PREFIX + "the saved optimizer state is not an optimizer "
                                                                     "state_dict"),
    (lambda s: dict(s, optimizer=dict(s["optimizer"], state={**s["optimizer"]["state"], 9: {}})),
     _PREFIX + "the saved optimizer has state for parameter 9, which its groups do not list"),
    (_momentum_shape, _PREFIX + "its momentum_buffer for parameter 0 has shape (3, 3), the parameter (16, 8)"),
    (_many_optimizer_problems, _PREFIX + "its momentum_buffer for parameter 0 has shape (1, 1), the parameter (16, 8); "
                               "its momentum_buffer for parameter 1 has shape (1,), the parameter (16,); its "
                               "momentum_buffer for parameter 2 has shape (1, 1), the parameter (16, 16); its "
                               "momentum_buffer for parameter 3 has shape (1,), the parameter (16,)"),
    (lambda s: dict(s, optimizer=dict(s["optimizer"], param_groups=s["optimizer"]["param_groups"] * 2)),
     _PREFIX + "the saved optimizer has 2 parameter groups, this one 1"),
    (lambda s: dict(s, optimizer=dict(s["optimizer"], param_groups=[dict(s["optimizer"]["param_groups"][0],
                                                                         params=[0, 1])])),
     _PREFIX + "parameter group 0 has 2 parameters in the file, 6 here"),
    (lambda s: dict(s, scheduler={"last_epoch": 3}), _PREFIX + "the saved run had an LR scheduler, this trainer none: "
                                                               "pass scheduler=..."),
    (lambda s: dict(s, config={"micro_batch": 0}), "the saved config is not a memfit Config (Config.micro_batch must be "
                                                   "a positive int, got 0)"),
    (lambda s: dict(s, config="x"), "the saved config is not a memfit Config (memfit.config.Config() argument after ** "
                                    "must be a mapping, not str)"),
    (lambda s: dict(s, config=dict(s["config"], precision="bf16-true", offload_activations=True)),
     _PREFIX + "the saved run trained with precision='bf16-true', this Trainer with '32-true'; build the Trainer with "
               "precision='bf16-true' to resume; the saved run trained with offload_activations=True, this Trainer "
               "with False; build the Trainer with offload_activations=True to resume"),
    (lambda s: dict(s, counters=dict(s["counters"], retries=1.5)),
     _PREFIX + "the saved counters are not whole numbers >= 0 for step, epoch, batch_in_epoch, samples, retries, skipped"),
    (lambda s: dict(s, counters=[]),
     _PREFIX + "the saved counters are not whole numbers >= 0 for step, epoch, batch_in_epoch, samples, retries, skipped"),
    (lambda s: dict(s, rng={"cpu": None}), _PREFIX + "the saved random state has no CPU generator state"),
    (lambda s: dict(s, rng=[]), _PREFIX + "the saved random state has no CPU generator state"),
    (lambda s: dict(s, config=dict(s["config"], checkpoint=("layers.*",))),
     "the saved config does not fit this model: checkpoint glob 'layers.*' matches no module; module paths look like: "
     "0, 1, 2, 3, 4 ('*' matches one path component, '**' several; 'seq[2:5]' a segment of an nn.Sequential)"),
    (lambda s: dict(s, model={}, rng=[]), _PREFIX + "the saved model lacks 0.weight, 0.bias, 2.weight, 2.bias and 2 "
                                                    "more; the saved random state has no CPU generator state"),
])
def test_every_difference_of_a_saved_state_is_named_and_nothing_changes(damage, message):
    state = damage(_good_state())
    model = _three_layers(seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(memfit.UsageError) as info:
        trainer.load_state_dict(state)
    assert str(info.value) == message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not optimizer.state
    assert (trainer.step_count, trainer.config) == (0, Config(micro_batch=4))


def test_a_scheduler_or_a_grad_scaler_the_saved_run_lacked_is_named():
    state = _good_state()
    model = _three_layers()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduled = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4),
                                   scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10))
    with pytest.raises(memfit.UsageError, match=r"the saved run had no LR scheduler, this trainer has one$"):
        scheduled.load_state_dict(state)
    scaled = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4, precision="16-mixed"))
    with pytest.raises(memfit.UsageError, match="the saved run has no GradScaler state, this trainer \\(16-mixed\\) "
                                                "needs one; the saved run trained with precision='32-true'"):
        scaled.load_state_dict(state)


def test_the_saved_state_holds_the_scaler_the_scheduler_the_plan_and_the_counters():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4, precision="16-mixed"),
                                 scheduler=scheduler)
    batches = classification_batches(2, 8)
    batches[1][0][0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memfit.NonFiniteLossWarning)
        trainer.fit(batches, progress=False)
    trainer._recipe.scaler().update(new_scale=1024.0)  # not the default: a load must carry it over
    state = trainer.state_dict()
    assert set(state) == {"model", "optimizer", "optimizer_type", "scaler", "scheduler", "config", "plan", "counters",
                          "rng", "loader"}
    assert state["scaler"] == trainer._recipe.scaler().state_dict() and state["scaler"]["scale"] == 1024.0
    assert state["scheduler"]["last_epoch"] == 1 and state["plan"] is None
    assert state["counters"] == {"step": 2, "epoch": 1, "batch_in_epoch": 0, "samples": 16, "retries": 0,
                                 "skipped": 1, "nonfinite": 1}
    assert state["loader"] == {"epoch_start": trainer._replay.epoch_start, "generators": [], "last_batch": None}
    assert state["optimizer_type"] == "torch.optim.sgd.SGD"
    model2 = mlp()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    resumed = Trainer.from_parts(model2, optimizer2, classification_loss, Config(micro_batch=4, precision="16-mixed"),
                                 scheduler=torch.optim.lr_scheduler.StepLR(optimizer2, 1, gamma=0.5))
    resumed.load_state_dict(state)
    assert resumed.scheduler.last_epoch == 1 and optimizer2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert resumed._recipe.scaler().get_scale() == 1024.0 and resumed.nonfinite_steps == 1


class _StopsAfterStepping:
    """An LR scheduler whose step is interrupted (Ctrl-C arriving after optimizer.step() wrote)."""

    def __init__(self) -> None:
        self.calls = 0

    def step(self) -> None:
        self.calls += 1
        raise KeyboardInterrupt

    def state_dict(self) -> dict:
        return {}


def test_an_interrupt_after_the_update_counts_the_step_and_leaves_no_gradients():
    batches = classification_batches(3, 8)
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4), scheduler=_StopsAfterStepping())
    trainer.scheduler = None
    trainer.step(batches[0])
    trainer.scheduler = _StopsAfterStepping()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyboardInterrupt):
        trainer.step(batches[1])
    # The update was applied: the batch counts (redoing it would apply it twice).
    assert (trainer.step_count, trainer.samples_seen) == (2, 16)
    assert not torch.equal(before["0.weight"], model[0].weight) and all(p.grad is None for p in model.parameters())
    # Between scaler.step() and zero_grad (16-mixed): the gradients are still there, and go.
    scaled = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                Config(micro_batch=4, precision="16-mixed"))
    scaled.step(batches[0])

    def interrupted():
        raise KeyboardInterrupt

    scaled._recipe.scaler().update = interrupted
    with pytest.raises(KeyboardInterrupt):
        scaled.step(batches[2])
    assert (scaled.step_count, scaled.samples_seen) == (2, 16) and all(p.grad is None for p in model.parameters())


class _WritesThenFails(torch.optim.SGD):
    def step(self, closure=None):
        with torch.no_grad():
            for group in self.param_groups:
                group["params"][0].add_(1.0)  # written in place: this cannot be undone
        raise _Boom("inside optimizer.step")


def test_an_error_inside_optimizer_step_after_a_write_says_the_state_cannot_be_restored():
    model = mlp()
    trainer = Trainer.from_parts(model, _WritesThenFails(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    with pytest.raises(_Boom) as info:
        trainer.step(classification_batches(1, 8)[0])
    assert info.value.__notes__ == ["memfit: this happened inside optimizer.step() after it had updated tensors in "
                                    "place; the model and optimizer are not as before the step: reload the last save."]
    assert trainer.step_count == 0 and all(p.grad is None for p in model.parameters())
    clean = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               lambda m, b: (_ for _ in ()).throw(_Boom("in the loss")), Config(micro_batch=4))
    with pytest.raises(_Boom) as info:
        clean.step(classification_batches(1, 8)[0])
    assert not hasattr(info.value, "__notes__")  # nothing was written: nothing to add

    def writes_in_place_then_fails(m, b):
        with torch.no_grad():
            m[0].weight.mul_(1.0)  # a parameter's version moves, outside optimizer.step()
        raise _Boom("in the loss, after an in-place write")

    loss_writes = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), writes_in_place_then_fails,
                                     Config(micro_batch=4))
    with pytest.raises(_Boom) as info:
        loss_writes.step(classification_batches(1, 8)[0])
    assert not hasattr(info.value, "__notes__")  # the note is about optimizer.step() only


def _sgd_trainer_and_a_nan_batch(sample: int):
    """An SGD trainer on an MLP, and a batch of 8 whose given sample has a NaN input."""
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    x, y = classification_batches(1, 8)[0]
    x[sample, sample] = float("nan")
    return model, trainer, x, y


def test_a_skipped_step_leaves_no_gradients_but_keeps_the_callers(caplog):
    model, trainer, x, y = _sgd_trainer_and_a_nan_batch(0)
    with pytest.warns(memfit.NonFiniteLossWarning) as caught:
        result = trainer.step((x, y))
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert result.skip_reason == "non-finite loss" and all(p.grad is None for p in model.parameters())
    model[2].bias.grad = torch.full_like(model[2].bias, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: no second warning
        trainer.step((x, y))
    assert torch.equal(model[2].bias.grad, torch.full_like(model[2].bias, 3.0)) and model[0].weight.grad is None

    torch.manual_seed(0)
    lm = TinyLM()
    padded = token_batches(1, 4)[0]
    padded["labels"][:] = -100
    lm_trainer = Trainer.from_parts(lm, torch.optim.SGD(lm.parameters(), lr=0.1), token_loss, Config(micro_batch=2))
    lm_trainer.step_count = 6
    caplog.clear()  # the NaN above was logged too
    with caplog.at_level(logging.WARNING, logger="memfit"):
        assert lm_trainer.step(padded).skip_reason == "no items"
    assert [r.getMessage() for r in caplog.records] == [
        "memfit: step 7 had no items (every item was padding); its update was skipped"]
    assert all(p.grad is None for p in lm.parameters()) and lm_trainer.nonfinite_steps == 0


def _crash_at(kind: str, path, kill_at: int, resume_from=None):
    seed_everything(1234)
    run = job_trainer()
    if resume_from is not None:
        seed_everything(55)
        run.load(resume_from)
    save = run.save

    def save_then_crash(p):
        save(p)
        if run.step_count == kill_at:
            raise _Crash

    run.save = save_then_crash
    with pytest.raises(_Crash):
        run.fit(job_loader(kind), EPOCHS, save_to=path, save_every=1, progress=False)


def test_a_run_resumed_and_killed_again_in_the_same_epoch_still_equals_the_uninterrupted_one(tmp_path):
    expected = _uninterrupted("generator")
    _crash_at("generator", tmp_path / "a.pt", 6)
    saved = memfit.statefile.read(tmp_path / "a.pt")
    reloaded = job_trainer()
    reloaded.load(tmp_path / "a.pt")  # and saved again before fit: where the epoch began is kept
    again = reloaded.state_dict()
    assert again["loader"]["last_batch"] == saved["loader"]["last_batch"] is not None
    assert torch.equal(again["loader"]["epoch_start"]["rng"]["cpu"], saved["loader"]["epoch_start"]["rng"]["cpu"])
    _crash_at("generator", tmp_path / "b.pt", 8, resume_from=tmp_path / "a.pt")  # epoch 1 again: its start replayed
    resumed = job_trainer()
    seed_everything(3)
    resumed.load(tmp_path / "b.pt")
    resumed.fit(job_loader("generator"), EPOCHS, progress=False)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_resume_warnings_say_what_cannot_be_replayed(tmp_path):
    data = torch.utils.data.TensorDataset(*classification_batches(1, 16, seed=2)[0])
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    workers = torch.utils.data.DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    with pytest.warns(memfit.ResumeWarning) as caught:
        trainer.fit(workers, max_steps=0, save_to=tmp_path / "w.pt", progress=False)  # no worker starts
    assert [str(w.message) for w in caught] == [
        "memfit: the DataLoader keeps its workers (persistent_workers=True), whose random state carries over from "
        "epoch to epoch and is not saved: random augmentations after a resume differ from the uninterrupted run's; "
        "persistent_workers=False makes them reproducible"]
    assert caught[0].filename == __file__
    with pytest.warns(memfit.ResumeWarning) as caught:
        trainer.fit(iter([]), max_steps=0, save_to=tmp_path / "w.pt", progress=False)
    assert str(caught[0].message) == ("memfit: fit got a one-shot iterator (list_iterator), which yields its batches "
                                      "once: a resumed run cannot replay the interrupted epoch; pass a DataLoader or "
                                      "another iterable that can be iterated again")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # workers that do not persist, a list: nothing to warn about
        trainer.fit(torch.utils.data.DataLoader(data, batch_size=4, num_workers=1), max_steps=0,
                    save_to=tmp_path / "w.pt", progress=False)
        trainer.fit([], save_to=tmp_path / "w.pt", progress=False)

    # Saved with a seeded loader, resumed with one that holds no generator: said, and training goes on.
    seeded = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = mlp()
    first = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                               Config(micro_batch=4))
    first.fit(seeded, max_steps=2, save_to=tmp_path / "s.pt", progress=False)
    model = mlp()
    second = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                Config(micro_batch=4))
    second.load(tmp_path / "s.pt")
    with pytest.warns(memfit.ResumeWarning) as caught:
        result = second.fit(torch.utils.data.DataLoader(data, batch_size=4), progress=False)
    assert str(caught[0].message) == ("memfit: the saved run's loader held 1 torch.Generator(s), this one 0; its order "
                                      "cannot be restored, so the resumed run may see other batches than the "
                                      "uninterrupted one")
    assert result.steps == 2 and second.step_count == 4


def test_a_state_saved_before_loaders_were_recorded_still_resumes(tmp_path):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    batches = classification_batches(4, 8)
    trainer.fit(batches, max_steps=2, progress=False)
    state = trainer.state_dict()
    del state["loader"], state["counters"]["nonfinite"]  # what a file from before this release holds
    model = mlp()
    resumed = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    resumed.load_state_dict(state)
    assert resumed.nonfinite_steps == 0 and resumed._replay.epoch_start is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resumed.fit(batches, progress=False).steps == 2  # the two trained batches are skipped


def test_out_of_memory_advice_is_what_would_help_this_step():
    def give_up(config, **kwargs):
        model = mlp()
        trainer = Trainer.from_parts(model, torch.optim.Adam(model.parameters()), classification_loss, config,
                                     budget="2KiB", **kwargs)
        with pytest.raises(OutOfMemory) as info:
            trainer.step(classification_batches(1, 8)[0])
        return info.value.advice

    assert give_up(Config(micro_batch=8)) == (
        "precision 'bf16-mixed' (or '16-mixed' on GPUs without bf16) halves activations",
        "checkpoint='all' recomputes each block's activations in backward",
        "848 B was still live after the failure; the model states alone are 848 B",  # weights and Adam's moments
        "a larger budget or device",
    )
    assert give_up(Config(micro_batch=8, precision="bf16-mixed", checkpoint="all"), max_retries=0) == (
        "848 B was still live after the failure; the model states alone are 848 B", "a larger budget or device")


def test_an_oom_in_a_foreach_optimizer_step_before_it_writes_is_retried_with_the_per_tensor_one(caplog):
    batches = classification_batches(2, 8)
    ref = mlp()
    model = copy.deepcopy(ref)
    full_batch_run(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), classification_loss, batches)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8))
    with caplog.at_level(logging.WARNING, logger="memfit"), _OptimizerFault(optimizer, step=0, at=2):
        results = [trainer.step(b) for b in batches]
    assert results[0].retries == 1 and results[0].micro_batches == (8,)  # same micro-batch, other implementation
    assert results[0].oom_events == (memfit.OOMEvent(
        step=1, phase="optimizer", micro_batch=8, message="CUDA out of memory. Tried to allocate 1.00 GiB (injected)",
        action="per-tensor optimizer", config=None),)
    assert optimizer.param_groups[0]["foreach"] is False and trainer.config.micro_batch == 8
    assert caplog.records[0].getMessage().startswith(
        "memfit: out of memory in optimizer.step() at step 1 (CUDA out of memory. Tried to allocate 1.00 GiB "
        "(injected)); retrying the batch with the per-tensor optimizer implementation")
    assert_same_weights(model, ref, 1e-6)
    # foreach=None on the CPU is the per-tensor loop already: an OOM there re-plans the micro-batch instead.
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8))
    with _OptimizerFault(optimizer, step=0, at=2):
        assert trainer.step(batches[0]).micro_batches == (4, 4)
    assert optimizer.param_groups[0]["foreach"] is None


def test_a_trainer_from_a_workload_builds_everything_on_its_device():
    workload = memfit.presets.load("cifar-cnn")
    built = []
    trainer = Trainer(workload, Config(micro_batch=2, precision="bf16-true"), device="cpu",
                      scheduler=lambda opt: built.append(opt) or torch.optim.lr_scheduler.StepLR(opt, 5))
    assert built == [trainer.optimizer] and trainer.scheduler.optimizer is trainer.optimizer
    assert trainer.max_retries == 8 and trainer.device == torch.device("cpu") and trainer.on_nonfinite == "skip"
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    with pytest.raises(memfit.UsageError) as info:
        Trainer(mlp(), Config(micro_batch=2))
    assert str(info.value) == ("Trainer() takes a memfit.Workload, got Sequential; for a model and optimizer you "
                               "built, use Trainer.from_parts(model, optimizer, loss, config)")
    with pytest.raises(memfit.UsageError) as info:
        Trainer(dataclasses.replace(workload, optimizer=None), Config(micro_batch=2))
    assert str(info.value) == "the workload 'cifar-cnn' has no optimizer factory; training needs one"


def test_an_oom_in_optimizer_step_after_unscaling_is_retried_with_a_fresh_scaler_state():
    # 16-mixed with clipping unscales the gradients before optimizer.step(); a retry must be allowed to again.
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8, precision="16-mixed"),
                                 clip_grad_norm=1.0)
    with _OptimizerFault(optimizer, step=0, at=1):
        result = trainer.step(classification_batches(1, 8)[0])
    assert result.retries == 1 and not result.skipped and trainer.step_count == 1


class _FailFirst(TorchDispatchMode):
    """CUDA's OOM at the first op of each of the first ``times`` attempts of trainer.step."""

    def __init__(self, trainer, times: int) -> None:
        super().__init__()
        self.left, self.armed = times, False
        snapshot = trainer._guard.snapshot

        def armed_snapshot():
            self.armed = True
            return snapshot()

        trainer._guard.snapshot = armed_snapshot
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed and self.left and func.namespace != "profiler":
            self.armed = False
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return func(*args, **(kwargs or {}))


def test_re_planning_walks_the_plans_smaller_alternatives_then_halves():
    workload = memfit.Workload(model=mlp, batch=lambda n: classification_batches(1, n)[0], loss=classification_loss,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    base = memfit.plan(workload, "1GiB", batch_size=8, device="cpu")
    assert base.config.micro_batch == 8
    top = base.required

    def alt(micro, required, **kw):
        return Alternative(dataclasses.replace(base.config, micro_batch=micro, **kw), (micro,), required, 1.0, True)

    alternatives = (
        alt(5, top),  # needs as much as the plan: no help
        alt(7, top - 5, precision="bf16-mixed"),  # another precision: the model was built for this one
        alt(6, top - 10),
        alt(4, top - 15, checkpoint=("0",)),
    )
    plan = dataclasses.replace(base, alternatives=alternatives)
    trainer = Trainer(workload, plan)
    with _FailFirst(trainer, times=4):
        result = trainer.step(workload.batch(8))
    # 8 fails -> 6 (the first that needs less) -> 4 with checkpointing -> halves: 2 -> 1.
    assert result.retries == 4 and result.micro_batches == (1,) * 8
    assert trainer.config.micro_batch == 1 and trainer.config.checkpoint == ("0",)
    # Each recovery is on record: where it failed, and the config the batch was redone with.
    events = result.oom_events
    assert [(e.step, e.phase, e.micro_batch, e.action) for e in events] == [
        (1, "forward", m, "re-planned") for m in (8, 6, 4, 2)]
    assert [e.config for e in events] == [alternatives[2].config, alternatives[3].config,
                                          dataclasses.replace(alternatives[3].config, micro_batch=2),
                                          dataclasses.replace(alternatives[3].config, micro_batch=1)]
    assert all(e.message == "CUDA out of memory. Tried to allocate 1.00 GiB (injected)" for e in events)
    assert trainer.step(workload.batch(8)).oom_events == ()  # a step that fitted has none
    assert "forward" in trainer.model[0].__dict__  # the alternative's checkpointing was applied
    # Loading a state trained without checkpointing removes it again.
    state = trainer.state_dict()
    state["config"]["checkpoint"] = ()
    trainer.load_state_dict(state)
    assert "forward" not in trainer.model[0].__dict__ and trainer.config.checkpoint == ()


class _Opaque:
    """Not a tensor, number, string or container: torch.load(weights_only=True) refuses to unpickle it."""

    def __repr__(self) -> str:
        return "opaque"


def test_load_refuses_pickled_objects_unless_asked(tmp_path):
    trainer, _ = _fresh()
    state = trainer.state_dict()
    state["extra"] = _Opaque()
    memfit.statefile.write(state, tmp_path / "odd.pt")
    with pytest.raises(memfit.UsageError, match=r"odd\.pt cannot be read as a saved memfit state \(UnpicklingError"):
        trainer.load(tmp_path / "odd.pt")
    trainer.load(tmp_path / "odd.pt", weights_only=False)  # the caller trusts the file
    assert trainer.step_count == 0


def test_the_saved_state_holds_the_plan_and_forgets_the_last_batch_at_an_epoch_end(tmp_path):
    workload = memfit.Workload(model=mlp, batch=lambda n: classification_batches(1, n)[0], loss=classification_loss,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    plan = memfit.plan(workload, "1GiB", batch_size=8, device="cpu")
    trainer = Trainer(workload, plan, device="cpu")
    trainer.fit(classification_batches(3, 8), save_to=tmp_path / "run.pt", save_every=1, progress=False)
    state = trainer.state_dict()
    assert state["plan"] == plan.to_dict()
    assert state["counters"]["batch_in_epoch"] == 0 and state["loader"]["last_batch"] is None  # a new epoch is next
    mid = memfit.statefile.read(tmp_path / "run.pt")
    assert mid["loader"]["last_batch"] is None  # the final save, after the epoch ended


def test_a_loss_of_the_wrong_form_is_named():
    model = mlp()

    def make(loss):
        return Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, Config(micro_batch=2))

    batch = classification_batches(1, 4)[0]
    for loss, message in (
        (lambda m, b: m(b[0]), "the loss returned Tensor of shape (2, 4); return a scalar mean over the batch or "
                               "(loss_sum, n_items) for token-level losses"),
        (lambda m, b: {"loss": 1}, "the loss returned dict; return a scalar mean over the batch or (loss_sum, n_items) "
                                   "for token-level losses"),
        (lambda m, b: (m(b[0]).sum(1), 2), "the loss returned Tensor of shape (2,); return a scalar mean over the "
                                           "batch or (loss_sum, n_items) for token-level losses"),
    ):
        with pytest.raises(memfit.MemfitError) as info:
            make(loss).step(batch)
        assert str(info.value) == message
    calls = {"n": 0}

    def flips(m, b):
        calls["n"] += 1
        out = classification_loss(m, b)
        return (out * 2, 2) if calls["n"] == 1 else out

    with pytest.raises(memfit.MemfitError) as info:
        make(flips).step(batch)
    assert str(info.value) == ("the loss returned a mean for some micro-batches and (loss_sum, n_items) for others; "
                               "return one form for every batch")


def test_state_differences_list_four_names_then_count_the_rest():
    state = _good_state()
    four = {k: v for k, v in state["model"].items() if k in ("4.weight", "4.bias")}
    model = _three_layers(seed=5)
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), classification_loss,
                                 Config(micro_batch=4))
    with pytest.raises(memfit.UsageError) as info:
        trainer.load_state_dict(dict(state, model=four))
    assert str(info.value) == _PREFIX + "the saved model lacks 0.weight, 0.bias, 2.weight, 2.bias"  # no "and 0 more"
    # A missing key does not stop the check of the keys after it.
    later = {k: v for k, v in state["model"].items() if k != "0.weight"}
    later["4.bias"] = torch.zeros(7)
    with pytest.raises(memfit.UsageError) as info:
        trainer.load_state_dict(dict(state, model=later))
    assert str(info.value) == _PREFIX + "the saved model lacks 0.weight; 4.bias has shape (7,) in the file, (4,) here"
    unlisted = copy.deepcopy(state["optimizer"])
    unlisted["state"] = {9: {}, **unlisted["state"]}
    unlisted["state"][5]["momentum_buffer"] = torch.zeros(5)
    with pytest.raises(memfit.UsageError) as info:
        trainer.load_state_dict(dict(state, optimizer=unlisted))
    assert str(info.value) == _PREFIX + ("the saved optimizer has state for parameter 9, which its groups do not list; "
                                         "its momentum_buffer for parameter 5 has shape (5,), the parameter (4,)")
    no_state = {k: v for k, v in state["optimizer"].items() if k != "state"}
    with pytest.raises(memfit.UsageError) as info:
        trainer.load_state_dict(dict(state, optimizer=no_state))
    assert str(info.value) == _PREFIX + "the saved optimizer state is not an optimizer state_dict"


def test_the_nan_warning_says_what_happened_and_what_to_do(caplog):
    model, trainer, x, y = _sgd_trainer_and_a_nan_batch(1)
    with caplog.at_level(logging.WARNING, logger="memfit"), pytest.warns(memfit.NonFiniteLossWarning) as caught:
        trainer.step((x, y))
    expected = ("memfit: the loss at step 1 is nan; its update was skipped and the model left as it was. Later ones "
                "are counted (StepResult.skip_reason, FitResult.nonfinite) without a warning; pass "
                "on_nonfinite='raise' to stop instead.")
    assert [str(w.message) for w in caught] == [expected]
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_progress_speed_over_less_than_a_second_and_clipping_from_a_workload(monkeypatch):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    _, text = _render_progress(monkeypatch, trainer, [None], 1, [(4, None, None)], [10.0, 10.5])
    assert " 8 samples/s " in text  # 4 samples in half a second
    workload = memfit.presets.load("cifar-cnn")
    assert Trainer(workload, Config(micro_batch=2), clip_grad_norm=0.5).clip_grad_norm == 0.5


class _SchedulerOutOfMemory(torch.optim.lr_scheduler.StepLR):
    """Runs out of memory in the step() after the first training step's (the constructor calls step() once too)."""

    def step(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (injected)")
        return super().step(*args, **kwargs)


def test_an_oom_after_the_update_counts_the_batch_and_does_not_redo_it():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=4))
    trainer.scheduler = _SchedulerOutOfMemory(optimizer, 10)
    batches = classification_batches(2, 8)
    trainer.step(batches[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OutOfMemory) as info:
        trainer.step(batches[1])
    assert str(info.value) == ("out of memory after optimizer.step() had updated the model at step 2 (CUDA out of "
                               "memory. Tried to allocate 2.00 MiB (injected)); the batch counted and is not redone")
    assert info.value.retries == 0 and info.value.micro_batch == 4
    assert [(e.step, e.phase, e.micro_batch, e.action) for e in info.value.events] == [(2, "committed", 4, "raised")]
    # The update stays applied and counted; no gradient is left behind for the next step to add in.
    assert trainer.step_count == 2 and trainer.samples_seen == 16 and trainer.retries == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class _ScriptedComm(LocalComm):
    """One peer rank, scripted: it has the same samples as this one, and at the agreements numbered in
    ``peer_fails`` (from 0) it ran out of memory. Records every agreement as (status, where)."""

    world_size = 2

    def __init__(self, peer_fails=()) -> None:
        self.calls, self.peer_fails, self.unsynced = [], set(peer_fails), 0

    def _call(self, status, where):
        self.calls.append((status, where))
        if status == OK and len(self.calls) - 1 in self.peer_fails:
            raise PeerOutOfMemory(f"out of memory on rank 1 (rank 0 was at {where})")

    def agree(self, status, *values, where=""):
        self._call(status, where)
        return [2 * v for v in values]  # the peer's values are this rank's

    def counts(self, own, where=""):
        self._call(OK, where)
        return [own, own]

    def signal(self, status):
        self.calls.append((status, "a failure"))

    def no_sync(self, model):
        self.unsynced += 1
        return super().no_sync(model)

    def most_samples(self, own):
        return own


# A mean loss's agreements where collectives run in every micro-step: FSDP's own agree before each of them.
_TWO_MICRO_STEPS = ["the start of the step", "micro-step 2's forward", "the update"]


@pytest.fixture
def collectives(monkeypatch):
    """The scripted ranks' model issues collectives in forward and backward, and averages gradients, as FSDP's does."""
    monkeypatch.setattr("memfit.engine.step.issues_collectives", lambda model, phase: True)
    monkeypatch.setattr("memfit.engine.step.is_fsdp", lambda model: True)


def test_without_collectives_in_a_micro_step_the_ranks_agree_at_the_update_only():
    # DDP with its all-reduce deferred issues none (and no buffers to broadcast): each rank splits its own
    # part, an OOM on one rank reaches the others at the update's agreement, whose sums scale the reduce.
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    comm = trainer._attempt.comm = _ScriptedComm()
    trainer.step(classification_batches(1, 8)[0])
    assert comm.calls == [(OK, "the update")]

    def token_loss(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y, reduction="sum"), torch.tensor(len(y))

    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), token_loss, Config(micro_batch=4))
    comm = trainer._attempt.comm = _ScriptedComm()
    trainer.step(classification_batches(1, 8)[0])
    assert comm.calls == [(OK, "the update")]


def test_an_oom_on_another_rank_makes_this_one_drop_the_attempt_and_re_plan_alike(collectives):
    batches = classification_batches(2, 8)
    ref = mlp()
    model = copy.deepcopy(ref)
    reference = Trainer.from_parts(ref, torch.optim.SGD(ref.parameters(), lr=0.1), classification_loss,
                                   Config(micro_batch=4))  # what the re-plan after 8 gives
    for b in batches:
        reference.step(b)
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=8))
    comm = trainer._attempt.comm = _ScriptedComm(peer_fails={1})  # the peer fails in its first forward
    results = [trainer.step(b) for b in batches]
    assert results[0].retries == 1 and results[0].micro_batches == (4, 4) and results[1].micro_batches == (4, 4)
    assert [(e.phase, e.micro_batch, e.message, e.action) for e in results[0].oom_events] == [
        ("forward", 8, "out of memory on rank 1 (rank 0 was at the update)", "re-planned")]
    # The dropped attempt's agreements, then every agreement of the retry and of step 2: all before any update.
    assert comm.calls == [(OK, "the start of the step"), (OK, "the update")] + \
        [(OK, where) for where in _TWO_MICRO_STEPS] * 2
    assert comm.unsynced == 2  # the first of two micro-batches, in each step that had two, reduces no gradients
    assert_same_weights(model, ref, 0.0)


def test_a_rank_that_runs_out_of_memory_tells_the_others_before_re_planning(collectives):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=8))
    comm = trainer._attempt.comm = _ScriptedComm()
    with _FailFirst(trainer, times=1):
        result = trainer.step(classification_batches(1, 8)[0])
    # Its own failure, said once in place of its next agreement; then the retry's agreements.
    assert result.retries == 1 and comm.calls == [(OK, "the start of the step"), (OOM, "a failure")] + [
        (OK, where) for where in _TWO_MICRO_STEPS]


def test_a_rank_that_fails_otherwise_tells_the_others_to_stop(collectives):
    model = mlp()
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                                 Config(micro_batch=4))
    comm = trainer._attempt.comm = _ScriptedComm()
    before = copy.deepcopy(model)

    def broken(model, batch):
        raise ValueError("a bug in the loss")
    trainer._attempt.loss = broken
    with pytest.raises(ValueError, match="a bug in the loss"):
        trainer.step(classification_batches(1, 8)[0])
    assert comm.calls == [(OK, "the start of the step"), (FAILED, "a failure")]
    assert_same_weights(model, before, 0.0)


def test_out_of_memory_advice_for_a_workload_says_what_each_change_saves():
    from zoo import ZOO

    workload = ZOO["tied-lm"]()
    failed = Config(micro_batch=2)
    need = memfit.estimate(workload, failed, device="cpu").required
    trainer = Trainer(workload, failed, device="cpu", budget=need // 2, max_retries=0)
    batch = workload.batch(2)
    with pytest.raises(OutOfMemory) as info:
        trainer.step(batch)
    fixes = info.value.fixes
    changes = [fix for fix in fixes if fix.change]
    assert {fix.lever for fix in changes} == {"precision 'bf16-mixed' (or '16-mixed' on GPUs without bf16)",
                                             "checkpoint='all'"}
    for fix in changes:  # each figure is an estimate of the changed config, against the failed one's
        assert fix.verified and fix.saves == need - memfit.estimate(workload, fix.config(failed), device="cpu").required
        assert fix.describe() == f"{fix.lever} {fix.effect} (saves {memfit.format_bytes(fix.saves)}, estimated)"
    assert [fix.saves for fix in changes] == sorted((fix.saves for fix in changes), reverse=True) and all(
        fix.saves > 0 for fix in changes)
    assert fixes[-1].lever == "a larger budget or device" and info.value.advice == tuple(f.describe() for f in fixes)
    assert "Try: " + "; ".join(info.value.advice) + "." in str(info.value)


@pytest.mark.parametrize("zero_grad", ["zeros", "after-forward"])
def test_gradients_kept_between_steps_train_the_fault_free_weights_through_ooms(zero_grad):
    # With gradients alive between steps, a failed attempt must neither keep its partial
    # gradients nor add the kept ones into the retry (zeros: zeroed again; after-forward: freed).
    batches = classification_batches(6, 16, seed=4)
    ref = mlp()
    model = copy.deepcopy(ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=16, zero_grad=zero_grad))
    results = []
    # (Op counts start after each optimizer step: with zeros, the 4 zero_ ops of zero_grad come first.)
    with FaultInjector(trainer, optimizer, {2: 12, 4: 9}) as injector:
        for batch in batches:
            results.append(trainer.step(batch))
            kept = [p.grad for p in model.parameters()]
            assert all(g is not None for g in kept)  # alive between steps, as the option says
            if zero_grad == "zeros":
                assert all(not g.any() for g in kept)
    assert injector.fired == 2 and sum(r.retries for r in results) == 2
    reference_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), batches,
                  [r.micro_batches for r in results])
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_a_fused_optimizer_trains_as_the_loop_does_and_a_step_in_backward_is_refused():
    batches = classification_batches(3, 16, seed=6)
    ref = mlp()
    model = copy.deepcopy(ref)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, Config(micro_batch=8, optimizer_impl="fused"))
    assert optimizer.param_groups[0]["fused"] is True
    for batch in batches:
        trainer.step(batch)
    reference_run(ref, torch.optim.AdamW(ref.parameters(), lr=0.01, foreach=False), batches, [(8, 8)] * 3)
    assert_same_weights(model, ref, 1e-6)
    with pytest.raises(memfit.UsageError, match="does not run optimizer_in_backward: an out-of-memory error mid-backward"):
        other = mlp()
        Trainer.from_parts(other, torch.optim.SGD(other.parameters(), lr=0.1), classification_loss,
                           Config(micro_batch=8, optimizer_in_backward=True))


# ---------------------------------------------------------------------- all-or-nothing loads, clean failed saves


def _stepped(config: Config = Config(micro_batch=4), steps: int = 1, seed: int = 5, scheduler: bool = False):
    """A trainer that has trained ``steps`` steps: optimizer state, counters and (optionally) a scheduler to lose."""
    model = _three_layers(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer.from_parts(model, optimizer, classification_loss, config,
                                 scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) if scheduler else None)
    for batch in classification_batches(steps, 8, seed=seed):
        trainer.step(batch)
    return trainer


def _corrupt_rng(state, part):
    state = copy.deepcopy(state)
    if part == "cpu":
        state["rng"]["cpu"] = torch.zeros(10, dtype=torch.uint8)
    elif part == "cpu dtype":
        state["rng"]["cpu"] = state["rng"]["cpu"].float()
    elif part == "python":
        state["rng"]["python"][1] = [0] * 5
    elif part == "numpy":
        state["rng"]["numpy"][1] = state["rng"]["numpy"][1][:3]
    elif part == "loader generator":
        state["loader"] = {"epoch_start": None, "generators": [torch.zeros(3)], "last_batch": None}
    elif part == "epoch start":
        state["loader"] = {"epoch_start": {"rng": dict(state["rng"], cpu=torch.zeros(2, dtype=torch.uint8)),
                                           "generators": []}, "generators": [], "last_batch": None}
    return state


@pytest.mark.parametrize("part, message", [
    ("cpu", r"the saved random state's CPU generator state is not torch\.get_rng_state\(\)'s \(a uint8 tensor of "
            r"5056 bytes\), got a uint8 tensor of shape \(10,\)$"),
    ("cpu dtype", r"CPU generator state is not torch\.get_rng_state\(\)'s .*got a float32 tensor of shape \(5056,\)$"),
    ("python", r"the saved random state's Python generator is not random\.getstate\(\)'s \(state vector is the wrong "
               r"size\)$"),
    ("numpy", r"the saved random state's NumPy generator is not numpy\.random\.get_state\(\)'s"),
    ("loader generator", r"the saved loader's generator state is not torch\.get_rng_state\(\)'s .*got a float32 tensor"),
    ("epoch start", r"the saved epoch start's random state's CPU generator state is not torch\.get_rng_state\(\)'s"),
])
def test_a_save_with_a_malformed_random_state_is_refused_before_anything_loads(tmp_path, part, message):
    saved = _stepped(seed=0, steps=3).state_dict()
    if part == "numpy" and saved["rng"]["numpy"] is None:
        pytest.skip("NumPy was not imported: the state has no NumPy generator")
    path = tmp_path / "run.pt"
    memfit.statefile.write(_corrupt_rng(saved, part), path)  # a valid file whose content is wrong
    trainer = _stepped()
    before, config = _snapshot_of(trainer), trainer.config
    with pytest.raises(memfit.UsageError, match=r"^cannot resume from this state \(nothing was changed\): .*" + message):
        trainer.load(path)
    _assert_unchanged(trainer, before)  # weights, optimizer state, counters, every generator
    assert trainer.config == config and trainer._replay.pending is None


def _fails_once(monkeypatch, obj, name: str, error: Exception) -> None:
    real = getattr(obj, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, failing)


@pytest.mark.parametrize("failing, note", [
    ("optimizer", "the model's weights were not touched"),
    ("model", "the model's weights may be partly loaded: load a good save again"),
])
def test_a_load_failing_where_no_check_looked_puts_back_what_it_had_loaded(monkeypatch, failing, note):
    state = _stepped(Config(micro_batch=2), steps=3, seed=0, scheduler=True).state_dict()
    trainer = _stepped(scheduler=True)
    before, config = _snapshot_of(trainer), trainer.config
    optimizer_before = trainer.optimizer.state_dict()
    _fails_once(monkeypatch, getattr(trainer, failing), "load_state_dict", RuntimeError("a hook refused it"))
    with pytest.raises(memfit.UsageError, match=rf"^cannot resume from this state: the {failing} failed to load "
                                                rf"\(RuntimeError: a hook refused it\) though every check passed; what "
                                                rf"was loaded before it was put back, {note}$"):
        trainer.load_state_dict(state)
    _assert_unchanged(trainer, before)  # the model's load raised before copying: its weights are as they were too
    assert trainer.optimizer.state_dict()["param_groups"] == optimizer_before["param_groups"]
    assert (trainer.config, trainer.scheduler.last_epoch, trainer.epoch) == (config, 1, 0)


@pytest.mark.parametrize("saved, resumed", [
    ({"strategy": "ddp", "micro_batch": 2, "checkpoint": ("0",)}, Config(micro_batch=2, checkpoint=("0",))),
    ({"strategy": "fsdp", "reshard_after_forward": False, "sync_every_micro_step": True, "micro_batch": 3},
     Config(micro_batch=3)),
    ({"optimizer_impl": "foreach", "zero_grad": "zeros"}, Config(micro_batch=4)),
])
def test_a_state_saved_under_another_strategy_resumes_its_micro_batch_under_this_trainers(saved, resumed):
    state = _good_state()
    state["config"] = {**state["config"], **saved}  # as a DDP or FSDP rank's state says it
    trainer = _stepped()
    trainer.load_state_dict(state)
    assert trainer.config == resumed and trainer.config.strategy == "single" and trainer.step_count == 1
    assert trainer.state_dict()["config"] == dataclasses.asdict(resumed)  # and the next save says so


def test_the_resumed_config_is_the_saved_micro_batch_and_checkpoints_on_the_trainers_build():
    built = Config(micro_batch=8, strategy="fsdp", reshard_after_forward=False, sync_every_micro_step=True,
                   optimizer_impl="for-loop", zero_grad="after-forward", precision="bf16-mixed")
    saved = Config(micro_batch=3, strategy="ddp", checkpoint=("layers.*",), precision="bf16-mixed")
    assert memfit.engine.state.resumed_config(saved, built) == dataclasses.replace(
        built, micro_batch=3, checkpoint=("layers.*",))


def test_a_save_to_a_full_disk_is_one_line_and_the_previous_save_still_resumes(tmp_path, monkeypatch):
    import builtins
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    trainer, path = _trained(tmp_path)  # saved at step 3
    trainer.step(classification_batches(1, 8, seed=9)[0])
    real = builtins.open
    monkeypatch.setattr(memfit.statefile, "open", lambda file, mode="r", *a, **k: real(
        "/dev/full" if str(file).endswith(".tmp") else file, mode, *a, **k), raising=False)  # ENOSPC from the kernel
    with pytest.raises(memfit.MemfitError, match=rf"^cannot save the training state to {path}: disk full \(.*\); free "
                                                 r"space there or save to another disk.*; the previous save there is "
                                                 r"intact$") as info:
        trainer.save(path)
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    monkeypatch.undo()
    again, _ = _fresh()
    again.load(path)
    assert again.step_count == 3


@pytest.mark.parametrize("loss,match", [
    (lambda m, b: (F.cross_entropy(m(b[0]), b[1], reduction="sum"), "8"), r"n_items = '8'.*a Python number or a 0-dim"),
    (lambda m, b: (F.cross_entropy(m(b[0]), b[1], reduction="sum"), torch.ones(2)),
     r"n_items = a tensor of shape \(2,\)"),
    (lambda m, b: F.cross_entropy(m(b[0]), b[1]).detach(), r"the loss does not require grad .*not loss.item\(\) or"),
    (lambda m, b: (F.cross_entropy(m(b[0]), b[1], reduction="sum").detach(), 8), r"the loss does not require grad"),
])
def test_a_loss_of_the_wrong_form_is_one_clear_error_and_the_step_is_undone(loss, match):
    model = mlp()
    before = copy.deepcopy(model)
    trainer = Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, Config(micro_batch=4))
    with pytest.raises(memfit.UsageError, match=match):
        trainer.step(classification_batches(1, 8)[0])
    assert trainer.step_count == 0
    assert_same_weights(model, before, 0.0)
