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

from memfit.checkpointing import Checkpointing
from memfit.checks import positive_int
from memfit.config import Config
from memfit.device import resolve_device
from memfit.engine.comm import make_comm
from memfit.engine.loop import run_fit
from memfit.engine.results import FitResult, StepResult
from memfit.engine import sharded
from memfit.engine.setup import assemble, cast, check_optimizer_owns, check_options, check_parts, plan_and_config
from memfit.engine.state import load_trainer_state, trainer_state
from memfit.engine.step import NONFINITE
from memfit.errors import UsageError
from memfit.planner import Plan
from memfit.sharding import Sharding, full_state_dict
from memfit.workload import Workload, batch_size_of, build_model

__all__ = ["Trainer"]

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
        timeout: with ``strategy="ddp"`` or ``"fsdp"``, the seconds a rank waits for the others
            at an agreement (before each collective a step issues, FSDP's included, the update, fit's
            end, a save) before it stops with an error naming where, instead of hanging.

    ``Config(strategy="ddp")`` or ``"fsdp"``: one process per device under torchrun, the model wrapped
    per :mod:`memfit.sharding`; ``step(batch)`` takes this rank's part of the logical batch, the math is
    the whole batch's, and an OOM on any rank is every rank's retry (:mod:`memfit.engine.comm`).

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
        timeout: float = 600.0,
    ) -> None:
        if not isinstance(workload, Workload):
            raise UsageError(f"Trainer() takes a memfit.Workload, got {type(workload).__name__}; "
                             "for a model and optimizer you built, use Trainer.from_parts(model, optimizer, loss, config)")
        plan, config = plan_and_config(plan_or_config)
        device = resolve_device(device)
        if scheduler is not None and not callable(scheduler):
            raise UsageError(f"Trainer(scheduler=...) takes a factory optimizer -> LR scheduler, such as "
                             f"lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000); got {scheduler!r}")
        if workload.optimizer is None:
            raise UsageError(f"the workload {workload.name!r} has no optimizer factory; training needs one")
        check_options(max_retries, clip_grad_norm, None, on_nonfinite, budget, timeout)
        comm = make_comm(config.strategy, timeout)
        model = build_model(workload)
        # Cast before the optimizer exists, so its state is created in the model's dtype; shard before
        # it too: fully_shard replaces the parameters with sharded ones, which the optimizer must hold.
        model = cast(model.to(device), config.precision)
        sharding = Sharding(config, device, agree=lambda where: self._attempt.agree_while_running(where))
        wrapped = sharding.apply(model)
        optimizer = workload.optimizer(wrapped.parameters())
        assemble(self, model, optimizer, workload.loss, plan, config, device, budget, max_retries,
                    scheduler(optimizer) if callable(scheduler) else scheduler, clip_grad_norm, on_nonfinite,
                    comm=comm, sharding=sharding, wrapped=wrapped)
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
        timeout: float = 600.0,
    ) -> Trainer:
        """A Trainer over a model and optimizer you built. ``loss(model, batch)`` returns a mean or ``(loss_sum, n_items)``.

        The model is moved to ``device`` (by default the model's own) and, for ``*-true`` precisions, cast
        in place: parameters keep their identity, so the optimizer stays valid (cast before it has state).
        """
        check_parts(model, optimizer, loss)
        plan, config = plan_and_config(plan_or_config)
        check_optimizer_owns(model, optimizer)
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
        device = resolve_device(device)
        check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget, timeout)
        if config.strategy == "fsdp":
            raise UsageError("Trainer.from_parts cannot shard with strategy 'fsdp': fully_shard replaces the "
                             "parameters, and the optimizer you built holds the old ones; use "
                             "Trainer(memfit.Workload(model=..., loss=..., optimizer=...), config)")
        comm = make_comm(config.strategy, timeout)
        self = cls.__new__(cls)
        model = cast(model.to(device), config.precision)
        sharding = Sharding(config, device)  # DDP keeps the parameters (FSDP, refused above, would agree)
        assemble(self, model, optimizer, loss, plan, config, device, budget, max_retries, scheduler,
                    clip_grad_norm, on_nonfinite, comm=comm, sharding=sharding, wrapped=sharding.apply(model))
        return self

    # ------------------------------------------------------------------ public

    @property
    def config(self) -> Config:
        """The configuration in use (after any re-plan)."""
        return self._config

    @property
    def rank(self) -> int:
        """This process's rank in a distributed run (0 on one device)."""
        return self._attempt.comm.rank

    @property
    def world_size(self) -> int:
        """The number of ranks training together (1 on one device)."""
        return self._attempt.comm.world_size

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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict on the CPU, FSDP's shards gathered (call it on every rank); no DDP ``module.``."""
        return full_state_dict(self._attempt.model)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path``: atomically (a run killed while saving keeps the previous
        file) and with a checksum of its content, which :meth:`load` verifies. Across ranks (DDP, FSDP)
        ``path`` is a directory each rank writes its part to (:mod:`memfit.engine.sharded`).

        Raises:
            memfit.WriteError: not written (``"disk full"`` named); a previous save is intact.
        """
        self._guard.settle("the save")  # a rank that stopped after its last update says so before any file is written
        sharded.save_state(self, path)

    def load(self, path: str | os.PathLike, *, weights_only: bool = True) -> None:
        """Resume from a file :meth:`save` wrote: verified (a truncated or damaged file is refused,
        naming it), then :meth:`load_state_dict`. ``weights_only=True`` runs no pickled code."""
        sharded.load_state(self, path, weights_only=weights_only)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (after building the Trainer the same way).

        Everything is checked before anything changes: keys, shapes and dtypes of the
        model, the optimizer's type, groups and state, the scaler, the scheduler,
        the config and precision, every random generator's state, the loader's position.
        What differs is said in one line, and the trainer is left as it was. The content
        of a file :meth:`save` wrote (``torch.load(path)``) is accepted too, its checksum verified.

        The config in use becomes the saved run's micro-batch and checkpointed modules (what it
        re-planned to fit); the rest stays as this Trainer was built (a DDP save resumed under FSDP
        runs and reports FSDP). Precision and activation offload must be the saved run's.
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

    def _rebuild(self) -> None:
        """After a failed attempt: the wrapper as a fresh step expects it (DDP's reducer, FSDP's resharded blocks)."""
        self._attempt.model = self._sharding.rebuilt(self._attempt.model)

    def use(self, config: Config) -> None:
        """Switch to ``config`` between steps: another micro-batch or checkpoints (precision, offload as built)."""
        if config.checkpoint != self._config.checkpoint:
            Checkpointing.remove(self.model, self._checkpointed)
            self._checkpointed = Checkpointing(config.checkpoint).apply(self.model)
        self._config = config
