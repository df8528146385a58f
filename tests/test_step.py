"""The training step's shared parts (memfit.step): what run_steps and the Trainer's attempt both run."""

import torch
from torch import nn

from memfit.config import Config
from memfit.step import backward, forward, prepare, run_steps, update
from memfit.strategies import Recipe
from memfit.workload import Workload


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_prepare_casts_floating_inputs_for_true_precisions_only():
    batch = {"x": torch.ones(2, 3), "y": torch.tensor([0, 1])}
    out = prepare(batch, "cpu", Recipe(Config(micro_batch=2, precision="bf16-true"), "cpu"))
    assert out["x"].dtype == torch.bfloat16 and out["y"].dtype == torch.int64
    out = prepare(batch, "cpu", Recipe(Config(micro_batch=2, precision="bf16-mixed"), "cpu"))
    assert out["x"].dtype == torch.float32  # autocast casts inside forward, the inputs stay
    assert prepare(batch, None, None) is batch


def test_forward_runs_under_the_recipes_autocast():
    model = _linear()
    recipe = Recipe(Config(micro_batch=2, precision="bf16-mixed"), "cpu")
    out = forward(lambda m, b: m(b), model, torch.ones(2, 3), recipe)
    assert out.dtype == torch.bfloat16
    assert forward(lambda m, b: m(b), model, torch.ones(2, 3), None).dtype == torch.float32


def test_update_clips_steps_once_and_frees_the_gradients():
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    backward(model(torch.full((4, 3), 10.0)).sum(), None)
    calls = []
    skipped = update(optimizer, None, clip_grad_norm=0.5, params=model.parameters(), committed=lambda: calls.append(1))
    assert skipped is False and calls == [1]
    assert all(p.grad is None for p in model.parameters())
    change = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    torch.testing.assert_close(change.norm(), torch.tensor(0.5))  # SGD lr=1 moves by the clipped gradient


def test_update_reports_a_step_the_grad_scaler_skipped():
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    backward(model(torch.ones(1, 3)).sum() * float("inf"), scaler)
    assert update(optimizer, scaler, detect_skip=True) is True
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0  # backed off

    backward(model(torch.ones(1, 3)).sum(), scaler)
    assert update(optimizer, scaler, detect_skip=True) is False
    assert not torch.equal(before[0], model.weight)


def test_run_steps_accumulates_micro_steps_before_one_update():
    seen = []
    workload = Workload(model=_linear, batch=lambda n: torch.ones(n, 3),
                        loss=lambda m, b: (seen.append(b.shape[0]), m(b).pow(2).mean())[1],
                        optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    model = workload.model()
    optimizer = workload.optimizer(model.parameters())
    run_steps(workload, model, optimizer, 2, 3, accumulation=4)
    assert seen == [2] * 12
    assert all(optimizer.state[p]["step"].item() == 3 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_run_steps_without_an_optimizer_only_frees_the_gradients():
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    workload = Workload(model=_linear, batch=lambda n: torch.ones(n, 3), loss=lambda m, b: m(b).sum(),
                        optimizer=None)
    run_steps(workload, model, None, 2, 2)
    assert all(torch.equal(b, p) and p.grad is None for b, p in zip(before, model.parameters()))
