"""Trainer: train under a plan with exact gradient accumulation and an out-of-memory guard.

``trainer.step(batch)`` takes one logical batch (the user's effective batch),
splits it into the plan's micro-batches, runs forward and backward on each,
steps the optimizer once and sets the gradients to None. The math is the large
batch's:

* a mean loss is weighted by its micro-batch's share of the batch's samples
  (``n_i / N``), not divided by the number of micro-batches as the seed
  article's loop does, which is wrong whenever the last micro-batch is short;
* a ``(loss_sum, n_items)`` loss is divided by the items of the whole logical
  batch (token-exact for language models with padding; the transformers
  Trainer divided per micro-batch until late 2024). The total is known only
  after the last micro-batch, so each micro-batch backpropagates
  ``loss_sum * c`` with ``c = 1 / (items of the first * micro-batches)``, close
  to the final scale so fp16 gradients stay in range, and the gradients are
  multiplied by ``1 / (total * c)`` once before the optimizer step.

Memory hygiene, as the seed articles ask but done right: the loss is
accumulated detached on the device and read with ``.item()`` only when
someone reads :attr:`StepResult.loss`; every reference to a micro-batch's graph
is dropped before the next; ``torch.cuda.empty_cache()`` runs only after an
out-of-memory error (calling it every step only slows training: the freed
blocks are allocated again at once, see the README's measurement).

The OOM guard: a ``torch.OutOfMemoryError`` in any micro-step discards the
batch's partial gradients, restores what the attempt changed (BatchNorm
statistics, the RNG, optimizer state created by the attempt), releases the
exception's frames and the allocator cache, re-plans (the plan's next
alternative predicted to need less memory, else half the micro-batch), and
redoes the same logical batch: every sample counts exactly once.

Known limitations:
* An OOM inside ``optimizer.step()`` after it has updated a tensor in place
  cannot be undone without a second copy of the model states, which is the
  memory the user does not have. memfit checks the tensors' version counters:
  an OOM before the first in-place write (the common case: creating the state
  in the first step, or a foreach temporary) is retried with the per-tensor
  implementation; after one, :class:`memfit.OutOfMemory` says so and asks to
  reload the last :meth:`Trainer.state_dict`.
* BatchNorm statistics depend on the micro-batch (they are per forward pass),
  so no accumulation is exact for them; dropout masks are drawn per
  micro-batch, so runs with different splits differ by their randomness.
* The leak check's byte figure needs a live-memory count: CUDA's allocator, or
  the simulated budget on CPU. On CPU without a budget it watches the autograd
  graphs only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit import _torch_private, rng, statefile
from memfit._tree import map_tensors
from memfit._tree import tensors as _tree_tensors
from memfit.budget import SimulatedBudget
from memfit.config import Config
from memfit.errors import (LeakWarning, MemfitError, NonFiniteLoss, NonFiniteLossWarning, OutOfMemory, ResumeWarning,
                           UsageError, warn)
from memfit.estimator import estimate
from memfit.planner import Plan, accumulation_steps
from memfit.strategies import Checkpointing, Precision, Recipe, blocks
from memfit.units import format_budget, format_bytes, parse_bytes
from memfit.workload import Workload, batch_size_of, build_model, move_batch

__all__ = ["Trainer", "StepResult", "FitResult"]

log = logging.getLogger("memfit")

# Growth of live memory at a step's start over the second step's that the leak
# check tolerates: allocator noise is zero for a steady loop, so anything past
# 1 MiB (or 1% of the baseline, for large models) is something kept alive.
_LEAK_MIN_BYTES = 1 << 20
_LEAK_FRACTION = 0.01
# A small leak (a few KiB a step) takes hundreds of steps to pass that; live memory
# that grew at each of this many step starts in a row, outside the model states, is
# flagged at once (a steady loop's live memory at a step's start does not change).
_LEAK_RISES = 8
_ON_NONFINITE = ("skip", "raise")
_MODEL_STATES = ("parameters", "buffers", "gradients", "optimizer_state")
# What the leak message calls a category: tensors made while forward or backward ran (the tracker's
# activations and temporaries) and kept past their step are the activations and outputs users keep.
_LEAK_LABELS = {
    "activations": "activations and outputs of earlier steps",
    "temporaries": "activations and outputs of earlier steps",
    "inputs": "inputs of earlier steps",
}


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one logical batch did. ``loss`` and ``items`` read the device (a sync) when accessed."""

    step: int
    """The trainer's step count after this step (1 for the first)."""
    samples: int
    """Samples in the logical batch."""
    micro_batches: tuple[int, ...]
    """The micro-batch sizes that finally ran (they sum to ``samples``)."""
    retries: int
    """Out-of-memory retries of this batch (0 if the first attempt fitted)."""
    skipped: bool
    """True if the optimizer step was skipped; ``skip_reason`` says why."""
    peak: int | None
    """Peak bytes of the step: CUDA's ``max_memory_allocated``, the simulated budget's count, or None on CPU."""
    loss_tensor: torch.Tensor
    """The batch's mean loss, detached, on the device."""
    items_tensor: torch.Tensor
    """Samples (mean losses) or items (``(loss_sum, n_items)`` losses) the loss averaged over."""
    skip_reason: str | None = None
    """Why the update was skipped: ``"non-finite loss"`` (NaN or inf: the model was left as it was),
    ``"no items"`` (every item of a ``(loss_sum, n_items)`` loss was padding) or ``"grad scaler"``
    (``16-mixed``: inf/nan gradients, the scale backs off); None if it ran."""

    @property
    def loss(self) -> float:
        """The logical batch's mean loss (per sample, or per item for token-level losses)."""
        return float(self.loss_tensor)

    @property
    def items(self) -> int:
        """Samples, or items for ``(loss_sum, n_items)`` losses, in the batch."""
        return int(self.items_tensor)


@dataclass(frozen=True, slots=True)
class FitResult:
    """What :meth:`Trainer.fit` did."""

    steps: int
    samples: int
    loss: float | None
    """Mean loss of the last logged window (None if nothing ran)."""
    peak: int | None
    """Highest step peak in bytes (None where it cannot be measured)."""
    retries: int
    skipped: int
    """Steps whose update was skipped, for any reason (see :attr:`StepResult.skip_reason`)."""
    seconds: float
    nonfinite: int = 0
    """Of ``skipped``: steps skipped because the loss was NaN or inf."""


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
        device = _resolve_device(device)
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
        if not isinstance(model, nn.Module):
            raise UsageError(f"Trainer.from_parts: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"Trainer.from_parts: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss):
            raise UsageError(f"Trainer.from_parts: loss must be a function (model, batch) -> loss, got {type(loss).__name__}")
        plan, config = _plan_and_config(plan_or_config)
        _check_optimizer_owns(model, optimizer)
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
        device = _resolve_device(device)
        _check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget)
        self = cls.__new__(cls)
        self._setup(_cast(model.to(device), config.precision), optimizer, loss, plan, config, device, budget,
                    max_retries, scheduler, clip_grad_norm, on_nonfinite)
        return self

    def _setup(self, model, optimizer, loss, plan, config, device, budget, max_retries, scheduler, clip_grad_norm,
               on_nonfinite) -> None:
        # Every argument is checked before the model is touched (checkpoint wrappers below).
        _check_options(max_retries, clip_grad_norm, scheduler, on_nonfinite, budget)
        if budget is not None and device.type == "cpu":
            from memfit.host import check_fits

            # The simulated device is real host memory: it must not promise more than the machine has.
            check_fits(parse_bytes(budget), f"a Trainer on the CPU with a simulated budget of "
                       f"{format_budget(parse_bytes(budget))}", "give a budget this machine can hold")
        self.on_nonfinite = on_nonfinite
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.plan = plan
        self.device = device
        self.max_retries = max_retries
        self.clip_grad_norm = clip_grad_norm
        self._loss = loss
        self._workload: Workload | None = None  # set by __init__: lets an OOM report come from an estimate
        self._recipe = Recipe(config, device.type)  # autocast, offload, GradScaler
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

        self.step_count = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.retries = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self._nonfinite_warned = False
        self._mutable_buffers: list[torch.Tensor] | None = None  # learned in the first step
        self._phase = "forward"  # where the current attempt is: forward, backward, optimizer, committed
        self._leak_baseline: tuple[int, int | None, dict[str, int] | None] | None = None  # (step, live, by category)
        self._watch_graphs = False  # fit's leak check: mark each step's graph to see if it outlives the step
        self._watch_pending = False  # this attempt's graph is not marked yet
        self._graphs: list[tuple[int, weakref.ref]] = []
        self._leak_warned = False
        self._leak_starts: deque[int] = deque(maxlen=_LEAK_RISES + 1)  # live bytes at the last step starts
        # Resume: where fit's epoch began (every RNG and the loader's generators, before iter(loader)),
        # the batch a save followed, and what load_state_dict read of the loader, for fit to replay.
        self._epoch_start: dict[str, Any] | None = None
        self._last_fingerprint: str | None = None
        self._resume_loader: dict[str, Any] | None = None
        self._generators: list[torch.Generator] = []

    # ------------------------------------------------------------------ public

    @property
    def config(self) -> Config:
        """The configuration in use (after any re-plan)."""
        return self._config

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
        retries = 0
        while True:
            restore = None
            self._phase = "forward"
            try:
                restore = self._snapshot()  # inside the guard: saving the state may itself run out
                result = self._attempt(batch, n, retries, restore)
            except torch.OutOfMemoryError as exc:
                if isinstance(exc, OutOfMemory):  # memfit's own (a nested guard gave up): not retried here
                    self._abandon(restore, n, exc)
                    raise
                message = str(exc).split("\n")[0]
                # The frames hold the attempt's activations: clear them before anything else.
                traceback.clear_frames(exc.__traceback__)
                del exc
            except BaseException as exc:  # any error, KeyboardInterrupt too: undo, then let it propagate
                self._abandon(restore, n, exc)
                raise
            else:
                self.step_count += 1
                self.samples_seen += n
                return result
            failed = self._config
            if self._phase == "committed":  # the update was applied: the batch counts, nothing to redo
                self.step_count += 1
                self.samples_seen += n
                self.model.zero_grad(set_to_none=True)
                raise OutOfMemory(f"out of memory after optimizer.step() had updated the model at step "
                                  f"{self.step_count} ({message}); the batch counted and is not redone",
                                  micro_batch=failed.micro_batch, retries=retries, report=self._report(failed)) from None
            in_optimizer = self._phase == "optimizer"
            self._discard(restore)
            _release_cached_memory(self.device)  # after an OOM only: hand cached blocks back before the retry
            retries += 1
            self.retries += 1
            if in_optimizer and not _optimizer_untouched(restore):
                raise OutOfMemory(
                    f"out of memory inside optimizer.step() at step {self.step_count + 1}, after it had updated "
                    "tensors in place; the model and optimizer cannot be restored without a second copy of them. "
                    "Reload the last trainer.state_dict().",
                    micro_batch=failed.micro_batch, retries=retries, report=self._report(failed),
                    advice=self._advice(failed),
                ) from None
            if in_optimizer and _uses_foreach(self.optimizer, self.device):
                _disable_foreach(self.optimizer)
                log.warning("memfit: out of memory in optimizer.step() at step %d (%s); retrying the batch with the "
                            "per-tensor optimizer implementation, which needs fewer temporaries",
                            self.step_count + 1, message)
                continue
            if min(failed.micro_batch, n) == 1 or retries > self.max_retries:
                why = "micro-batch 1 does not fit" if min(failed.micro_batch, n) == 1 else \
                    f"{self.max_retries} re-plans did not fit"
                raise OutOfMemory(
                    f"out of memory at step {self.step_count + 1}: {why} ({message})",
                    micro_batch=min(failed.micro_batch, n), retries=retries, report=self._report(failed),
                    advice=self._advice(failed),
                ) from None
            self._replan(failed, n)
            log.warning(
                "memfit: out of memory at step %d with micro-batch %d (%s); retrying the same batch of %d "
                "with %s (%d micro-steps)", self.step_count + 1, min(failed.micro_batch, n), message, n,
                self._config.describe(), len(accumulation_steps(n, self._config.micro_batch)),
            )

    def _abandon(self, restore: dict[str, Any] | None, n: int, exc: BaseException) -> None:
        """An exception other than a retried OOM left an attempt: put back what it changed, or count a committed step."""
        if self._phase == "committed":  # optimizer.step() applied the update: the batch counts
            self.step_count += 1
            self.samples_seen += n
            self.model.zero_grad(set_to_none=True)
            return
        in_optimizer = self._phase == "optimizer"
        self._discard(restore)
        if in_optimizer and not _optimizer_untouched(restore) and hasattr(exc, "add_note"):
            exc.add_note("memfit: this happened inside optimizer.step() after it had updated tensors in place; "
                         "the model and optimizer are not as before the step: reload the last save.")

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
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise UsageError(f"epochs must be a positive whole number, got {epochs!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise UsageError(f"log_every must be a positive whole number, got {log_every!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise UsageError(f"max_steps must be a whole number >= 0 or None, got {max_steps!r}")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise UsageError(f"save_every must be a whole number of steps >= 0, got {save_every!r}")
        if save_every and save_to is None:
            raise UsageError(f"save_every={save_every} needs save_to=PATH, the file to write the state to")
        self._generators = rng.loader_generators(loader)
        if save_to is not None or self._resume_loader is not None:
            _warn_if_not_replayable(loader)
        self._watch_graphs = leak_check and not self._leak_warned
        # The model's output marks the graph (a kept loss keeps it too, and so do kept logits);
        # a loss that never calls the model itself marks its own graph instead.
        output_hook = self.model.register_forward_hook(self._watch_output) if self._watch_graphs else None
        bar = _Progress(self, loader, epochs, console) if progress else None
        start, samples0, retries0, skipped0, nonfinite0 = (time.perf_counter(), self.samples_seen, self.retries,
                                                           self.skipped_steps, self.nonfinite_steps)
        steps_run, peak, logged = 0, None, None
        window = _Window()  # the logging window's loss, summed on the device
        trained = None  # the last batch trained on (a save records its fingerprint)
        try:
            while self.epoch < epochs:
                if max_steps is not None and self.step_count >= max_steps:
                    break  # before iter(loader): a shuffling loader would draw from the RNG
                sampler = getattr(loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.epoch)
                batches = self._epoch_batches(loader)
                for batch in batches:
                    if max_steps is not None and self.step_count >= max_steps:
                        break
                    if leak_check:
                        self._check_leak(steps_run)
                    result = self.step(batch)
                    trained = batch
                    self.batch_in_epoch += 1
                    steps_run += 1
                    if result.skip_reason != "non-finite loss":
                        window.add(result)  # no device read until logged
                    if result.peak is not None:
                        peak = max(peak or 0, result.peak)
                    if steps_run % log_every == 0:
                        # The one sync of the window: the loss read from the device.
                        logged = window.mean()
                    if bar is not None:
                        bar.advance(result, logged, peak)
                    if save_to is not None and save_every and self.step_count % save_every == 0:
                        self._last_fingerprint = rng.fingerprint(batch)
                        self.save(save_to)
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                break  # max_steps
            if window.steps:
                logged = window.mean()
            if trained is not None and self.batch_in_epoch:
                self._last_fingerprint = rng.fingerprint(trained)
            if save_to is not None:
                self.save(save_to)
            return FitResult(steps=steps_run, samples=self.samples_seen - samples0, loss=logged, peak=peak,
                             retries=self.retries - retries0, skipped=self.skipped_steps - skipped0,
                             seconds=time.perf_counter() - start, nonfinite=self.nonfinite_steps - nonfinite0)
        finally:
            self._watch_graphs = False
            if output_hook is not None:
                output_hook.remove()
            if bar is not None:
                bar.close()

    def _epoch_batches(self, loader: Iterable[Any]):
        """This epoch's iterator over ``loader``, positioned after the batches already trained on.

        At an epoch's start the state of every random generator and of the loader's
        generators is recorded first (a save replays it). Resuming in the middle of an
        epoch replays that start, skips the batches trained on, and restores every
        generator as it was at the save.
        """
        resume, self._resume_loader = self._resume_loader, None
        generators = self._generators
        if resume is not None:
            if len(resume["generators"]) != len(generators):
                warn(f"memfit: the saved run's loader held {len(resume['generators'])} torch.Generator(s), "
                     f"this one {len(generators)}; its order cannot be restored, so the resumed run may see "
                     "other batches than the uninterrupted one", ResumeWarning)
                resume = dict(resume, generators=None, epoch_start=None)
        if resume is not None and self.batch_in_epoch and resume["epoch_start"] is not None:
            self._epoch_start = resume["epoch_start"]
            _set_generator_states(generators, resume["epoch_start"]["generators"])
            rng.restore(resume["epoch_start"]["rng"])
        else:
            if resume is not None and resume["generators"] is not None:
                _set_generator_states(generators, resume["generators"])
            self._epoch_start = {"rng": rng.capture(), "generators": [g.get_state() for g in generators]}
        batches = iter(loader)
        if not self.batch_in_epoch:
            return batches
        last = None
        for _ in range(self.batch_in_epoch):  # trained on before the save
            last = next(batches, None)
            if last is None:
                break
        if resume is not None:
            expected = resume.get("last_batch")
            if expected is not None and (last is None or rng.fingerprint(last) != expected):
                warn(f"memfit: resuming at batch {self.batch_in_epoch} of epoch {self.epoch}, but the loader "
                     "did not give the batch the saved run trained on last: its order depends on something "
                     "memfit does not restore (a sampler's own random generator, say); the resumed run "
                     "differs from the uninterrupted one", ResumeWarning)
            rng.restore(resume["rng"])  # as at the save: the skipped batches drew nothing the run keeps
            if resume["generators"] is not None:
                _set_generator_states(generators, resume["generators"])
        return batches

    def state_dict(self) -> dict[str, Any]:
        """Everything a killed run needs to resume to the same result: model, optimizer, scaler,
        scheduler, the config in use (after re-plans), counters, every random generator's state,
        and (after :meth:`fit`) where the loader's epoch began."""
        scaler = self._recipe.scaler()
        generators = self._generators
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": _qualname(self.optimizer),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "config": dataclasses.asdict(self._config),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "counters": {
                "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples_seen, "retries": self.retries, "skipped": self.skipped_steps,
                "nonfinite": self.nonfinite_steps,
            },
            "rng": rng.capture(),
            "loader": {
                "epoch_start": self._epoch_start,
                "generators": [g.get_state() for g in generators],
                "last_batch": self._last_fingerprint if self.batch_in_epoch else None,
            },
        }

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
        if isinstance(state, dict) and "format" in state:
            state = statefile.verify(state)
        config = self._check_state(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        scaler = self._recipe.scaler()
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._use(config)
        counters = state["counters"]
        self.step_count, self.epoch = counters["step"], counters["epoch"]
        self.batch_in_epoch, self.samples_seen = counters["batch_in_epoch"], counters["samples"]
        self.retries, self.skipped_steps = counters["retries"], counters["skipped"]
        self.nonfinite_steps = counters.get("nonfinite", 0)
        rng.restore(state["rng"])
        loader = state.get("loader") or {"epoch_start": None, "generators": [], "last_batch": None}
        self._epoch_start = loader["epoch_start"]
        self._last_fingerprint = loader["last_batch"]
        self._resume_loader = dict(loader, rng=state["rng"])

    def _check_state(self, state: Any) -> Config:
        """Everything load_state_dict needs, checked against this trainer; the saved Config. Changes nothing."""
        if not isinstance(state, dict):
            raise UsageError(f"load_state_dict takes a dict from trainer.state_dict(), got {type(state).__name__}")
        missing = {"model", "optimizer", "config", "counters", "rng"} - set(state)
        if missing:
            raise UsageError(f"not a memfit Trainer state_dict: it lacks {sorted(missing)}; "
                             "save one with trainer.save(path) or torch.save(trainer.state_dict(), path)")
        problems = _model_differences(state["model"], self.model.state_dict())
        saved_type = state.get("optimizer_type")
        if saved_type is not None and saved_type != _qualname(self.optimizer):
            problems.append(f"the saved optimizer is {saved_type}, this one {_qualname(self.optimizer)}")
        else:
            problems += _optimizer_differences(state["optimizer"], self.optimizer)
        scaler = self._recipe.scaler()
        if (state.get("scheduler") is None) != (self.scheduler is None):
            problems.append("the saved run had " + ("no LR scheduler, this trainer has one" if self.scheduler is not None
                                                    else "an LR scheduler, this trainer none: pass scheduler=..."))
        if scaler is not None and state.get("scaler") is None:
            problems.append("the saved run has no GradScaler state, this trainer (16-mixed) needs one")
        try:
            config = Config(**state["config"])
        except (TypeError, MemfitError) as exc:
            raise UsageError(f"the saved config is not a memfit Config ({exc})") from None
        for name in ("precision", "offload_activations"):
            saved, built = getattr(config, name), getattr(self._config, name)
            if saved != built:
                problems.append(f"the saved run trained with {name}={saved!r}, this Trainer with {built!r}; "
                                f"build the Trainer with {name}={saved!r} to resume")
        counters = state["counters"]
        names = ("step", "epoch", "batch_in_epoch", "samples", "retries", "skipped")
        if not isinstance(counters, dict) or any(not isinstance(counters.get(k), int) or counters[k] < 0 for k in names):
            problems.append(f"the saved counters are not whole numbers >= 0 for {', '.join(names)}")
        if not isinstance(state["rng"], dict) or not isinstance(state["rng"].get("cpu"), torch.Tensor):
            problems.append("the saved random state has no CPU generator state")
        if problems:
            raise UsageError("cannot resume from this state (nothing was changed): " + "; ".join(problems))
        try:
            Checkpointing(config.checkpoint).select(self.model)
        except MemfitError as exc:
            raise UsageError(f"the saved config does not fit this model: {exc}") from None
        return config

    # ------------------------------------------------------------------ one attempt

    def _attempt(self, batch: Any, n: int, retries: int, restore: dict[str, Any]) -> StepResult:
        sizes = accumulation_steps(n, self._config.micro_batch)
        recipe, scaler = self._recipe, self._recipe.scaler()
        self._phase = "forward"
        self._watch_pending = self._watch_graphs  # the first micro-batch's graph is marked
        with _Measured(self) as peak:
            total = None  # detached running loss, float32 (float64 for a float64 loss); no sync until read
            token_scale = items = low = None
            start = 0
            for size in sizes:
                micro = _slice(batch, start, start + size)
                start += size
                # Copies to CUDA may be asynchronous (stream-ordered); a copy to the host may not: it would be read early.
                micro = move_batch(micro, self.device, non_blocking=self.device.type == "cuda")
                micro = recipe.precision.convert_input(micro)
                if self._sim is not None:
                    micro = map_tensors(micro, torch.clone)  # on a simulated device the micro-batch is a copy
                with recipe.forward_context():
                    out = self._loss(self.model, micro)
                if isinstance(out, torch.Tensor):
                    if token_scale is not None or out.dim() != 0:
                        raise _loss_error(out, mixed=token_scale is not None)
                    if total is None:
                        total = torch.zeros((), device=self.device, dtype=_accumulator(out))
                    # A mean over this micro-batch: its share of the logical batch's samples.
                    scaled = out * (size / n)
                    total += scaled.detach()
                elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor):
                    if items is None and start != size:
                        raise _loss_error(out, mixed=True)
                    loss_sum, n_items = out
                    if loss_sum.dim() != 0:
                        raise _loss_error(loss_sum, mixed=False)
                    dtype = _accumulator(loss_sum)
                    n_items = torch.as_tensor(n_items, device=self.device).detach().to(dtype)
                    if token_scale is None:
                        # Provisional 1/total (the true total is known after the last micro-batch), in the
                        # loss's precision (float64 for a float64 model), so the gradients keep theirs.
                        token_scale = 1.0 / (n_items.clamp(min=1.0) * len(sizes))
                        total = torch.zeros((), device=self.device, dtype=dtype)
                        items = torch.zeros((), device=self.device, dtype=dtype)
                        low = n_items
                    items += n_items
                    low = torch.minimum(low, n_items)
                    scaled = loss_sum * token_scale
                    total += loss_sum.detach()
                else:
                    raise _loss_error(out, mixed=False)
                user_loss = out if isinstance(out, torch.Tensor) else out[0]
                if self._watch_pending and user_loss.grad_fn is not None:
                    self._watch(user_loss.grad_fn)
                del user_loss
                self._phase = "backward"
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                self._phase = "forward"
                # Release this micro-batch's graph and inputs now: only the gradients carry over.
                del out, scaled, micro
            if self._mutable_buffers is None:
                # The first step shows which buffers forward updates, by value as well as by version:
                # native_batch_norm writes running_mean/var without bumping their version counters.
                self._mutable_buffers = [b for b, saved in restore["buffers"]
                                         if b._version != restore["versions0"][id(b)] or not torch.equal(b, saved)]
            # The one sync of the step: the loss (NaN/inf?) and the item counts are read before the update.
            if token_scale is not None:
                loss_value, total_items, fewest = torch.stack([total, items, low]).tolist()
            else:
                loss_value, total_items, fewest = float(total), float(n), 0.0
            if fewest < 0:
                raise UsageError(f"the loss returned n_items = {fewest:g} for a micro-batch at step "
                                 f"{self.step_count + 1}; n_items counts the items loss_sum adds up, so it is >= 0")
            reason = None
            if not math.isfinite(loss_value):
                reason = "non-finite loss"
                if self.on_nonfinite == "raise":
                    raise NonFiniteLoss(f"the loss at step {self.step_count + 1} is {loss_value}; the step was "
                                        "undone (model, optimizer, BatchNorm statistics as before it)")
            elif token_scale is not None and total_items == 0:
                reason = "no items"  # every item was padding: there is no mean to follow
            if token_scale is not None:
                fix = 1.0 / (items * token_scale) if total_items > 0 else None
                # grads = sum_i d(loss_sum_i)/dw * c; the exact mean needs 1/items: rescale once.
                if fix is not None and len(sizes) > 1:  # one micro-batch: c was 1/total already
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(fix)
                mean = total / items.clamp(min=1.0)
            else:
                items = torch.tensor(float(n), device=self.device)
                mean = total
            if reason is None:
                self._phase = "optimizer"
                reason = self._optimizer_step(scaler)  # "committed" once the update is applied
            else:
                self._skip(restore, reason, loss_value)
        if reason is not None:
            self.skipped_steps += 1
        elif self.scheduler is not None:
            self.scheduler.step()
        return StepResult(step=self.step_count + 1, samples=n, micro_batches=sizes, retries=retries,
                          skipped=reason is not None, peak=peak(), loss_tensor=mean, items_tensor=items,
                          skip_reason=reason)

    def _skip(self, restore: dict[str, Any], reason: str, loss_value: float) -> None:
        """Leave the model as before the step: no update, BatchNorm statistics back (a NaN poisons them)."""
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in restore["buffers"]:
                b.copy_(saved)
        for p, grad in restore["grads"]:
            p.grad = grad
        if reason != "non-finite loss":
            log.warning("memfit: step %d had no items (every item was padding); its update was skipped",
                        self.step_count + 1)
            return
        self.nonfinite_steps += 1
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            message = (f"memfit: the loss at step {self.step_count + 1} is {loss_value}; its update was skipped and "
                       "the model left as it was. Later ones are counted (StepResult.skip_reason, "
                       "FitResult.nonfinite) without a warning; pass on_nonfinite='raise' to stop instead.")
            log.warning(message)
            warn(message, NonFiniteLossWarning)

    def _optimizer_step(self, scaler) -> str | None:
        optimizer = self.optimizer
        if self.clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        reason = None
        if scaler is not None:
            scale = scaler.get_scale()  # GradScaler.step syncs anyway, to check for inf
            scaler.step(optimizer)
            self._phase = "committed"
            scaler.update()
            if scaler.get_scale() < scale:  # the scale backs off exactly when the step was skipped
                reason = "grad scaler"
        else:
            optimizer.step()
            self._phase = "committed"
        optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next backward
        return reason

    # ------------------------------------------------------------------ memory

    def _live_bytes(self) -> int | None:
        """Live bytes now (the simulated device's count, or CUDA's allocator), or None where they cannot be read."""
        if self._sim is not None:
            return self._sim.live_bytes()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return None

    def _live_by_category(self, live: int) -> dict[str, int]:
        """``live`` bytes by category: the simulated device's own; on CUDA, model states and the rest."""
        if self._sim is not None:
            return self._sim.live_by_category()
        cats = _model_state_bytes(self.model, self.optimizer)
        cats["other (activations, inputs, or tensors kept from earlier steps)"] = live - sum(cats.values())
        return cats

    def _check_leak(self, steps_run: int) -> None:
        """Warn once if an earlier step's memory is still alive at this step's start.

        Three signals. Live device memory (CUDA's allocator, or the simulated budget)
        more than 1 MiB (or 1%) above the second step's start. Live memory that grew at
        each of the last eight step starts, outside the model states (a small leak, a
        few KiB a step, shows at once this way; a steady loop's live memory at a step's
        start does not change). And autograd graphs of earlier steps still alive:
        ``total_loss += loss`` keeps every step's graph; since PyTorch frees a graph's
        saved tensors in backward, such a graph holds host memory (its nodes) more than
        device memory, which the other signals miss.
        """
        if self._leak_warned or steps_run < 1:
            return
        live = self._live_bytes()
        if steps_run == 1:
            # The baseline: the second step's start (the first creates the optimizer state).
            self._leak_baseline = (self.step_count + 1, live, None if live is None else self._live_by_category(live))
            self._leak_starts.clear()
            self._leak_starts.append(live)
            return
        self._graphs = [(step, ref) for step, ref in self._graphs if ref() is not None]
        kept = len(self._graphs)
        base_step, base, base_cats = self._leak_baseline
        growth = None if live is None or base is None else live - base
        device_leak = growth is not None and growth > max(_LEAK_MIN_BYTES, _LEAK_FRACTION * base)
        cats = None
        if live is not None and not device_leak:
            starts = self._leak_starts
            starts.append(live)
            if len(starts) == starts.maxlen and all(b > a for a, b in zip(starts, list(starts)[1:])):
                # Rising at every start: a leak unless the model states grew (lazily created optimizer state).
                cats = self._live_by_category(live)
                device_leak = growth - sum(cats.get(c, 0) - base_cats.get(c, 0) for c in _MODEL_STATES) > 0
                if not device_leak:
                    starts.clear()
        if not device_leak and kept < 2:  # one kept graph (the last loss, say) is not growth
            return
        self._leak_warned = True
        self._watch_graphs = False  # warned once: stop marking graphs for the rest of the run
        parts = [f"memfit: possible memory leak at the start of step {self.step_count + 1}:"]
        if kept >= 2:
            parts.append(f"the autograd graphs of {kept} earlier steps (the first from step {self._graphs[0][0]}) "
                         "are still alive, and one more is kept each step;")
        if growth is not None:
            if cats is None:
                cats = self._live_by_category(live)  # only now: on CUDA it walks every model and optimizer tensor
            by_label: dict[str, int] = {}
            for c in cats:
                label = _LEAK_LABELS.get(c, c)
                by_label[label] = by_label.get(label, 0) + cats[c] - base_cats.get(c, 0)
            grown = max(by_label.items(), key=lambda kv: kv[1])
            parts.append(f"live device memory is {format_bytes(live)}, {format_bytes(growth)} more than at step "
                         f"{base_step}" + (f", most of it {grown[0]} (+{format_bytes(grown[1])})." if growth > 0 else "."))
        parts.append("Something keeps tensors of earlier steps alive, such as a list of outputs, or a loss summed with "
                     "its history (total_loss += loss keeps every step's graph); keep loss.item() or .detach() instead.")
        message = " ".join(parts)
        log.warning(message)
        warn(message, LeakWarning)
        self._graphs.clear()

    def _watch_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._watch_pending:
            node = next((t.grad_fn for t in _tree_tensors(output) if t.grad_fn is not None), None)
            if node is not None:
                self._watch(node)

    def _watch(self, node) -> None:
        # A token in the graph node's metadata lives exactly as long as the node.
        token = _GraphToken()
        node.metadata["memfit_step"] = token
        self._graphs.append((self.step_count + 1, weakref.ref(token)))
        self._watch_pending = False

    def _report(self, failed: Config):
        """The memory report for an OOM: the simulated device's own, else an estimate of the failed config."""
        if self._sim is not None:
            return self._sim.report()
        if self._workload is None:
            return None
        try:
            return estimate(self._workload, failed, device=self.device.type).report
        except Exception as exc:  # noqa: BLE001 - the report is a courtesy; the OOM is the error to raise
            log.debug("memfit: no estimate for the out-of-memory report: %s", exc)
            return None

    # ------------------------------------------------------------------ OOM recovery

    def _snapshot(self) -> dict[str, Any]:
        """What an attempt may change before it can fail, to put back if it does."""
        buffers = self._mutable_buffers
        learning = buffers is None  # first step: all buffers, to learn which ones forward updates
        if learning:
            buffers = list(self.model.buffers())
        opt_state = self.optimizer.state
        # Gradients are None between steps; ones the caller left on the model are kept as they were.
        grads = [(p, p.grad.detach().clone()) for p in self.model.parameters() if p.grad is not None]
        return {
            "buffers": [(b, b.detach().clone()) for b in buffers],
            "versions0": {id(b): b._version for b in buffers} if learning else None,
            "grads": grads,
            "rng": rng.capture(cuda=self.device.type == "cuda", portable=False),
            "has_state": {id(p) for p in opt_state},
            # Weak references: a strong one would keep a state tensor the optimizer replaces alive twice.
            "versions": [(weakref.ref(t), t._version) for t in _optimizer_tensors(self.optimizer)],
        }

    def _discard(self, restore: dict[str, Any] | None) -> None:
        """Undo a failed attempt (what ``optimizer.step()`` wrote in place excepted: see _optimizer_untouched).

        ``restore`` is None when taking the snapshot itself failed: nothing had changed yet.
        The optimizer's parameters are the model's (checked at construction): one zero_grad frees them all.
        """
        self.model.zero_grad(set_to_none=True)  # the batch's partial gradients
        if restore is not None:
            with torch.no_grad():
                for b, saved in restore["buffers"]:
                    b.copy_(saved)
            for p, grad in restore["grads"]:
                p.grad = grad
            rng.restore(restore["rng"])
            # State the attempt created (the first step's) goes; state it changed cannot be undone.
            for p in [p for p in self.optimizer.state if id(p) not in restore["has_state"]]:
                del self.optimizer.state[p]
        scaler = self._recipe.scaler()
        if scaler is not None:
            _torch_private.reset_grad_scaler_step(scaler)

    def _replan(self, failed: Config, n: int) -> None:
        """The plan's cheapest alternative predicted to need less than ``failed``, else half its micro-batch."""
        if self.plan is not None and self._required is not None:
            for alt in self.plan.alternatives:
                c = alt.config
                if (alt.fits and alt.required < self._required and c != failed and c.precision == failed.precision
                        and c.offload_activations == failed.offload_activations):
                    self._required = alt.required
                    self._use(c)
                    return
        self._required = None  # below the plan's predictions: halve from here on
        self._use(dataclasses.replace(failed, micro_batch=max(1, min(failed.micro_batch, n) // 2)))

    def _use(self, config: Config) -> None:
        """Switch to ``config``: another micro-batch or checkpoint set (precision and offload stay as built)."""
        if config.checkpoint != self._config.checkpoint:
            Checkpointing.remove(self.model, self._checkpointed)
            self._checkpointed = Checkpointing(config.checkpoint).apply(self.model)
        self._config = config

    def _advice(self, failed: Config) -> tuple[str, ...]:
        advice = []
        if failed.precision == "32-true":
            advice.append("precision 'bf16-mixed' (or '16-mixed' on GPUs without bf16) halves activations")
        if not failed.checkpoint and blocks(self.model):
            advice.append("checkpoint='all' recomputes each block's activations in backward")
        if self.device.type == "cuda" and not failed.offload_activations:
            advice.append("offload_activations=True keeps saved activations in CPU memory")
        if self.plan is not None:
            advice.append(f"the plan predicted {format_bytes(self.plan.required)} of {format_budget(self.plan.budget)}; "
                          "if something else holds device memory, plan for less (memfit plan --budget)")
        live = self._live_bytes()
        if live is not None:
            advice.append(f"{format_bytes(live)} was still live after the failure; the model states alone are "
                          f"{format_bytes(sum(_model_state_bytes(self.model, self.optimizer).values()))}")
        advice.append("a larger budget or device")
        return tuple(advice)



class _GraphToken:
    """A weakly referenceable marker put into a step's autograd graph (see Trainer._check_leak)."""


class _Measured:
    """The memory scope of one attempt: the simulated budget on CPU, CUDA's peak counter on CUDA."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.value: int | None = None

    def __enter__(self) -> Callable[[], int | None]:
        t = self.trainer
        if t._sim is not None:
            t._sim.__enter__()
            t._sim.forget_history()  # only this attempt's history is kept: a long run's would grow without bound
        elif t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        return lambda: self.value

    def __exit__(self, *exc: Any) -> None:
        t = self.trainer
        if t._sim is not None:
            t._sim.__exit__(*exc)
            self.value = t._sim.peak
        elif t.device.type == "cuda":
            self.value = torch.cuda.max_memory_allocated(t.device)


class _Progress:
    """The rich progress bar of fit(): samples/s, loss, peak memory against the budget."""

    def __init__(self, trainer: Trainer, loader: Any, epochs: int, console: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.trainer = trainer
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
        # A resumed run starts the bar where the saved run stopped.
        done = trainer.epoch * per_epoch + trainer.batch_in_epoch if per_epoch is not None else 0
        self.task = self.progress.add_task("train", total=per_epoch * epochs if per_epoch is not None else None,
                                           completed=done, speed="", loss="-", memory="")
        self.progress.start()

    def advance(self, result: StepResult, loss: float | None, peak: int | None) -> None:
        self.samples += result.samples
        speed = self.samples / max(time.perf_counter() - self.start, 1e-9)
        budget = self.trainer.budget
        memory = "" if peak is None else f"peak {format_bytes(peak)}" + (f"/{format_bytes(budget)}" if budget else "")
        self.progress.update(self.task, advance=1, speed=f"{speed:,.0f} samples/s",
                             loss="-" if loss is None else f"{loss:.4f}", memory=memory)

    def close(self) -> None:
        self.progress.stop()


class _Window:
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


def _warn_if_not_replayable(loader: Any) -> None:
    """Warn at fit's start about loaders whose order a resumed run cannot replay."""
    if isinstance(loader, Iterator):
        warn(f"memfit: fit got a one-shot iterator ({type(loader).__name__}), which yields its batches "
             "once: a resumed run cannot replay the interrupted epoch; pass a DataLoader or another "
             "iterable that can be iterated again", ResumeWarning)
    if getattr(loader, "persistent_workers", False):  # DataLoader refuses it without workers
        warn("memfit: the DataLoader keeps its workers (persistent_workers=True), whose random state "
             "carries over from epoch to epoch and is not saved: random augmentations after a resume "
             "differ from the uninterrupted run's; persistent_workers=False makes them reproducible", ResumeWarning)


def _set_generator_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    for generator, state in zip(generators, states):  # as many: _epoch_batches checked
        generator.set_state(state)


def _qualname(obj: Any) -> str:
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


def _optimizer_untouched(restore: dict[str, Any] | None) -> bool:
    """False if ``optimizer.step()`` wrote a parameter or state tensor in place since the snapshot."""
    if restore is None:
        return True
    # A tensor gone (replaced) or with a new version was written: the optimizer state moved on.
    return all((t := ref()) is not None and t._version == v for ref, v in restore["versions"])


def _release_cached_memory(device: torch.device) -> None:
    """After an OOM on CUDA: the allocator's cached blocks go back to the driver before the retry (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _accumulator(loss: torch.Tensor) -> torch.dtype:
    """The dtype losses are added up in: float32, or float64 for a float64 loss."""
    return torch.float64 if loss.dtype == torch.float64 else torch.float32


def _plan_and_config(plan_or_config: Any) -> tuple[Plan | None, Config]:
    if isinstance(plan_or_config, Plan):
        return plan_or_config, plan_or_config.config
    if isinstance(plan_or_config, Config):
        return None, plan_or_config
    raise UsageError(f"plan_or_config must be a memfit.Plan (from memfit.plan) or a memfit.Config, "
                     f"got {type(plan_or_config).__name__}; e.g. memfit.Config(micro_batch=32)")


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {str(device)!r} was asked for but torch.cuda.is_available() is False; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {str(device)!r}: memfit trains on 'cpu' or 'cuda'")
    return device


def _cast(model: nn.Module, precision: str) -> nn.Module:
    """``*-true``: cast in place; ``Module.to`` keeps each Parameter object, so an optimizer built on them stays valid.

    (``Precision.apply`` replaces the parameters instead, which fake tensors need and a built optimizer cannot follow.)
    """
    p = Precision(precision)
    return model.to(dtype=p.dtype) if not p.mixed and p.dtype != torch.float32 else model


def _slice(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor (views, no copy); scalars and non-tensors as they are."""
    return map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 else t)


def _loss_error(out: Any, *, mixed: bool) -> MemfitError:
    if mixed:
        return MemfitError("the loss returned a mean for some micro-batches and (loss_sum, n_items) for others; "
                           "return one form for every batch")
    shape = f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""
    return MemfitError(f"the loss returned {type(out).__name__}{shape}; return a scalar mean over the batch "
                       "or (loss_sum, n_items) for token-level losses")


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor ``optimizer.step()`` may write: the parameters and the state."""
    return [p for group in optimizer.param_groups for p in group["params"]] + _state_tensors(optimizer)


def _model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    seen: set[int] = set()

    def nbytes(ts) -> int:
        total = 0
        for t in ts:
            if t is None or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    return {"parameters": nbytes(params) + nbytes(model.buffers()), "gradients": nbytes(p.grad for p in params),
            "optimizer_state": nbytes(_state_tensors(optimizer))}


def _uses_foreach(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    # foreach=None means "foreach on CUDA, the per-tensor loop elsewhere" (torch.optim's default).
    return any("foreach" in g and (g["foreach"] or (g["foreach"] is None and device.type == "cuda"))
               for g in optimizer.param_groups)


def _disable_foreach(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = False
