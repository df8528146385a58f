"""Workload: the factories of a training step (model, batch, loss, optimizer), and batch helpers.

A workload holds factories rather than objects so that later stages can build
the model, the batch and the optimizer anywhere: on a device, or under
``FakeTensorMode`` to estimate without memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit._tree import map_tensors, tensors
from memfit.errors import MemfitError, UsageError

__all__ = ["Workload", "build_model", "move_batch", "step_loss", "batch_size_of"]


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

    model: Callable[[], nn.Module] | nn.Module
    """Builds the model (on the default device; measure() moves it). A model instance
    (real, or on the meta device for estimate()) is accepted too: it is copied, never changed."""
    batch: Callable[[int], Any]
    """``n -> batch``: any nesting of tuples, lists and dicts of tensors, batch dimension 0."""
    loss: Callable[[nn.Module, Any], Any]
    """``(model, batch) -> loss``: a scalar mean over the batch, or ``(loss_sum, n_items)`` for token-level losses."""
    optimizer: Callable[[Any], torch.optim.Optimizer] | None
    """``params -> optimizer``; None for a step without an optimizer."""
    name: str = field(default="workload", kw_only=True)
    """A label for reports."""

    def __post_init__(self) -> None:
        examples = {"model": "model=lambda: MyModel()", "batch": "batch=lambda n: (torch.randn(n, 8),)",
                    "loss": "loss=lambda model, batch: model(batch[0]).mean()"}
        for name, example in examples.items():
            if not callable(getattr(self, name)):
                raise UsageError(
                    f"Workload.{name} must be callable (a factory), got {type(getattr(self, name)).__name__}; "
                    f"pass e.g. {example} instead of an object"
                )
        if self.optimizer is not None and not callable(self.optimizer):
            raise UsageError(
                f"Workload.optimizer must be a factory params -> Optimizer, got {type(self.optimizer).__name__}; "
                "pass e.g. optimizer=lambda params: torch.optim.AdamW(params)"
            )


def move_batch(batch: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, dicts and Mappings kept).

    ``non_blocking=True`` lets a copy from pinned host memory overlap with compute
    (it is stream-ordered, so the kernels that read it wait for it).
    """
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def batch_size_of(batch: Any) -> int:
    """The size of dimension 0 shared by the batch's tensors."""
    sizes = {t.shape[0] for t in tensors(batch) if t.dim() > 0}
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


def build_model(workload: Workload) -> nn.Module:
    """Call the workload's model factory and check what it returns.

    A model instance in place of the factory is deep-copied, so that casting and
    checkpointing never change the caller's model.
    """
    if isinstance(workload.model, nn.Module):
        return copy.deepcopy(workload.model)
    model = workload.model()
    if not isinstance(model, nn.Module):
        raise MemfitError(f"the workload's model factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model
