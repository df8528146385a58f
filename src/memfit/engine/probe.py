"""Probe: the live and peak bytes of the device a Trainer runs on.

On CPU with a budget, the simulated device's count (:class:`memfit.budget.SimulatedBudget`,
which also knows each byte's category); on CUDA, the caching allocator's statistics;
on CPU without a budget, nothing (None): there is no device count to read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memfit import _torch_private
from memfit.budget import SimulatedBudget

__all__ = ["Probe", "model_state_bytes", "optimizer_state_tensors"]


class Probe:
    """Reads live and peak bytes of ``device``, from the simulated budget ``sim`` when there is one."""

    def __init__(self, device: torch.device, sim: SimulatedBudget | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
        self.device = device
        self.sim = sim
        self.model = model
        self.optimizer = optimizer

    def live_bytes(self) -> int | None:
        """Live bytes now (the simulated device's count, or CUDA's allocator), or None where they cannot be read."""
        if self.sim is not None:
            return self.sim.live_bytes()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return None

    def live_by_category(self, live: int) -> dict[str, int]:
        """``live`` bytes by category: the simulated device's own; on CUDA, model states and the rest."""
        if self.sim is not None:
            return self.sim.live_by_category()
        cats = model_state_bytes(self.model, self.optimizer)
        cats["other (activations, inputs, or tensors kept from earlier steps)"] = live - sum(cats.values())
        return cats

    def measure(self) -> _Measured:
        """A context that measures its block's peak; entering it gives a function that returns the peak
        (None where it cannot be measured), readable once the block is left.

        Under a simulated budget the block runs on the simulated device, which keeps only this
        block's history (a long run's would grow without bound); on CUDA the peak statistic is reset.
        """
        return _Measured(self)

    def release_cached_memory(self) -> None:
        """After an OOM on CUDA: the allocator's cached blocks go back to the driver before the retry (CUDA only)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Measured:
    """A class, not a generator-based context manager: it runs around every step, and this is the cheaper."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.value: int | None = None

    def __enter__(self) -> Callable[[], int | None]:
        probe = self.probe
        if probe.sim is not None:
            probe.sim.__enter__()
            probe.sim.forget_history()
        elif probe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(probe.device)
        return lambda: self.value

    def __exit__(self, *exc: Any) -> None:
        probe = self.probe
        if probe.sim is not None:
            probe.sim.__exit__(*exc)
            self.value = probe.sim.peak
        elif probe.device.type == "cuda":
            self.value = torch.cuda.max_memory_allocated(probe.device)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of the optimizer's state (momentum, moments, step counts stored as tensors)."""
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the model states as they live now: parameters (with buffers), gradients, optimizer state.

    Each storage counts once (tied weights, views), at its full size.
    """
    seen: set[int] = set()

    def nbytes(ts: Iterable[Any]) -> int:
        total = 0
        for t in ts:
            if t is None or t.device.type == "meta":
                continue
            t = _torch_private.local_tensor(t)  # an FSDP parameter, its gradient and state: this rank's shard
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    return {"parameters": nbytes(params) + nbytes(model.buffers()), "gradients": nbytes(p.grad for p in params),
            "optimizer_state": nbytes(optimizer_state_tensors(optimizer))}
