"""What a training step and a run did: :class:`StepResult` and :class:`FitResult`, frozen records."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.config import Config

__all__ = ["StepResult", "FitResult", "OOMEvent"]


@dataclass(frozen=True, slots=True)
class OOMEvent:
    """One out-of-memory error the guard handled in a step, and what it did about it."""

    step: int
    """The step the batch was for (1 for the first)."""
    phase: str
    """Where the attempt was: ``"forward"`` (forward and loss), ``"backward"``, ``"optimizer"``
    (inside ``optimizer.step()``), or ``"committed"`` (after the update was applied)."""
    micro_batch: int
    """The micro-batch that ran out."""
    message: str
    """The first line of PyTorch's error."""
    action: str
    """``"re-planned"`` (redone with :attr:`config`), ``"per-tensor optimizer"`` (redone without the
    foreach implementation's temporaries), or ``"raised"`` (:class:`memfit.OutOfMemory` followed)."""
    config: Config | None = None
    """The configuration the batch was redone with; None unless re-planned."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one logical batch did. ``loss`` and ``items`` read the device (a sync) when accessed."""

    step: int
    """The trainer's step count after this step (1 for the first)."""
    samples: int
    """Samples in the logical batch."""
    micro_batches: tuple[int, ...]
    """The micro-batch sizes that finally ran (they sum to ``samples``)."""
    retries: int
    """Out-of-memory retries of this batch (0 if the first attempt fitted)."""
    skipped: bool
    """True if the optimizer step was skipped; ``skip_reason`` says why."""
    peak: int | None
    """Peak bytes of the step: CUDA's ``max_memory_allocated``, the simulated budget's count, or None on CPU."""
    loss_tensor: torch.Tensor
    """The batch's mean loss, detached, on the device."""
    items_tensor: torch.Tensor
    """Samples (mean losses) or items (``(loss_sum, n_items)`` losses) the loss averaged over."""
    skip_reason: str | None = None
    """Why the update was skipped: ``"non-finite loss"`` (NaN or inf: the model was left as it was),
    ``"no items"`` (every item of a ``(loss_sum, n_items)`` loss was padding) or ``"grad scaler"``
    (``16-mixed``: inf/nan gradients, the scale backs off); None if it ran."""
    oom_events: tuple[OOMEvent, ...] = ()
    """The out-of-memory errors this batch recovered from, in order (as many as ``retries``)."""

    @property
    def loss(self) -> float:
        """The logical batch's mean loss (per sample, or per item for token-level losses)."""
        return float(self.loss_tensor)

    @property
    def items(self) -> int:
        """Samples, or items for ``(loss_sum, n_items)`` losses, in the batch."""
        return int(self.items_tensor)


@dataclass(frozen=True, slots=True)
class FitResult:
    """What :meth:`memfit.Trainer.fit` did."""

    steps: int
    samples: int
    loss: float | None
    """Mean loss of the last logged window (None if nothing ran)."""
    peak: int | None
    """Highest step peak in bytes (None where it cannot be measured)."""
    retries: int
    skipped: int
    """Steps whose update was skipped, for any reason (see :attr:`StepResult.skip_reason`)."""
    seconds: float
    nonfinite: int = 0
    """Of ``skipped``: steps skipped because the loss was NaN or inf."""
