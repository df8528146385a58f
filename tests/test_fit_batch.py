"""fit_batch: whole batches in micro-batches that fit, against full-batch runs, hand-split runs and Accelerate."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import Config, OutOfMemory, Trainer, UsageError
from memfit.config import accumulation_steps, balanced_micro_batch
from memfit.fit_batch import FitBatch, fit_batch

B = 20  # samples per batch: the user's effective batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_close_weights(a: nn.Module, b: nn.Module, rel: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert _rel(p.detach(), q.detach()) <= rel, f"{name}: relative difference {_rel(p.detach(), q.detach()):.2e}"


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------- models, data, references


def net() -> nn.Module:
    """Wide enough that activations, not the optimizer step, set the peak from micro-batch 6 on (no BatchNorm:
    accumulation is the full batch's math)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 4))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(k: int, n: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(k)]


class TokenNet(nn.Module):
    """Sequences of any length: a later batch of longer ones needs more memory per sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.mix = nn.Linear(16, 128)
        self.head = nn.Linear(128, 11)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def token_ce(model, batch):
    ids, labels = batch
    return F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())  # every row the same length: a mean per sample too


def tokens(n: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, seq), generator=g)
    return ids, ids.roll(-1, dims=1)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def required(make, loss, batch, micro: int, **config) -> int:
    """What an independent estimate (a workload of the model's factory and the plain loss) says ``micro`` needs,
    accumulating (the first micro-step's gradients alive in the next)."""
    workload = memfit.Workload(model=make, batch=lambda n: tuple(torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                                                                 for t in batch),
                               loss=loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return memfit.estimate(workload, Config(micro_batch=micro, **config), accumulation=2).required


def full_batch_run(model, optimizer, loss_fn, batches) -> list[float]:
    """The reference: each batch in one piece. Returns each batch's loss before its update."""
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def split_run(model, optimizer, loss_fn, batches, splits) -> None:
    """Exact accumulation by hand, never failing: batch i split into ``splits[i]``, each mean weighted by its share."""
    for batch, sizes in zip(batches, splits):
        n, start = len(batch[0]), 0
        for size in sizes:
            (loss_fn(model, tuple(t[start:start + size] for t in batch)) * (size / n)).backward()
            start += size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def mlp_budget() -> int:
    """Micro-batch 9 fits with 1 KiB to spare (a StepResult the caller holds, say); 10 needs 3 KiB more."""
    fits, over = (required(net, ce, data(1)[0], m) for m in (9, 10))
    assert over - fits > 2048  # the margin cannot let 10 in
    return fits + 1024


def decorated(model, optimizer, budget, loss=ce, **options) -> FitBatch:
    @fit_batch(budget=budget, model=model, optimizer=optimizer, **options)
    def train_step(batch):
        return loss(model, batch)

    return train_step


# ---------------------------------------------------------------------- exact accumulation


def test_accumulated_steps_equal_the_full_batch_and_the_trainer(mlp_budget):
    batches = data(3)
    model = net()
    train_step = decorated(model, adamw(model), mlp_budget)
    results = [train_step(b) for b in batches]
    # 9 fits, so 3 micro-steps; balanced they are 7, 7 and 6 (the last one short).
    assert train_step.predicted == 9 and train_step.micro_batch == 9
    assert [(r.micro_batches, r.retries, r.samples) for r in results] == [((7, 7, 6), 0, B)] * 3
    assert all(r.peak <= mlp_budget for r in results)

    ref = net()
    losses = full_batch_run(ref, adamw(ref), ce, batches)
    assert_close_weights(model, ref, 1e-6)
    assert [r.loss for r in results] == pytest.approx(losses, rel=1e-6)

    other = net()
    trainer = Trainer.from_parts(other, adamw(other), ce, Config(micro_batch=7), budget=mlp_budget)
    assert [trainer.step(b).micro_batches for b in batches] == [(7, 7, 6)] * 3
    assert_same_weights(model, other)
    assert train_step.trainer.step_count == 3 and train_step.trainer.samples_seen == 3 * B


def test_the_prediction_is_the_largest_micro_batch_that_fits_to_the_byte():
    batch = data(1)[0]
    exact = required(net, ce, batch, 9)
    for budget, largest in ((exact, 9), (exact - 1, 8)):
        model = net()
        train_step = decorated(model, adamw(model), budget)
        result = train_step(batch)
        assert train_step.predicted == largest and result.retries == 0
        assert result.micro_batches == accumulation_steps(B, balanced_micro_batch(B, largest))


def test_a_batch_that_fits_whole_is_one_micro_step_where_fewer_samples_accumulating_do_not(mlp_budget):
    # Accumulating keeps a micro-step's gradients alive through the next: 11 samples in two micro-steps
    # need more than 12 in one. The prediction must not take "fits" for monotone across that edge.
    batches = data(2, n=12)
    assert required(net, ce, batches[0], 11) > mlp_budget
    model = net()
    train_step = decorated(model, adamw(model), mlp_budget)
    results = [train_step(b) for b in batches]  # the second step carries Adam's state
    assert train_step.predicted == 12 and [(r.micro_batches, r.retries) for r in results] == [((12,), 0)] * 2


def test_a_batch_larger_than_the_first_is_predicted_again(mlp_budget):
    model = net()
    train_step = decorated(model, adamw(model), mlp_budget)
    first, second = data(1, n=2)[0], data(1)[0]
    assert train_step(first).micro_batches == (2,)  # the whole batch fits; nothing said about 20 yet
    result = train_step(second)
    assert train_step.predicted == 9 and result.micro_batches == (7, 7, 6) and result.retries == 0

    ref = net()
    full_batch_run(ref, adamw(ref), ce, [first, second])
    assert_close_weights(model, ref, 1e-6)


def test_precision_reaches_the_estimate_and_the_run(mlp_budget):
    model = net()
    train_step = decorated(model, adamw(model), mlp_budget, precision="bf16-mixed")
    result = train_step(data(1)[0])
    assert train_step.predicted > 9  # bf16 activations: more samples fit than in fp32
    assert result.micro_batches == accumulation_steps(B, balanced_micro_batch(B, train_step.predicted))

    other = net()
    trainer = Trainer.from_parts(other, adamw(other), ce, Config(micro_batch=max(result.micro_batches),
                                                                   precision="bf16-mixed"))
    assert trainer.step(data(1)[0]).micro_batches == result.micro_batches
    assert_same_weights(model, other)


# ---------------------------------------------------------------------- out of memory


def test_a_later_batch_of_longer_samples_is_retried_with_the_same_samples():
    short = [tokens(10, 8, seed) for seed in (1, 2)]
    long_ = tokens(10, 16, 3)
    batches = [short[0], long_, short[1]]
    # Micro-batch 4 of 8 tokens fits (and 2 of 16, the same tokens); 4 of 16 does not.
    budget = required(TokenNet, token_ce, short[0], 4) + 1024
    model = TokenNet()
    optimizer = adamw(model)
    train_step = decorated(model, optimizer, budget, loss=token_ce)
    results = [train_step(b) for b in batches]
    assert train_step.predicted == 4
    assert [(r.micro_batches, r.retries) for r in results] == [((4, 4, 2), 0), ((2,) * 5, 1), ((2,) * 5, 0)]
    event = results[1].oom_events[0]
    assert (event.micro_batch, event.action, event.config.micro_batch) == (4, "re-planned", 2)
    assert "CUDA out of memory" in event.message and train_step.micro_batch == 2  # kept for later batches
    assert all(r.samples == 10 for r in results)

    # The run that never failed: the same splits by hand; and the full batches.
    ref = TokenNet()
    split_run(ref, adamw(ref), token_ce, batches, [r.micro_batches for r in results])
    assert_same_weights(model, ref)
    full = TokenNet()
    full_batch_run(full, adamw(full), token_ce, batches)
    assert_close_weights(model, full, 1e-6)


def test_an_injected_oom_mid_batch_discards_its_gradients_and_keeps_the_smaller_micro_batch(mlp_budget):
    batches = data(3)
    model = net()
    seen = []  # the micro-batches of the second batch, as the function got them

    def train_step(batch):
        loss = ce(model, batch)
        if step.trainer is not None and step.trainer.step_count == 1:
            seen.append(len(batch[0]))
            if len(seen) == 2:  # the second micro-batch: its forward done, the first's gradients in
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return loss

    step = fit_batch(train_step, budget=mlp_budget, model=model, optimizer=adamw(model))
    assert step.__name__ == "train_step" and step.__wrapped__ is train_step
    results = [step(b) for b in batches]
    thirds = (3,) * 6 + (2,)  # 7 failed: half of it, 3, from then on
    assert [(r.micro_batches, r.retries) for r in results] == [((7, 7, 6), 0), (thirds, 1), (thirds, 0)]
    assert step.micro_batch == 3 and seen == [7, 7, *thirds]

    ref = net()
    split_run(ref, adamw(ref), ce, batches, [(7, 7, 6), thirds, thirds])
    assert_same_weights(model, ref)
    full = net()
    full_batch_run(full, adamw(full), ce, batches)
    assert_close_weights(model, full, 1e-6)


def test_accelerate_shrinks_the_batch_where_fit_batch_keeps_it(mlp_budget):
    accelerate = pytest.importorskip("accelerate.utils")
    batches = data(2)
    tried = []

    @accelerate.find_executable_batch_size(starting_batch_size=B)
    def train(batch_size):
        # Accelerate's pattern: model, optimizer and loader made inside, afresh for each batch size tried.
        tried.append(batch_size)
        model = net()
        optimizer = adamw(model)
        with memfit.simulate_budget(mlp_budget, model, optimizer):
            for x, y in batches:
                ce(model, (x[:batch_size], y[:batch_size])).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return model

    acc_model = train()
    # The size shrinks (to 90% a time in accelerate 1.15, halved in older releases) until two steps run (the
    # second, with Adam's state, is the larger): each step trained on fewer samples than the batch asked for.
    assert tried[0] == B and tried == sorted(tried, reverse=True) and len(set(tried)) == len(tried) > 1

    model = net()
    train_step = decorated(model, adamw(model), mlp_budget)
    results = [train_step(b) for b in batches]
    assert [r.samples for r in results] == [sum(r.micro_batches) for r in results] == [B, B]

    ref = net()
    full_batch_run(ref, adamw(ref), ce, batches)
    assert_close_weights(model, ref, 1e-6)
    assert max(_rel(p.detach(), q.detach()) for p, q in zip(acc_model.parameters(), ref.parameters())) > 1e-3


def test_micro_batch_1_out_of_memory_raises_with_fixes_and_leaves_model_and_optimizer_as_they_were():
    short = tokens(10, 8, 1)
    budget = required(TokenNet, token_ce, short, 4) + 1024
    model = TokenNet()
    optimizer = adamw(model)
    train_step = decorated(model, optimizer, budget, loss=token_ce)
    train_step(short)  # the optimizer has its state: there is something to keep
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(OutOfMemory, match="micro-batch 1 does not fit") as info:
        train_step(tokens(10, 512, 2))  # one sequence of 512 does not fit
    assert isinstance(info.value, torch.OutOfMemoryError) and info.value.micro_batch == 1
    assert info.value.fixes and "a larger budget or device" in str(info.value)
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    assert all(torch.equal(optimizer_before["state"][i][k], v) for i, s in after["state"].items() for k, v in s.items())
    assert all(p.grad is None for p in model.parameters())
    # A batch that failed whole says nothing about the others: the next one runs at the predicted size.
    assert train_step.micro_batch == 4 and train_step(tokens(10, 8, 3)).micro_batches == (4, 4, 2)


def test_without_a_prediction_the_batch_starts_whole_and_halves_exactly(mlp_budget, caplog):
    batches = data(2)
    model = net()

    def train_step(b):
        loss = ce(model, b)
        assert loss.item() > 0  # reads a value: fake tensors have none, so no estimate
        return loss

    step = fit_batch(train_step, budget=mlp_budget, model=model, optimizer=adamw(model))
    with caplog.at_level(logging.WARNING, logger="memfit"):
        results = [step(b) for b in batches]
    assert step.predicted is None and "could not predict train_step's micro-batch" in caplog.text
    # The first step fits whole (Adam's state is made after its backward); the second carries the state:
    # 20 and 10 run out, 5 fits.
    assert [(r.micro_batches, r.retries) for r in results] == [((20,), 0), ((5, 5, 5, 5), 2)]
    ref = net()
    full_batch_run(ref, adamw(ref), ce, batches)
    assert_close_weights(model, ref, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_reads_the_card_and_splits_a_batch_that_does_not_fit_whole():
    torch.cuda.empty_cache()
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda()
    batch = (torch.randn(32768, 4096),)  # 512 MiB on the host; with its activations ~2 GiB on the card
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(free - (1 << 30), 0), dtype=torch.uint8, device="cuda")  # leave ~1 GiB free
    try:
        train_step = decorated(model, torch.optim.SGD(model.parameters(), lr=1e-3), "auto",
                               loss=lambda m, b: m(b[0]).square().mean())
        result = train_step(batch)
    finally:
        del ballast
    assert train_step.predicted is not None and 1 <= train_step.predicted < 32768
    assert sum(result.micro_batches) == 32768 and max(result.micro_batches) < 32768


# ---------------------------------------------------------------------- bad input


def test_a_budget_that_is_not_a_positive_size_is_refused():
    model = net()
    optimizer = adamw(model)
    for budget, message in ((0, "more than 0 bytes"), ("0GiB", "more than 0 bytes"), (-1, "must not be negative"),
                            ("lots", "bad byte quantity 'lots'"), ("auto", "the model is on cpu")):
        with pytest.raises(UsageError, match=message):
            decorated(model, optimizer, budget)


def test_model_and_optimizer_are_required_and_must_match():
    model = net()
    with pytest.raises(UsageError, match=r"needs model= and optimizer= \(missing: optimizer\)"):
        fit_batch(budget="1MiB", model=model)(lambda batch: ce(model, batch))
    with pytest.raises(UsageError, match=r"missing: model, optimizer"):
        fit_batch(lambda batch: batch, budget="1MiB")
    with pytest.raises(UsageError, match="2 of the optimizer's 2 parameters are not the model's"):
        decorated(model, adamw(nn.Linear(2, 2)), "1MiB")
    with pytest.raises(UsageError, match="Accelerate's find_executable_batch_size passes a batch size"):
        fit_batch(lambda batch_size, model: None, budget="1MiB", model=model, optimizer=adamw(model))


@pytest.mark.parametrize("returns, message", [
    (lambda m, b: m(b[0]), r"returned a loss of shape \(\d+, 4\), not a scalar"),
    (lambda m, b: ce(m, b).item(), r"returned a number \(.item\(\) or float\(\) cut it from the graph\)"),
    (lambda m, b: ce(m, b).detach(), "does not require grad"),
], ids=["logits", "float", "detached"])
def test_a_function_that_returns_no_scalar_loss_says_what_to_return(mlp_budget, returns, message):
    model = net()
    optimizer = adamw(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=message):
        decorated(model, optimizer, mlp_budget, loss=returns)(data(1)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not optimizer.state


@pytest.mark.parametrize("inside", ["backward", "step"])
def test_a_function_that_steps_itself_is_refused(mlp_budget, inside):
    model = net()
    optimizer = adamw(model)

    def accelerate_habit(m, b):
        loss = ce(m, b)
        if inside == "backward":
            loss.backward()
        else:
            optimizer.step()
        return loss

    train_step = decorated(model, optimizer, mlp_budget, loss=accelerate_habit)
    with pytest.raises(UsageError, match="called backward" if inside == "backward" else "called optimizer.step"):
        train_step(data(1)[0])
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state


@pytest.mark.parametrize("batch", [torch.tensor(3.0), (torch.tensor(1.0), torch.tensor(2)), [1, 2, 3]],
                         ids=["scalar", "scalars", "no-tensors"])
def test_a_batch_without_a_batch_dimension_is_refused(mlp_budget, batch):
    model = net()
    train_step = decorated(model, adamw(model), mlp_budget)
    with pytest.raises(UsageError, match=r"train_step\(batch\): the batch has no tensor with a batch dimension"):
        train_step(batch)
    assert train_step.trainer is None  # refused before anything was built


def test_an_empty_batch_is_refused_at_the_first_call_and_after_it(mlp_budget, caplog):
    model = net()
    optimizer = adamw(model)
    train_step = decorated(model, optimizer, mlp_budget)
    empty = (torch.empty(0, 8), torch.empty(0, dtype=torch.long))
    message = (r"^train_step\(batch\): the batch is empty \(0 samples on dimension 0\); each call takes one optimizer "
               r"step over the batch's samples: skip empty batches, e.g. `if len\(x\): train_step\(batch\)`$")
    with caplog.at_level(logging.WARNING, logger="memfit"), pytest.raises(UsageError, match=message):
        train_step(empty)
    assert train_step.trainer is None and not caplog.records  # refused before predicting (no "could not predict")
    train_step(data(1)[0])
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(UsageError, match=message):  # after a first call it divided by zero
        train_step(empty)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert str(optimizer.state_dict()) == str(state) and train_step.micro_batch == 9
    assert train_step.trainer.step_count == 1
