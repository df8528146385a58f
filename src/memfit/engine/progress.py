"""The progress of :meth:`memfit.Trainer.fit`: a rich progress bar, and the logged loss window."""

from __future__ import annotations

import time
from typing import Any

import torch

from memfit.engine.results import StepResult
from memfit.units import format_bytes

__all__ = ["ProgressBar", "LossWindow"]


class ProgressBar:
    """fit's rich progress bar: samples/s, loss, peak memory against the budget.

    A resumed run (``epoch``, ``batch_in_epoch`` past the start) starts the bar where the saved run stopped.
    """

    def __init__(self, loader: Any, epochs: int, *, epoch: int, batch_in_epoch: int, budget: int | None,
                 console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.budget = budget
        try:
            per_epoch = len(loader)
        except TypeError:  # an iterable without a length: the bar counts steps without a total
            per_epoch = None
        self.start = time.perf_counter()
        self.samples = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[speed]}"), TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[memory]}"),
            console=console or Console(stderr=True),  # stays on screen when done (transient=False)
        )
        done = epoch * per_epoch + batch_in_epoch if per_epoch is not None else 0
        self.task = self.progress.add_task("train", total=per_epoch * epochs if per_epoch is not None else None,
                                           completed=done, speed="", loss="-", memory="")
        self.progress.start()

    def advance(self, result: StepResult, loss: float | None, peak: int | None) -> None:
        self.samples += result.samples
        speed = self.samples / max(time.perf_counter() - self.start, 1e-9)
        budget = self.budget
        memory = "" if peak is None else f"peak {format_bytes(peak)}" + (f"/{format_bytes(budget)}" if budget else "")
        self.progress.update(self.task, advance=1, speed=f"{speed:,.0f} samples/s",
                             loss="-" if loss is None else f"{loss:.4f}", memory=memory)

    def close(self) -> None:
        self.progress.stop()


class LossWindow:
    """The logging window's loss: its per-sample (or per-item) weighted sum and count, kept on the device.

    Two running scalars, not a list of step losses, so live memory does not grow between logs.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.items: torch.Tensor | None = None
        self.steps = 0

    def add(self, result: StepResult) -> None:
        loss, items = result.loss_tensor.detach().double(), result.items_tensor.detach().double()
        if self.total is None:
            self.total, self.items = loss * items, items.clone()
        else:
            self.total += loss * items
            self.items += items
        self.steps += 1

    def mean(self) -> float | None:
        """The window's mean loss, read from the device (its one sync); empties the window.

        Logging never ends a run: if even this small read runs out of memory, the window's loss goes unreported.
        """
        try:
            total, items = torch.stack([self.total, self.items]).tolist() if self.total is not None else (0.0, 0.0)
            mean = total / items if items else float("nan")
        except torch.OutOfMemoryError:
            mean = None
        self.total = self.items = None
        self.steps = 0
        return mean
