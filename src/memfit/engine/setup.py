"""How a Trainer is put together: its arguments checked, the model cast and wrapped, its parts made.

Apart from :mod:`memfit.engine.trainer` so that the class reads as what a user calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memfit.budget import SimulatedBudget
from memfit.checkpointing import Checkpointing
from memfit.config import Config
from memfit.engine.comm import Comm
from memfit.engine.guard import OOMGuard
from memfit.engine.leak import LeakCheck
from memfit.engine.probe import Probe
from memfit.engine.resume import LoaderReplay
from memfit.engine.step import TrainStep
from memfit.errors import UsageError
from memfit.host import check_fits
from memfit.planner import Plan
from memfit.sharding import Sharding
from memfit.strategies import Precision, Recipe
from memfit.units import format_budget, parse_bytes
from memfit.workload import Workload

__all__ = ["assemble", "check_parts", "check_options", "check_optimizer_owns", "plan_and_config", "cast"]

_ON_NONFINITE = ("skip", "raise")


def assemble(t: Any, model, optimizer, loss, plan, config, device, budget, max_retries, scheduler, clip_grad_norm,
             on_nonfinite, *, comm: Comm, sharding: Sharding, wrapped: nn.Module) -> None:
    """Puts a Trainer's parts together on ``t``: the model (``wrapped`` for the strategy), its step, guard and probe."""
    # Every argument is checked before the model is touched (checkpoint wrappers below).
    check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget, 1.0)
    if config.optimizer_in_backward:
        # An update inside backward cannot be undone if a later parameter's backward runs out of
        # memory: the Trainer's promise (a failed step leaves the model as it was) would break.
        raise UsageError("the Trainer does not run optimizer_in_backward: an out-of-memory error mid-backward "
                         "would leave some parameters updated; estimate and plan with it, train with "
                         "Config(optimizer_in_backward=False)")
    if budget is not None and device.type == "cpu":
        check_host_holds(parse_bytes(budget))
    t.model = model
    t.optimizer = optimizer
    t.plan = plan
    t.device = device
    t.max_retries = max_retries
    t._workload: Workload | None = None  # set by __init__: lets an OOM report come from an estimate
    t._recipe = Recipe(config, device.type)  # autocast, offload, GradScaler, the optimizer's implementation
    t._recipe.tune_optimizer(optimizer)
    t._checkpointed = Checkpointing(config.checkpoint).apply(model)
    t._config = config
    t._required = plan.required if plan is not None else None  # predicted bytes of the config in use
    t.model.train()

    if budget is None and plan is not None and device.type == "cuda":
        budget = plan.budget
    t.budget = parse_bytes(budget) if budget is not None else None
    # On CPU a budget is simulated: one tracker for the whole run, so that it sees
    # every storage a step leaves alive (the leak check reads it).
    t._sim = SimulatedBudget(t.budget, model, optimizer, device=device) if (
        t.budget is not None and device.type == "cpu") else None
    t._probe = Probe(device, t._sim, model, optimizer)
    t._leak = LeakCheck(t._probe)
    t._sharding = sharding
    t._attempt = TrainStep(wrapped, optimizer, loss, t._recipe, device, t._probe, t._leak,
                              scheduler=scheduler, clip_grad_norm=clip_grad_norm, on_nonfinite=on_nonfinite,
                              comm=comm)
    t._guard = OOMGuard(t)
    t._replay = LoaderReplay()

    t.step_count = 0
    t.epoch = 0
    t.batch_in_epoch = 0
    t.samples_seen = 0
    t.retries = 0
    t.skipped_steps = 0
    t.nonfinite_steps = 0


def check_parts(model: Any, optimizer: Any, loss: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"Trainer.from_parts: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"Trainer.from_parts: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss):
        raise UsageError(f"Trainer.from_parts: loss must be a function (model, batch) -> loss, got {type(loss).__name__}")


def check_host_holds(budget: int) -> None:
    # A simulated device is real host memory: it must not promise more than the machine has.
    check_fits(budget, f"a Trainer on the CPU with a simulated budget of {format_budget(budget)}",
               "give a budget this machine can hold")


def check_options(max_retries: Any, clip_grad_norm: Any, scheduler: Any, on_nonfinite: Any, budget: Any,
                   timeout: Any) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise UsageError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not clip_grad_norm > 0):
        raise UsageError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if scheduler is not None and not (callable(getattr(scheduler, "step", None))
                                      and callable(getattr(scheduler, "state_dict", None))):
        raise UsageError(f"scheduler must be an LR scheduler (an object with step() and state_dict(), such as "
                         f"torch.optim.lr_scheduler.StepLR(optimizer, 100)), got {scheduler!r}")
    if on_nonfinite not in _ON_NONFINITE:
        raise UsageError(f"on_nonfinite must be one of {', '.join(map(repr, _ON_NONFINITE))}, got {on_nonfinite!r}")
    if budget is not None:
        parse_bytes(budget)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}")


def check_optimizer_owns(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be one of the model's (the same object)."""
    own = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in params)
    if foreign:
        raise UsageError(f"Trainer.from_parts: {foreign} of the optimizer's {len(params)} parameters are not the "
                         "model's; build the optimizer on this model's parameters, e.g. "
                         "torch.optim.AdamW(model.parameters())")


def plan_and_config(plan_or_config: Any) -> tuple[Plan | None, Config]:
    if isinstance(plan_or_config, Plan):
        return plan_or_config, plan_or_config.config
    if isinstance(plan_or_config, Config):
        return None, plan_or_config
    raise UsageError(f"plan_or_config must be a memfit.Plan (from memfit.plan) or a memfit.Config, "
                     f"got {type(plan_or_config).__name__}; e.g. memfit.Config(micro_batch=32)")


def cast(model: nn.Module, precision: str) -> nn.Module:
    """``*-true``: cast in place; ``Module.to`` keeps each Parameter object, so an optimizer built on them stays valid.

    (``Precision.apply`` replaces the parameters instead, which fake tensors need and a built optimizer cannot follow.)
    """
    p = Precision(precision)
    return model.to(dtype=p.dtype) if not p.mixed and p.dtype != torch.float32 else model
