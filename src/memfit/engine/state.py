"""A Trainer's saved state: what it holds, and how it loads, checked before anything changes.

:func:`trainer_state` is everything a killed run needs to resume to the same result.
:func:`check_state` reads everything :meth:`memfit.Trainer.load_state_dict` needs and
says in one line what keeps it from loading (keys, shapes and dtypes of the model,
the optimizer's type, groups and state, the scaler, the scheduler, the config and
precision, the counters, the random state): a load is all or nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from memfit import rng, statefile
from memfit.checkpointing import Checkpointing
from memfit.config import Config
from memfit.errors import MemfitError, UsageError

__all__ = ["trainer_state", "load_trainer_state", "check_state", "qualname", "COUNTERS"]

COUNTERS = ("step", "epoch", "batch_in_epoch", "samples", "retries", "skipped")
"""The counters every saved state has (``nonfinite`` came later: states without it load as 0)."""


def trainer_state(trainer: Any, *, weights: bool = True) -> dict[str, Any]:
    """:meth:`memfit.Trainer.state_dict` (``trainer`` is typed ``Any``: the trainer imports this module);
    ``weights=False`` leaves out the model's and optimizer's state (a sharded save writes them apart)."""
    scaler = trainer._recipe.scaler()
    return {
        **({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()} if weights else {}),
        "optimizer_type": qualname(trainer.optimizer),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "config": dataclasses.asdict(trainer.config),
        "plan": trainer.plan.to_dict() if trainer.plan is not None else None,
        "counters": {
            "step": trainer.step_count, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
            "samples": trainer.samples_seen, "retries": trainer.retries, "skipped": trainer.skipped_steps,
            "nonfinite": trainer.nonfinite_steps,
        },
        "rng": rng.capture(),
        "loader": trainer._replay.state_dict(trainer.batch_in_epoch),
    }


def load_trainer_state(trainer: Any, state: Any, *, weights: bool = True,
                       load_weights: Any = None) -> None:
    """:meth:`memfit.Trainer.load_state_dict`: everything checked first, then everything loaded.

    ``weights=False``: ``state`` lacks the model's and optimizer's state, and ``load_weights()`` loads
    them once the rest is checked (a sharded save, :mod:`memfit.engine.sharded`).
    """
    if isinstance(state, dict) and "format" in state:
        state = statefile.verify(state)
    scaler = trainer._recipe.scaler()
    config = check_state(state, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                         scaler=scaler, config=trainer.config, weights=weights)
    if weights:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    else:
        load_weights()
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.use(config)
    counters = state["counters"]
    trainer.step_count, trainer.epoch = counters["step"], counters["epoch"]
    trainer.batch_in_epoch, trainer.samples_seen = counters["batch_in_epoch"], counters["samples"]
    trainer.retries, trainer.skipped_steps = counters["retries"], counters["skipped"]
    trainer.nonfinite_steps = counters.get("nonfinite", 0)
    rng.restore(state["rng"])
    trainer._replay.load_state_dict(state.get("loader"), state["rng"])


def check_state(state: Any, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                config: Config, weights: bool = True) -> Config:
    """Checks ``state`` (a Trainer's state_dict) against the trainer's parts; returns the saved Config.

    Raises:
        UsageError: one line naming everything that differs; nothing was changed.
    """
    if not isinstance(state, dict):
        raise UsageError(f"load_state_dict takes a dict from trainer.state_dict(), got {type(state).__name__}")
    missing = ({"model", "optimizer"} if weights else set()) | {"config", "counters", "rng"}
    missing -= set(state)
    if missing:
        raise UsageError(f"not a memfit Trainer state_dict: it lacks {sorted(missing)}; "
                         "save one with trainer.save(path) or torch.save(trainer.state_dict(), path)")
    problems = _model_differences(state["model"], model.state_dict()) if weights else []
    saved_type = state.get("optimizer_type")
    if saved_type is not None and saved_type != qualname(optimizer):
        problems.append(f"the saved optimizer is {saved_type}, this one {qualname(optimizer)}")
    elif weights:
        problems += _optimizer_differences(state["optimizer"], optimizer)
    if (state.get("scheduler") is None) != (scheduler is None):
        problems.append("the saved run had " + ("no LR scheduler, this trainer has one" if scheduler is not None
                                                else "an LR scheduler, this trainer none: pass scheduler=..."))
    if scaler is not None and state.get("scaler") is None:
        problems.append("the saved run has no GradScaler state, this trainer (16-mixed) needs one")
    try:
        saved = Config(**state["config"])
    except (TypeError, MemfitError) as exc:
        raise UsageError(f"the saved config is not a memfit Config ({exc})") from None
    for name in ("precision", "offload_activations"):
        was, built = getattr(saved, name), getattr(config, name)
        if was != built:
            problems.append(f"the saved run trained with {name}={was!r}, this Trainer with {built!r}; "
                            f"build the Trainer with {name}={was!r} to resume")
    counters = state["counters"]
    if not isinstance(counters, dict) or any(not isinstance(counters.get(k), int) or counters[k] < 0 for k in COUNTERS):
        problems.append(f"the saved counters are not whole numbers >= 0 for {', '.join(COUNTERS)}")
    if not isinstance(state["rng"], dict) or not isinstance(state["rng"].get("cpu"), torch.Tensor):
        problems.append("the saved random state has no CPU generator state")
    if problems:
        raise UsageError("cannot resume from this state (nothing was changed): " + "; ".join(problems))
    try:
        Checkpointing(saved.checkpoint).select(model)
    except MemfitError as exc:
        raise UsageError(f"the saved config does not fit this model: {exc}") from None
    return saved


def qualname(obj: Any) -> str:
    """The module-qualified name of ``obj``'s type, as saved states record the optimizer's."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _model_differences(saved: Any, own: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``saved`` from loading into a model whose state_dict is ``own``, one phrase each."""
    if not isinstance(saved, dict):
        return [f"the saved model state is a {type(saved).__name__}, not a state_dict"]
    problems = []
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing:
        problems.append(f"the saved model lacks {_few(missing)}")
    if unexpected:
        problems.append(f"the saved model has {_few(unexpected)}, which this model does not")
    shapes = []
    for key, tensor in own.items():
        value = saved.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            shapes.append(f"{key} is not a tensor in the file ({type(value).__name__})")
        elif value.shape != tensor.shape:
            shapes.append(f"{key} has shape {tuple(value.shape)} in the file, {tuple(tensor.shape)} here")
        elif value.dtype != tensor.dtype:
            shapes.append(f"{key} is {value.dtype} in the file, {tensor.dtype} here")
    return problems + shapes[:4] + ([f"and {len(shapes) - 4} more tensors differ"] if len(shapes) > 4 else [])


def _optimizer_differences(saved: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    """What keeps ``saved`` (an optimizer state_dict) from loading into ``optimizer``, one phrase each."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or "state" not in saved:
        return ["the saved optimizer state is not an optimizer state_dict"]
    groups, own = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(own):
        return [f"the saved optimizer has {len(groups)} parameter groups, this one {len(own)}"]
    problems = [f"parameter group {i} has {len(g['params'])} parameters in the file, {len(o['params'])} here"
                for i, (g, o) in enumerate(zip(groups, own)) if len(g.get("params", ())) != len(o["params"])]
    if problems:
        return problems
    params = {pid: p for g, o in zip(groups, own) for pid, p in zip(g["params"], o["params"])}
    for pid, state in saved["state"].items():
        p = params.get(pid)
        if p is None:
            problems.append(f"the saved optimizer has state for parameter {pid}, which its groups do not list")
            continue
        for key, value in state.items():
            # Per-parameter state (momentum, moments) has the parameter's shape.
            if isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.dim() and value.shape != p.shape:
                problems.append(f"its {key} for parameter {pid} has shape {tuple(value.shape)}, the parameter "
                                f"{tuple(p.shape)}")
    return problems[:4]
