"""fit's loop: batches and epochs, with the leak check, the progress bar, the logged loss and saves.

One straight loop over ``trainer.step``; the loss is read from the device once per logged
window (:class:`memfit.engine.progress.LossWindow`), never per step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from memfit.engine.progress import LossWindow, ProgressBar
from memfit.engine.results import FitResult
from memfit.engine.step import NONFINITE

__all__ = ["run_fit"]


def run_fit(trainer: Any, loader: Iterable[Any], epochs: int, *, log_every: int, max_steps: int | None,
            leak_check: bool, progress: bool, console: Any, save_to: str | os.PathLike | None,
            save_every: int) -> FitResult:
    """:meth:`memfit.Trainer.fit` with its arguments checked; ``trainer`` is typed ``Any``, as it imports this."""
    replay, leak = trainer._replay, trainer._leak
    progress = progress and trainer.rank == 0  # one bar for the run, not one per rank
    replay.start(loader, save_to is not None)
    output_hook = leak.start(trainer.model, leak_check)
    bar = ProgressBar(loader, epochs, epoch=trainer.epoch, batch_in_epoch=trainer.batch_in_epoch,
                      budget=trainer.budget, console=console) if progress else None
    start, samples0, retries0, skipped0, nonfinite0 = (time.perf_counter(), trainer.samples_seen, trainer.retries,
                                                       trainer.skipped_steps, trainer.nonfinite_steps)
    steps_run, peak, logged = 0, None, None
    window = LossWindow()  # the logging window's loss, summed on the device
    trained = None  # the last batch trained on (a save records its fingerprint)
    try:
        while trainer.epoch < epochs:
            if max_steps is not None and trainer.step_count >= max_steps:
                break  # before iter(loader): a shuffling loader would draw from the RNG
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(trainer.epoch)
            for batch in replay.batches(loader, trainer.epoch, trainer.batch_in_epoch):
                if max_steps is not None and trainer.step_count >= max_steps:
                    break
                if leak_check:
                    leak.check(steps_run, trainer.step_count + 1)
                result = trainer.step(batch)
                trained = batch
                trainer.batch_in_epoch += 1
                steps_run += 1
                if result.skip_reason != NONFINITE:
                    window.add(result)  # no device read until logged
                if result.peak is not None:
                    peak = max(peak or 0, result.peak)
                if steps_run % log_every == 0:
                    logged = window.mean()  # the one sync of the window: the loss read from the device
                if bar is not None:
                    bar.advance(result, logged, peak)
                if save_to is not None and save_every and trainer.step_count % save_every == 0:
                    replay.trained(batch)
                    trainer.save(save_to)
            else:
                trainer.epoch += 1
                trainer.batch_in_epoch = 0
                continue
            break  # max_steps
        trainer._guard.settle("the end of fit")  # a rank that stopped after its last step's agreement says so here
        if window.steps:
            logged = window.mean()
        if trained is not None and trainer.batch_in_epoch:
            replay.trained(trained)
        if save_to is not None:
            trainer.save(save_to)
        return FitResult(steps=steps_run, samples=trainer.samples_seen - samples0, loss=logged, peak=peak,
                         retries=trainer.retries - retries0, skipped=trainer.skipped_steps - skipped0,
                         seconds=time.perf_counter() - start, nonfinite=trainer.nonfinite_steps - nonfinite0)
    finally:
        leak.stop()
        if output_hook is not None:
            output_hook.remove()
        if bar is not None:
            bar.close()
