"""Workload: factories for a training step, and measure(), which runs real steps under a tracker.

A workload holds factories rather than objects so that later stages can build
the model, the batch and the optimizer anywhere: on a device, or under
``FakeTensorMode`` to estimate without memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.errors import MemfitError, UsageError
from memfit.report import MemoryReport
from memfit.tracker import track

__all__ = ["Workload", "measure", "run_steps", "move_batch", "step_loss", "batch_size_of"]


@dataclass(frozen=True, slots=True)
class Workload:
    """One training step's ingredients, as factories.

    Example:
        >>> wl = Workload(
        ...     model=lambda: torch.nn.Linear(8, 2),
        ...     batch=lambda n: (torch.randn(n, 8), torch.randint(0, 2, (n,))),
        ...     loss=lambda model, b: torch.nn.functional.cross_entropy(model(b[0]), b[1]),
        ...     optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        ... )
    """

    model: Callable[[], nn.Module]
    """Builds the model (on the CPU or the current default device; measure() moves it)."""
    batch: Callable[[int], Any]
    """``n -> batch``: any nesting of tuples, lists and dicts of tensors, batch dimension 0."""
    loss: Callable[[nn.Module, Any], Any]
    """``(model, batch) -> loss``: a scalar mean over the batch, or ``(loss_sum, n_items)`` for token-level losses."""
    optimizer: Callable[[Any], torch.optim.Optimizer] | None
    """``params -> optimizer``; None for a step without an optimizer."""
    name: str = field(default="workload", kw_only=True)
    """A label for reports."""

    def __post_init__(self) -> None:
        for name in ("model", "batch", "loss"):
            if not callable(getattr(self, name)):
                raise UsageError(
                    f"Workload.{name} must be callable (a factory), got {type(getattr(self, name)).__name__}; "
                    f"pass e.g. {name}=lambda: ... instead of an object"
                )
        if self.optimizer is not None and not callable(self.optimizer):
            raise UsageError(
                f"Workload.optimizer must be a factory params -> Optimizer, got {type(self.optimizer).__name__}; "
                "pass e.g. optimizer=lambda params: torch.optim.AdamW(params)"
            )


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, dicts and Mappings kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_batch(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)({k: move_batch(v, device) for k, v in batch.items()})
    if hasattr(batch, "to") and hasattr(batch, "items"):  # transformers BatchEncoding
        return batch.to(device)
    return batch


def batch_size_of(batch: Any) -> int:
    """The size of dimension 0 shared by the batch's tensors."""
    from memfit.tracker import _tensors

    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise UsageError(
            f"cannot tell the batch size: the batch's tensors have first dimensions {sorted(sizes)}; "
            "every tensor of a batch needs the batch on dimension 0"
        )
    return sizes.pop()


def step_loss(output: Any) -> torch.Tensor:
    """The scalar to backpropagate from a workload loss's output: a mean, or loss_sum / n_items."""
    if isinstance(output, torch.Tensor):
        if output.dim() != 0:
            raise MemfitError(f"the workload's loss returned a tensor of shape {tuple(output.shape)}; return a scalar mean over the batch or (loss_sum, n_items)")
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor):
        loss_sum, n_items = output
        return loss_sum / n_items
    raise MemfitError(
        f"the workload's loss returned {type(output).__name__}; return a scalar mean tensor or (loss_sum, n_items)"
    )


def measure(workload: Workload, micro_batch: int, steps: int = 2, device: torch.device | str = "cpu") -> MemoryReport:
    """Run ``steps`` real training steps at ``micro_batch`` under a tracker; return the report.

    Each step is: build a batch, forward and loss, backward, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``. The model is built before tracking starts and
    counted from the start (parameters, buffers). Two steps by default, because
    optimizers create their state lazily in the first step: the second shows the
    steady state.
    """
    if not isinstance(workload, Workload):
        raise UsageError(f"measure() takes a memfit.Workload, got {type(workload).__name__}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise UsageError(f"micro_batch must be a positive int, got {micro_batch!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive int, got {steps!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but torch.cuda.is_available() is False; use device='cpu'")
    model = workload.model()
    if not isinstance(model, nn.Module):
        raise MemfitError(f"the workload's model factory returned {type(model).__name__}, expected a torch.nn.Module")
    model = model.to(device)
    model.train()
    optimizer = workload.optimizer(model.parameters()) if workload.optimizer is not None else None
    with track(model, optimizer, device=device) as tracker:
        run_steps(workload, model, optimizer, micro_batch, steps, tracker=tracker, device=device)
    report = tracker.report()
    return dataclasses.replace(report, extra={"workload": workload.name, "micro_batch": micro_batch})


def run_steps(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    micro_batch: int,
    steps: int,
    *,
    tracker=None,
    device: torch.device | str | None = None,
) -> None:
    """Run ``steps`` plain training steps: batch, forward and loss, backward, step, zero_grad.

    The same loop serves real runs and fake-tensor runs (enter ``FakeTensorMode``
    before building the model), so both count the same storages.
    """
    for _ in range(steps):
        batch = workload.batch(micro_batch)
        if device is not None:
            batch = move_batch(batch, device)
        if tracker is not None:
            tracker.mark_inputs(batch)
        loss = step_loss(workload.loss(model, batch))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        # Drop the step's references now so the next step starts from a clean slate.
        del batch, loss
