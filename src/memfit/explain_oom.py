"""explain_oom(): around a user's own training loop, an out-of-memory error becomes an explanation of what was live.

The loop is not changed: memfit's tracker watches it (every storage, its category, the module
and the model's line that made it) and, where the loop runs out of memory (CUDA's
``torch.OutOfMemoryError``, or the simulated device of ``simulate=``), the error is raised again
as :class:`memfit.OutOfMemory` whose :attr:`~memfit.OutOfMemory.explanation` is
:func:`memfit.explain` of the moment of failure: the live bytes by category, the largest tensors
and their lines, the seed's causes, and, given the workload and the Config the loop runs,
fixes each verified by an estimate. On CUDA the caching allocator's own history is recorded
while the block runs and written as a snapshot beside it (``snapshot=``; open it at
https://pytorch.org/memory_viz).

Known limitations: the tracker costs time (a Python call per op: see
``benchmarks/tracker_overhead.py``); tensors made before the block count from the block's start
as the tracker finds them (the model's, the optimizer's), others not at all; the CUDA snapshot
needs a CUDA build of torch and was not exercised on this project's CPU machines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memfit import _torch_private
from memfit.budget import SimulatedBudget
from memfit.config import Config
from memfit.errors import OutOfMemory, UsageError, user_frame
from memfit.explain import explain
from memfit.report import build_report
from memfit.tracker import MemoryTracker
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Workload

__all__ = ["explain_oom"]


@contextlib.contextmanager
def explain_oom(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    simulate: int | str | None = None,
    budget: int | str | None = None,
    workload: Workload | None = None,
    config: Config | None = None,
    snapshot: str | os.PathLike | None = "memfit-oom.pickle",
    device: torch.device | str | None = None,
) -> Iterator[MemoryTracker]:
    """Run the block under memfit's tracker; an out-of-memory error in it is raised as :class:`memfit.OutOfMemory`
    with the explanation of what was live.

    Args:
        model, optimizer: whose parameters, gradients and state take their roles (as for :func:`memfit.track`).
        simulate: run on a simulated device of this many bytes ("30KiB"; :func:`memfit.simulate_budget`), to see
            the explanation without a GPU.
        budget: the device memory the explanation's fixes must fit (default: ``simulate``, else the CUDA
            device's total memory).
        workload, config: the step's factories and the Config the loop runs, for fixes verified by estimates.
        snapshot: on CUDA, where the allocator's snapshot is written when memory runs out (None: no record).
        device: the device counted (default: the model's).

    Example:
        >>> with memfit.explain_oom(model, optimizer, simulate="2MiB"):
        ...     for x, y in loader:
        ...         loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        memfit.OutOfMemory: ... err.explanation.table() has the rest
    """
    if (workload is None) != (config is None):
        raise UsageError("explain_oom(workload=..., config=...): give both (the step's factories and the Config the "
                         "loop runs) to have fixes estimated, or neither")
    if budget is not None:
        budget = parse_bytes(budget)
    tracker = (SimulatedBudget(simulate, model, optimizer, device=device, sources=True) if simulate is not None
               else MemoryTracker(model, optimizer, device=device, sources=True))
    if budget is None and simulate is not None:
        budget = tracker.budget
    on_cuda = tracker.device.type == "cuda"
    if budget is None and on_cuda:
        budget = torch.cuda.get_device_properties(tracker.device).total_memory
    recording = snapshot is not None and on_cuda and _torch_private.record_memory_history(True)
    try:
        with tracker:
            yield tracker
    except torch.OutOfMemoryError as exc:
        if isinstance(exc, OutOfMemory):
            raise
        written = recording and _torch_private.dump_memory_snapshot(os.fspath(snapshot))
        raise _explained(exc, tracker, budget, workload, config, snapshot if written else None) from exc
    finally:
        if recording:
            _torch_private.record_memory_history(False)


def _explained(exc: BaseException, tracker: MemoryTracker, budget: int | None, workload: Workload | None,
               config: Config | None, snapshot: Any) -> OutOfMemory:
    """The OutOfMemory for ``exc``: its report is the moment of failure (what was live), explained."""
    history = tracker.history().detached()
    live = sum(history.live_cat)
    at_failure = history._replace(peak=live, peak_event=len(history.events), peak_op=len(history.ops))
    report = build_report(**at_failure._asdict())
    why = explain(report, config, budget, workload=workload, device=tracker.device.type, fixes=False)
    shares = ", ".join(f"{name} {format_bytes(n)}" for name, n in sorted(why.at_peak.items(), key=lambda kv: -kv[1])
                       if n)[:300]
    largest = why.largest[0] if why.largest else None
    message = (f"out of memory in a block under memfit.explain_oom{user_frame(exc)} "
               f"({' '.join(str(exc).split())[:300]}). "
               f"{format_bytes(live)} was live: {shares}.")
    if largest is not None:
        message += (f" The largest: {format_bytes(largest.bytes)}" + (f" x {largest.count}" if largest.count > 1 else "")
                    + f" of {largest.category} from {largest.op or '-'} in {largest.module or '<outside the model>'}"
                    + (f" ({largest.source[0]})" if largest.source else "") + ".")
    if snapshot is not None:
        message += f" The allocator's history is in {os.fspath(snapshot)} (open it at https://pytorch.org/memory_viz)."
    message += " err.explanation.table() has the rest."
    error = OutOfMemory(message, micro_batch=config.micro_batch if config is not None else 0, retries=0,
                        report=report)
    error.snapshot = os.fspath(snapshot) if snapshot is not None else None
    if workload is None:
        error.explain_with(lambda: why)
    else:  # fixes need estimates: made when the explanation is first read
        error.explain_with(lambda: explain(report, config, budget, workload=workload, device=tracker.device.type))
    return error
