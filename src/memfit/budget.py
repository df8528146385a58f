"""simulate_budget: a memory limit enforced on counted storages, to exercise OOM without a GPU.

The simulated device counts exactly what :func:`memfit.track` counts and raises
``torch.OutOfMemoryError`` before an op's outputs would take live bytes over
the budget, with a message that begins like CUDA's ("CUDA out of memory. Tried
to allocate ..."), so code that recognises CUDA's OOM (Lightning's
``is_oom_error``, Accelerate's ``should_reduce_batch_size``, memfit's own
guard) handles it the same way. The outputs that did not fit are dropped, as a
failed allocation would be; leaving the ``with`` block restores everything.

Known limitations: the check runs after each aten op (the memory of a real op
is already allocated on CPU when it fails; nothing is wasted on fake tensors);
it does not model the CUDA caching allocator's fragmentation.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.tracker import MemoryTracker
from memfit.units import format_bytes, parse_bytes

__all__ = ["simulate_budget", "SimulatedBudget"]


class SimulatedBudget(MemoryTracker):
    """A :class:`~memfit.tracker.MemoryTracker` that raises ``torch.OutOfMemoryError`` past ``budget`` bytes."""

    def __init__(
        self,
        budget: int | str,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str | None = None,
        sources: bool = False,
    ) -> None:
        super().__init__(model, optimizer, device=device, sources=sources)
        self.budget = parse_bytes(budget)
        self._ledger.limit = self.budget

    def _over_budget(self, nbytes: int) -> None:
        live = self.live_bytes()
        free = max(self.budget - live, 0)
        # The first sentence matches CUDA's so that OOM detectors recognise it.
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {format_bytes(nbytes)}. "
            f"Simulated budget of {format_bytes(self.budget)} ({self.budget:,} bytes) by memfit.simulate_budget "
            f"on {self.device}: {format_bytes(live)} in use, {format_bytes(free)} free. "
            "No real device ran out; reduce the micro-batch or raise the budget."
        )


def simulate_budget(
    budget: int | str,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str | None = None,
) -> SimulatedBudget:
    """A context manager that acts as a device with ``budget`` bytes (int or "24GiB").

    Example:
        >>> model = torch.nn.Linear(1024, 1024)
        >>> with simulate_budget("5MiB", model):
        ...     model(torch.ones(512, 1024))  # doctest: +SKIP
        torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB. Simulated budget of 5.00 MiB ...
    """
    return SimulatedBudget(budget, model, optimizer, device=device)
