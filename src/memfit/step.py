"""The training step's parts, the same for every caller: prepare, forward, backward, update.

memfit runs a training step in two places that must hold the same memory:
:func:`run_steps` (what ``measure``, ``estimate``, ``find_batch_size`` and the
demo run, on real or fake tensors) and :class:`memfit.engine.step.TrainStep`
(the Trainer's attempt, which adds the large batch's loss math, the OOM guard's
phases and the ranks' agreement). Both are built from the functions here, so a
change to how a micro-batch is moved and cast, how forward runs under the
recipe, how backward goes through the GradScaler or how the optimizer steps and
frees the gradients reaches every figure memfit reports and every run it trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memfit import _torch_private
from memfit.optimizers import OptimizerInBackward
from memfit.strategies import Recipe
from memfit.workload import Workload, move_batch, step_loss

__all__ = ["prepare", "forward", "backward", "update", "release_before_backward", "run_steps"]


def prepare(batch: Any, device: torch.device | str | None, recipe: Recipe | None, *,
            non_blocking: bool = False) -> Any:
    """The micro-batch as forward sees it: on ``device`` (if given), inputs cast to the recipe's precision."""
    if device is not None:
        batch = move_batch(batch, device, non_blocking=non_blocking)
    if recipe is not None:
        batch = recipe.precision.convert_input(batch)
    return batch


def forward(loss: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any, recipe: Recipe | None) -> Any:
    """``loss(model, batch)`` under the recipe's autocast and activation offload."""
    if recipe is None:
        return loss(model, batch)
    with recipe.forward_context():
        return loss(model, batch)


def backward(loss: torch.Tensor, scaler: Any) -> None:
    """Backpropagate ``loss``, scaled by the GradScaler when there is one (``16-mixed``)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def update(optimizer: torch.optim.Optimizer, scaler: Any, *, clip_grad_norm: float | None = None,
           params: Iterable[torch.Tensor] = (), committed: Callable[[], None] | None = None,
           detect_skip: bool = False, zero_grad: str = "set-to-none",
           context: Callable[[], Any] = contextlib.nullcontext) -> bool:
    """Clip, step and release the gradients as ``zero_grad`` says; True if the GradScaler skipped the step.

    ``zero_grad`` is :attr:`memfit.Config.zero_grad`: ``"set-to-none"`` frees them now,
    ``"zeros"`` keeps them as zeros, ``"after-forward"`` leaves them for
    :func:`release_before_backward` to free after the next forward. ``context()`` is
    entered around the optimizer step (the recipe's: values of fake tensors for estimates).

    ``committed`` is called as soon as the parameters may have changed (the
    guard can no longer undo the attempt). ``detect_skip`` reads the scale
    before and after (one sync; the scale backs off exactly when GradScaler
    found an inf and skipped); fake tensors have no values, so estimates pass False.
    """
    skipped = False
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scale = scaler.get_scale() if detect_skip else None
        with context():
            scaler.step(optimizer)
        if committed is not None:
            committed()
        scaler.update()
        skipped = scale is not None and scaler.get_scale() < scale
    else:
        with context():
            optimizer.step()
        if committed is not None:
            committed()
    if zero_grad != "after-forward":
        # set-to-none frees the gradients until the next backward; zeros keeps their memory.
        optimizer.zero_grad(set_to_none=zero_grad == "set-to-none")
    return skipped


def release_before_backward(model: nn.Module, optimizer: torch.optim.Optimizer | None, zero_grad: str) -> None:
    """Between the first forward of a step and its backward: free the last step's gradients if ``zero_grad``
    is ``"after-forward"`` (they lived through the forward, as in a loop that calls ``zero_grad()`` there)."""
    if zero_grad == "after-forward":
        (optimizer if optimizer is not None else model).zero_grad(set_to_none=True)


def run_steps(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    micro_batch: int,
    steps: int,
    *,
    tracker=None,
    device: torch.device | str | None = None,
    recipe: Recipe | None = None,
    accumulation: int = 1,
    no_sync: Callable[[], Any] | None = None,
) -> None:
    """Run ``steps`` plain training steps: batch, forward and loss, backward, step, zero_grad.

    With ``accumulation=k`` each step runs k micro-steps (forward and backward)
    before the optimizer step, so the gradients of the first are alive during the
    next ones, as under gradient accumulation. The same loop serves real runs and
    fake-tensor runs (enter ``FakeTensorMode`` before building the model), so both
    count the same storages. ``recipe`` adds autocast, activation offload and a
    GradScaler as its Config asks. ``no_sync()``, where given, is the context the
    micro-steps before the last run in (a wrapper's gradient sync off, as the Trainer
    accumulates across ranks). (Memory only: losses are not rescaled here;
    the Trainer's TrainStep does the exact accumulation.)
    """
    scaler = recipe.scaler() if recipe is not None and optimizer is not None else None
    zero_grad = recipe.config.zero_grad if recipe is not None else "set-to-none"
    if isinstance(optimizer, OptimizerInBackward) and tracker is not None:
        # The tracker's own gradient hook runs after the update freed the gradient: mark it before.
        optimizer.before_step = lambda p: tracker.mark(p.grad, "gradients")
    for _ in range(steps):
        for i in range(accumulation):
            with no_sync() if no_sync is not None and i < accumulation - 1 else contextlib.nullcontext():
                batch = prepare(workload.batch(micro_batch), device, recipe)
                if tracker is not None:
                    tracker.mark_inputs(batch)
                loss = step_loss(forward(workload.loss, model, batch, recipe))
                if i == 0:
                    release_before_backward(model, optimizer, zero_grad)
                backward(loss, scaler)
                # Drop the micro-step's references now: only the gradients carry over.
                del batch, loss
        if optimizer is None:
            model.zero_grad(set_to_none=zero_grad != "zeros")
            continue
        update(optimizer, scaler, zero_grad=zero_grad,
               context=recipe.optimizer_context if recipe is not None else contextlib.nullcontext)
        if scaler is not None and tracker is not None:  # the scale is training state, like the optimizer's
            tracker.mark(_torch_private.grad_scaler_state(scaler), "optimizer_state")
