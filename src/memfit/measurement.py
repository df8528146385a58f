"""measure(): real training steps under a tracker, and the report of what they held.

On the CPU, real steps take real memory: the step is estimated first (fake tensors, no
memory) and refused with what it would need if the machine cannot hold it.
"""

from __future__ import annotations

import dataclasses

import torch

from memfit.checks import positive_int
from memfit.config import MAX_STEPS, Config
from memfit.device import resolve_device
from memfit.errors import UsageError
from memfit.estimator import DataDependentStep, estimate
from memfit.host import check_fits
from memfit.report import MemoryReport
from memfit.step import run_steps
from memfit.strategies import Recipe
from memfit.tracker import track
from memfit.workload import Workload, build_model

__all__ = ["measure"]


def measure(
    workload: Workload,
    micro_batch: int | None = None,
    steps: int = 2,
    device: torch.device | str = "cpu",
    *,
    config: Config | None = None,
) -> MemoryReport:
    """Run ``steps`` real training steps under a tracker; return the report.

    Give either ``micro_batch`` (a plain fp32 step) or ``config`` (micro-batch,
    precision, checkpointing, offload: the same terms as :func:`memfit.estimate`,
    so estimate and measurement compare like for like).

    Each step is: build a batch, forward and loss (under autocast for ``*-mixed``),
    backward (through a GradScaler for ``16-mixed``), ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``. The model is built and prepared before
    tracking starts and counted from the start. Two steps by default, because
    optimizers create their state lazily in the first step: the second shows the
    steady state.
    """
    if not isinstance(workload, Workload):
        raise UsageError(f"measure() takes a memfit.Workload, got {type(workload).__name__}")
    config = _resolve_config(micro_batch, config)
    positive_int(steps, "steps")
    if steps > MAX_STEPS:
        raise UsageError(f"steps must be at most {MAX_STEPS}, got {steps}: the second step shows the steady state")
    device = resolve_device(device)
    if device.type == "cpu":
        # Real steps on the CPU take real memory: check what they need first (fake tensors, no memory).
        try:
            needed = estimate(workload, config, steps=min(steps, 2), device="cpu").peak
        except DataDependentStep:
            needed = None  # a step that reads tensor values cannot be estimated: measuring it is the way
        if needed is not None:
            check_fits(needed, f"measuring {workload.name} at micro-batch {config.micro_batch} on the CPU",
                       "estimate it instead (memfit.estimate / memfit estimate), or give a smaller micro-batch")
    recipe = Recipe(config, device.type)
    model = build_model(workload)
    model = recipe.apply(model.to(device))
    model.train()
    optimizer = recipe.build_optimizer(workload.optimizer, model)
    with track(model, optimizer, device=device) as tracker:
        run_steps(workload, model, optimizer, config.micro_batch, steps, tracker=tracker, device=device, recipe=recipe)
    report = tracker.report()
    return dataclasses.replace(report, extra={"workload": workload.name, "micro_batch": config.micro_batch, "precision": config.precision})


def _resolve_config(micro_batch: int | None, config: Config | None) -> Config:
    if config is not None:
        if not isinstance(config, Config):
            raise UsageError(f"config must be a memfit.Config, got {type(config).__name__}")
        if micro_batch is not None and micro_batch != config.micro_batch:
            raise UsageError(
                f"micro_batch={micro_batch!r} disagrees with config.micro_batch={config.micro_batch}; give one of them"
            )
        return config
    if micro_batch is None:
        raise UsageError("give micro_batch=N or config=memfit.Config(micro_batch=N, ...)")
    positive_int(micro_batch, "micro_batch")
    return Config(micro_batch=micro_batch)
