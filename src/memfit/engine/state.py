"""A Trainer's saved state: what it holds, and how it loads, checked before anything changes.

:func:`trainer_state` is everything a killed run needs to resume to the same result.
:func:`check_state` reads everything :meth:`memfit.Trainer.load_state_dict` needs and
says in one line what keeps it from loading (keys, shapes and dtypes of the model,
the optimizer's type, groups and state, the scaler, the scheduler, the config and
precision, the counters, every random generator's state, the loader's position): a
load is all or nothing. What no check foresaw and fails while loading puts back
what was loaded before it (see :func:`load_trainer_state`).

A load resumes the saved run's micro-batch and checkpointed modules (what its plan
and its out-of-memory re-plans found to fit); the rest of the config is the loading
Trainer's, as it was built (see :func:`resumed_config`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from memfit import rng, statefile
from memfit.checkpointing import Checkpointing
from memfit.config import Config
from memfit.errors import MemfitError, UsageError

__all__ = ["trainer_state", "load_trainer_state", "check_state", "resumed_config", "qualname", "COUNTERS"]

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

    Raises:
        UsageError: what keeps ``state`` from loading (nothing was changed); or, for a failure no
            check foresaw, what failed: the scaler, scheduler, config, counters and optimizer were
            put back, and the message says whether the model's weights may be partly loaded.
    """
    if isinstance(state, dict) and "format" in state:
        state = statefile.verify(state)
    scaler = trainer._recipe.scaler()
    saved = check_state(state, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                        scaler=scaler, config=trainer.config, weights=weights)
    config = resumed_config(saved, trainer.config)
    # What is put back if a load fails midway: small, except the optimizer's state (references, not copies:
    # loading another state replaces its tensors, it does not write into them).
    before = {
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()) if trainer.scheduler is not None else None,
        "config": trainer.config,
        "counters": (trainer.step_count, trainer.epoch, trainer.batch_in_epoch, trainer.samples_seen,
                     trainer.retries, trainer.skipped_steps, trainer.nonfinite_steps),
        "optimizer": trainer.optimizer.state_dict() if weights else None,
    }
    part = "the GradScaler"
    try:
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        part = "the LR scheduler"
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        part = "the config"
        trainer.use(config)
        counters = state["counters"]
        trainer.step_count, trainer.epoch = counters["step"], counters["epoch"]
        trainer.batch_in_epoch, trainer.samples_seen = counters["batch_in_epoch"], counters["samples"]
        trainer.retries, trainer.skipped_steps = counters["retries"], counters["skipped"]
        trainer.nonfinite_steps = counters.get("nonfinite", 0)
        # The weights last of what can be put back: the largest part, and the one that cannot be (the model is
        # written in place; each way its load can fail, keys, shapes and dtypes, was checked).
        if weights:
            part = "the optimizer"
            trainer.optimizer.load_state_dict(state["optimizer"])
            part = "the model"
            trainer.model.load_state_dict(state["model"])
        else:
            part = "the model and optimizer"
            load_weights()
    except Exception as exc:
        _put_back(trainer, scaler, before, part)
        if isinstance(exc, MemfitError):
            raise
        weights_note = ("the model's weights may be partly loaded: load a good save again" if part.startswith(
            "the model") else "the model's weights were not touched")
        raise UsageError(f"cannot resume from this state: {part} failed to load ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}) though every check passed; "
                         f"what was loaded before it was put back, {weights_note}") from exc
    # Checked by rng.problems: these cannot fail, and change nothing a failed load would have to put back.
    rng.restore(state["rng"])
    trainer._replay.load_state_dict(state.get("loader"), state["rng"])


def _put_back(trainer: Any, scaler: Any, before: dict[str, Any], part: str) -> None:
    """Undo a load that failed at ``part``: the scaler, scheduler, config, counters and optimizer as ``before``."""
    if scaler is not None:
        scaler.load_state_dict(before["scaler"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(before["scheduler"])
    trainer.use(before["config"])
    (trainer.step_count, trainer.epoch, trainer.batch_in_epoch, trainer.samples_seen, trainer.retries,
     trainer.skipped_steps, trainer.nonfinite_steps) = before["counters"]
    if before["optimizer"] is not None and part in ("the optimizer", "the model"):
        trainer.optimizer.load_state_dict(before["optimizer"])


def resumed_config(saved: Config, built: Config) -> Config:
    """The config a Trainer built with ``built`` runs after loading a state saved with ``saved``.

    The saved run's micro-batch and checkpointed modules: what its plan, and its out-of-memory
    re-plans, found to fit (a resumed run does not run out of memory again to find them). The
    rest is the loading Trainer's, as it was built: its strategy (``"single"``, ``"ddp"``,
    ``"fsdp"``) and their settings, the optimizer's implementation and when gradients are
    released are how its model, wrapper and optimizer were made, so a DDP save resumed under
    FSDP reports and runs FSDP. Precision and activation offload are the same in both
    (:func:`check_state` refuses a state saved with others).
    """
    return dataclasses.replace(built, micro_batch=saved.micro_batch, checkpoint=saved.checkpoint)


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
    if scheduler is not None and state.get("scheduler") is not None and not isinstance(state["scheduler"], dict):
        problems.append(f"the saved LR scheduler state is a {type(state['scheduler']).__name__}, not a state_dict")
    if scaler is not None and state.get("scaler") is not None:
        problems += _scaler_differences(state["scaler"], scaler.state_dict())
    counters = state["counters"]
    if not isinstance(counters, dict) or any(not isinstance(counters.get(k), int) or counters[k] < 0 for k in COUNTERS):
        problems.append(f"the saved counters are not whole numbers >= 0 for {', '.join(COUNTERS)}")
    elif not isinstance(counters.get("nonfinite", 0), int) or counters.get("nonfinite", 0) < 0:
        problems.append(f"the saved counter nonfinite is not a whole number >= 0, got {counters['nonfinite']!r}")
    problems += rng.problems(state["rng"])
    problems += _loader_differences(state.get("loader"))
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


def _scaler_differences(saved: Any, own: dict[str, Any]) -> list[str]:
    """What keeps ``saved`` from loading into a GradScaler whose state_dict is ``own``."""
    if not isinstance(saved, dict):
        return [f"the saved GradScaler state is a {type(saved).__name__}, not a state_dict"]
    bad = [k for k in own if isinstance(saved.get(k), bool) or not isinstance(saved.get(k), (int, float))]
    return [f"the saved GradScaler state lacks numbers for {', '.join(bad)}"] if bad else []


def _loader_differences(saved: Any) -> list[str]:
    """What keeps ``saved`` (where fit was in the loader's epoch, :mod:`memfit.engine.resume`) from loading."""
    if saved is None:  # a state from before loaders were recorded
        return []
    if not isinstance(saved, dict) or not {"epoch_start", "generators", "last_batch"} <= set(saved):
        return ["the saved loader position is not a dict with epoch_start, generators and last_batch"]
    problems = rng.generator_problems(saved["generators"], "the saved loader's generator")
    start = saved["epoch_start"]
    if start is not None:
        if not isinstance(start, dict) or "rng" not in start or "generators" not in start:
            problems.append("the saved epoch start is not a dict with rng and generators")
        else:
            problems += rng.problems(start["rng"], "the saved epoch start's random state")
            problems += rng.generator_problems(start["generators"], "the saved epoch start's loader generator")
    if saved["last_batch"] is not None and not isinstance(saved["last_batch"], str):
        problems.append(f"the saved last batch's fingerprint is a {type(saved['last_batch']).__name__}, not a str")
    return problems


def _optimizer_differences(saved: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    """What keeps ``saved`` (an optimizer state_dict) from loading into ``optimizer``, one phrase each."""
    if (not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list)
            or not all(isinstance(g, dict) for g in saved["param_groups"]) or not isinstance(saved.get("state"), dict)
            or not all(isinstance(v, dict) for v in saved["state"].values())):
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
