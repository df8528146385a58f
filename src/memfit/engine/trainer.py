"""Trainer: train under a plan with exact gradient accumulation and an out-of-memory guard.

``trainer.step(batch)`` takes one logical batch (the user's effective batch) and
trains on it in the plan's micro-batches with the large batch's math
(:mod:`memfit.engine.step`), under the out-of-memory guard that re-plans and redoes
the batch, and undoes any failed attempt (:mod:`memfit.engine.guard`).
``trainer.fit(loader)`` loops over batches and epochs with a progress bar, a leak
check (:mod:`memfit.engine.leak`) and checkpoints that resume bit for bit
(:mod:`memfit.engine.resume`, :mod:`memfit.engine.state`).

Memory hygiene, as the seed articles ask but done right: the loss is read from
the device once per logged window; ``torch.cuda.empty_cache()`` runs only after an
out-of-memory error (calling it every step only slows training: the freed blocks
are allocated again at once, see the README's measurement).

Known limitations: see the guard's (an OOM inside ``optimizer.step()`` after an
in-place write; BatchNorm statistics and dropout masks are per micro-batch) and
the leak check's (byte signals need CUDA or a simulated budget).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memfit import statefile
from memfit.budget import SimulatedBudget
from memfit.checkpointing import Checkpointing
from memfit.checks import positive_int
from memfit.config import Config
from memfit.device import resolve_device
from memfit.engine.guard import OOMGuard
from memfit.engine.leak import LeakCheck
from memfit.engine.loop import run_fit
from memfit.engine.probe import Probe
from memfit.engine.results import FitResult, StepResult
from memfit.engine.resume import LoaderReplay
from memfit.engine.state import load_trainer_state, trainer_state
from memfit.engine.step import NONFINITE, TrainStep
from memfit.errors import UsageError
from memfit.host import check_fits
from memfit.planner import Plan
from memfit.strategies import Precision, Recipe
from memfit.units import format_budget, parse_bytes
from memfit.workload import Workload, batch_size_of, build_model

__all__ = ["Trainer"]

_ON_NONFINITE = ("skip", "raise")


class Trainer:
    """Trains a workload under a plan or a config; see the module docstring for the math and the guard.

    Args:
        workload: the model, loss and optimizer factories (``workload.batch`` is not used:
            batches come from the caller).
        plan_or_config: a :class:`memfit.Plan` (its config, and its alternatives for
            re-planning after an OOM) or a :class:`memfit.Config`.
        device: where to train; by default CUDA when available, else CPU.
        budget: bytes or "2GiB". On CPU, training runs under :func:`memfit.simulate_budget`
            of this size; on CUDA it is the figure peaks are shown against (default:
            the plan's budget, else the device's memory).
        max_retries: re-plans per logical batch before giving up.
        scheduler: a factory ``optimizer -> LR scheduler`` (the optimizer is built inside),
            stepped after each optimizer step that ran (not after a skipped one).
        clip_grad_norm: clip the gradients' total norm to this (after unscaling).
        on_nonfinite: a NaN or inf loss: ``"skip"`` the update, leave the model as it was,
            count it and warn once (default), or ``"raise"`` :class:`memfit.NonFiniteLoss`
            after undoing the step. Checking reads the loss from the device: one sync a step.

    Example:
        >>> trainer = Trainer(memfit.presets.load("cifar-cnn"), Config(micro_batch=32))
        >>> result = trainer.step(batch_of_128)   # four micro-batches of 32, one optimizer step
        >>> result.loss, result.micro_batches
    """

    def __init__(
        self,
        workload: Workload,
        plan_or_config: Plan | Config,
        *,
        device: torch.device | str | None = None,
        budget: int | str | None = None,
        max_retries: int = 8,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        clip_grad_norm: float | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        if not isinstance(workload, Workload):
            raise UsageError(f"Trainer() takes a memfit.Workload, got {type(workload).__name__}; "
                             "for a model and optimizer you built, use Trainer.from_parts(model, optimizer, loss, config)")
        plan, config = _plan_and_config(plan_or_config)
        device = resolve_device(device)
        if scheduler is not None and not callable(scheduler):
            raise UsageError(f"Trainer(scheduler=...) takes a factory optimizer -> LR scheduler, such as "
                             f"lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000); got {scheduler!r}")
        model = build_model(workload)
        # Cast before the optimizer exists, so its state is created in the model's dtype.
        model = _cast(model.to(device), config.precision)
        optimizer = workload.optimizer(model.parameters()) if workload.optimizer is not None else None
        if optimizer is None:
            raise UsageError(f"the workload {workload.name!r} has no optimizer factory; training needs one")
        self._setup(model, optimizer, workload.loss, plan, config, device, budget, max_retries,
                    scheduler(optimizer) if callable(scheduler) else scheduler, clip_grad_norm, on_nonfinite)
        self._workload = workload

    @classmethod
    def from_parts(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: Callable[[nn.Module, Any], Any],
        plan_or_config: Plan | Config,
        *,
        device: torch.device | str | None = None,
        budget: int | str | None = None,
        max_retries: int = 8,
        scheduler: Any = None,
        clip_grad_norm: float | None = None,
        on_nonfinite: str = "skip",
    ) -> Trainer:
        """A Trainer over a model and optimizer you built. ``loss(model, batch)`` returns a mean or ``(loss_sum, n_items)``.

        The model is moved to ``device`` (by default the model's own) and, for
        ``*-true`` precisions, cast in place: parameters keep their identity, so
        the optimizer stays valid (cast before the optimizer has state).
        """
        _check_parts(model, optimizer, loss)
        plan, config = _plan_and_config(plan_or_config)
        _check_optimizer_owns(model, optimizer)
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
        device = resolve_device(device)
        _check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget)
        self = cls.__new__(cls)
        self._setup(_cast(model.to(device), config.precision), optimizer, loss, plan, config, device, budget,
                    max_retries, scheduler, clip_grad_norm, on_nonfinite)
        return self

    def _setup(self, model, optimizer, loss, plan, config, device, budget, max_retries, scheduler, clip_grad_norm,
               on_nonfinite) -> None:
        # Every argument is checked before the model is touched (checkpoint wrappers below).
        _check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget)
        if config.optimizer_in_backward:
            # An update inside backward cannot be undone if a later parameter's backward runs out of
            # memory: the Trainer's promise (a failed step leaves the model as it was) would break.
            raise UsageError("the Trainer does not run optimizer_in_backward: an out-of-memory error mid-backward "
                             "would leave some parameters updated; estimate and plan with it, train with "
                             "Config(optimizer_in_backward=False)")
        if budget is not None and device.type == "cpu":
            _check_host_holds(parse_bytes(budget))
        self.model = model
        self.optimizer = optimizer
        self.plan = plan
        self.device = device
        self.max_retries = max_retries
        self._workload: Workload | None = None  # set by __init__: lets an OOM report come from an estimate
        self._recipe = Recipe(config, device.type)  # autocast, offload, GradScaler, the optimizer's implementation
        self._recipe.tune_optimizer(optimizer)
        self._checkpointed = Checkpointing(config.checkpoint).apply(model)
        self._config = config
        self._required = plan.required if plan is not None else None  # predicted bytes of the config in use
        self.model.train()

        if budget is None and plan is not None and device.type == "cuda":
            budget = plan.budget
        self.budget = parse_bytes(budget) if budget is not None else None
        # On CPU a budget is simulated: one tracker for the whole run, so that it sees
        # every storage a step leaves alive (the leak check reads it).
        self._sim = SimulatedBudget(self.budget, model, optimizer, device=device) if (
            self.budget is not None and device.type == "cpu") else None
        self._probe = Probe(device, self._sim, model, optimizer)
        self._leak = LeakCheck(self._probe)
        self._attempt = TrainStep(model, optimizer, loss, self._recipe, device, self._probe, self._leak,
                                  scheduler=scheduler, clip_grad_norm=clip_grad_norm, on_nonfinite=on_nonfinite)
        self._guard = OOMGuard(self)
        self._replay = LoaderReplay()

        self.step_count = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.retries = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0

    # ------------------------------------------------------------------ public

    @property
    def config(self) -> Config:
        """The configuration in use (after any re-plan)."""
        return self._config

    # What each step reads: kept by the step itself, changeable between steps.

    @property
    def scheduler(self) -> Any:
        """The LR scheduler stepped after each optimizer step that ran, or None."""
        return self._attempt.scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        self._attempt.scheduler = value

    @property
    def clip_grad_norm(self) -> float | None:
        """The gradients' total norm is clipped to this before each update (None: no clipping)."""
        return self._attempt.clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value: float | None) -> None:
        self._attempt.clip_grad_norm = value

    @property
    def on_nonfinite(self) -> str:
        """``"skip"`` or ``"raise"``: what a NaN or inf loss does."""
        return self._attempt.on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        self._attempt.on_nonfinite = value

    def step(self, batch: Any) -> StepResult:
        """Train on one logical batch; see the module docstring. Returns a :class:`StepResult`.

        ``batch``: any nesting of tuples, lists and dicts (a tokenizer's output too) of
        tensors with the batch on dimension 0; each micro-batch gets a slice of every
        such tensor. Scalars and non-tensor leaves are passed whole to every micro-batch.

        A step is atomic: if anything raises before ``optimizer.step()`` has written
        (an error in the loss, Ctrl-C), the gradients, BatchNorm statistics, random
        generators and counters are put back as they were before the exception propagates.

        Raises:
            memfit.OutOfMemory: micro-batch 1 ran out, or ``max_retries`` re-plans did not fit.
            memfit.NonFiniteLoss: the loss was NaN or inf and ``on_nonfinite="raise"``.
        """
        n = batch_size_of(batch)
        if n == 0:
            raise UsageError("trainer.step() got an empty batch (0 samples); skip empty batches in your loader")
        return self._guard.run(batch, n)

    def fit(
        self,
        loader: Iterable[Any],
        epochs: int = 1,
        *,
        log_every: int = 10,
        max_steps: int | None = None,
        leak_check: bool = True,
        progress: bool = True,
        console: Any = None,
        save_to: str | os.PathLike | None = None,
        save_every: int = 0,
    ) -> FitResult:
        """Train over ``loader`` (an iterable of logical batches) for ``epochs``.

        Shows a rich progress bar (samples/s, loss, peak memory against the
        budget) unless ``progress=False``; the loss is read from the device every
        ``log_every`` steps only. ``max_steps`` stops early (the trainer's total
        step count). A sampler with ``set_epoch`` gets the epoch before each one.

        With ``save_to``, the trainer's state is written there every ``save_every``
        steps (if > 0) and when fit ends (:meth:`save`: atomic, with a checksum).
        After :meth:`load` (or :meth:`load_state_dict`), ``fit`` resumes where the
        saved run stopped, bit for bit on CPU: it replays the interrupted epoch's
        start (every random generator, and the loader's own ``torch.Generator``,
        as they were before ``iter(loader)``), skips the batches already trained on,
        checks that the last of them is the batch the saved run trained on last
        (:class:`memfit.ResumeWarning` if not), and puts every generator back as it
        was at the save. What cannot be replayed (a one-shot iterator, workers that
        keep their own random state across epochs) is warned about when fit starts.
        """
        positive_int(epochs, "epochs", noun="whole number")
        positive_int(log_every, "log_every", noun="whole number")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise UsageError(f"max_steps must be a whole number >= 0 or None, got {max_steps!r}")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise UsageError(f"save_every must be a whole number of steps >= 0, got {save_every!r}")
        if save_every and save_to is None:
            raise UsageError(f"save_every={save_every} needs save_to=PATH, the file to write the state to")
        return run_fit(self, loader, epochs, log_every=log_every, max_steps=max_steps, leak_check=leak_check,
                       progress=progress, console=console, save_to=save_to, save_every=save_every)

    def state_dict(self) -> dict[str, Any]:
        """Everything a killed run needs to resume to the same result: model, optimizer, scaler,
        scheduler, the config in use (after re-plans), counters, every random generator's state,
        and (after :meth:`fit`) where the loader's epoch began."""
        return trainer_state(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path``: atomically (a run killed while saving keeps the previous
        file) and with a checksum of its content, which :meth:`load` verifies."""
        statefile.write(self.state_dict(), path)

    def load(self, path: str | os.PathLike, *, weights_only: bool = True) -> None:
        """Resume from a file :meth:`save` wrote: verified (a truncated or damaged file is refused,
        naming it), then :meth:`load_state_dict`. ``weights_only=True`` runs no pickled code."""
        self.load_state_dict(statefile.read(path, weights_only=weights_only))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (after building the Trainer the same way).

        Everything is checked before anything changes: keys, shapes and dtypes of the
        model, the optimizer's type, groups and state, the scaler, the scheduler,
        the config and precision. What differs is said in one line, and the trainer is
        left as it was. The content of a file :meth:`save` wrote (``torch.load(path)``)
        is accepted too, its checksum verified.
        """
        load_trainer_state(self, state)

    # ------------------------------------------------------------------ for the guard

    def _count(self, n: int, result: StepResult | None) -> None:
        """A step of ``n`` samples is done (``result`` None: committed, then failed)."""
        self.step_count += 1
        self.samples_seen += n
        if result is not None and result.skipped:
            self.skipped_steps += 1
            self.nonfinite_steps += result.skip_reason == NONFINITE

    def _use(self, config: Config) -> None:
        """Switch to ``config``: another micro-batch or checkpoint set (precision and offload stay as built)."""
        if config.checkpoint != self._config.checkpoint:
            Checkpointing.remove(self.model, self._checkpointed)
            self._checkpointed = Checkpointing(config.checkpoint).apply(self.model)
        self._config = config


def _check_parts(model: Any, optimizer: Any, loss: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"Trainer.from_parts: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"Trainer.from_parts: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss):
        raise UsageError(f"Trainer.from_parts: loss must be a function (model, batch) -> loss, got {type(loss).__name__}")


def _check_host_holds(budget: int) -> None:
    # A simulated device is real host memory: it must not promise more than the machine has.
    check_fits(budget, f"a Trainer on the CPU with a simulated budget of {format_budget(budget)}",
               "give a budget this machine can hold")


def _check_options(max_retries: Any, clip_grad_norm: Any, scheduler: Any, on_nonfinite: Any, budget: Any) -> None:
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


def _check_optimizer_owns(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be one of the model's (the same object)."""
    own = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in params)
    if foreign:
        raise UsageError(f"Trainer.from_parts: {foreign} of the optimizer's {len(params)} parameters are not the "
                         "model's; build the optimizer on this model's parameters, e.g. "
                         "torch.optim.AdamW(model.parameters())")


def _plan_and_config(plan_or_config: Any) -> tuple[Plan | None, Config]:
    if isinstance(plan_or_config, Plan):
        return plan_or_config, plan_or_config.config
    if isinstance(plan_or_config, Config):
        return None, plan_or_config
    raise UsageError(f"plan_or_config must be a memfit.Plan (from memfit.plan) or a memfit.Config, "
                     f"got {type(plan_or_config).__name__}; e.g. memfit.Config(micro_batch=32)")


def _cast(model: nn.Module, precision: str) -> nn.Module:
    """``*-true``: cast in place; ``Module.to`` keeps each Parameter object, so an optimizer built on them stays valid.

    (``Precision.apply`` replaces the parameters instead, which fake tensors need and a built optimizer cannot follow.)
    """
    p = Precision(precision)
    return model.to(dtype=p.dtype) if not p.mixed and p.dtype != torch.float32 else model
