"""MemfitCallback: plan with memfit, train in Lightning, the plan applied exactly.

Translating a plan into Lightning's flags by hand goes wrong three ways. ``accumulate_grad_batches``
accumulates whole loader batches, so a plan of ``52 x 4 + 48`` (256 samples) cannot be written with
it: ``batch_size=52, accumulate_grad_batches=5`` trains on 260, and Lightning divides every
micro-batch's loss by 5, weighting a short last one as a full one. A plan made for the bare network
checkpoints ``encoder.layer.0``, which is ``bert.encoder.layer.0`` in the LightningModule. And a
tracker around ``trainer.fit`` sees no optimizer state: Lightning creates the optimizer inside ``fit``.

How: the loader's batch is the effective batch (``DataLoader(batch_size=B)``, one optimizer step per
batch), and the callback hands it to memfit's own engine, :meth:`memfit.Trainer.step`, built with
``Trainer.from_parts`` over the LightningModule and the optimizer Lightning created. The engine
already does what the plan needs, tested against full-batch runs: the split into the plan's
micro-batches (the uneven last one included), each mean loss weighted by its share of the samples
``n_i / B`` (a ``(loss_sum, n_items)`` loss by the batch's items), the checkpoint set, autocast and
the GradScaler, the out-of-memory guard (undo the attempt, re-plan smaller, redo the same samples)
and the atomic step. Lightning's automatic loop cannot do these exactly: it accumulates per batch
and divides by a count, and an OOM inside its closure leaves partial gradients it cannot undo. So
for each batch the module is switched to manual optimization (Lightning then calls only
``training_step``), and its ``training_step`` is replaced for the run by one that calls the engine,
whose loss is the module's own ``training_step`` on each micro-batch. After the batch the module is
automatic again, so Lightning counts the step (``global_step``, ``max_steps``), steps the LR
schedulers and logs by its automatic rules (:mod:`memfit.integrations._lightning_step`).

Planning happens in ``on_train_start`` (the optimizer and the train dataloader exist then): the
module is the workload's model, a sample of the dataloader its batch, its ``training_step`` its loss
and its optimizer's class and defaults its optimizer. Lightning's precision is fixed when the
``L.Trainer`` is made, so the callback plans at that precision, and a plan at another one is refused
with the ``L.Trainer(precision=...)`` to make; to let the plan choose, plan first
(:func:`plan_module`) and make the Trainer from it (:func:`trainer_kwargs`).

Memory: the steps are tracked with the optimizer Lightning built (its state counted from its first
step): ``callback.report`` is the :class:`memfit.MemoryReport` of the tracked step with the highest
peak, and the loggers get ``memfit/planned_bytes``, ``memfit/budget_bytes`` (train start),
``memfit/step_peak_bytes``, ``memfit/loss``, ``memfit/micro_steps``, ``memfit/retries`` (every
``log_every_n_steps``) and ``memfit/peak_bytes``, ``memfit/at_peak/<category>`` (train end), in int bytes.

Known limitations:
* One device (``SingleDeviceStrategy``) and one optimizer. For several GPUs, ``memfit.Trainer`` with
  ``Config(strategy="ddp")`` under torchrun.
* The module's ``backward``, ``optimizer_step``, ``optimizer_zero_grad``, ``on_before_backward``,
  ``on_after_backward`` and ``on_before_zero_grad`` are not called (the engine runs backward and the
  update; a warning names the ones overridden). ``on_before_optimizer_step`` and
  ``configure_gradient_clipping`` (``gradient_clip_val``) are, once per step, on the whole batch's
  gradients; under ``16-mixed`` not for a step the GradScaler skips.
* What ``training_step`` logs with ``self.log`` is logged per micro-batch (and again for a batch
  redone after an OOM); ``memfit/loss`` is the logical batch's exact loss.
* A resumed run (``ckpt_path=``) plans again: a micro-batch re-planned after an OOM is not kept, and
  under ``16-mixed`` the engine's GradScaler, which is not in Lightning's checkpoint, warms its scale up again.
* On CPU without ``simulate`` only the tracked steps have a peak (there is no device count to read).
* ``simulate=True`` runs the steps on :func:`memfit.simulate_budget` (CPU only): exact to the byte
  and by category, and slower (every op is counted).

Example:
    >>> import lightning as L, torch
    >>> from memfit.integrations.lightning import MemfitCallback
    >>> class Classifier(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.cross_entropy(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters())
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    >>> callback = MemfitCallback("30KiB", batch_size=32, simulate=True)   # a device of 30 KiB, on the CPU
    >>> trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback])
    >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=32))
    >>> callback.plan.accumulation, callback.report.at_peak["optimizer_state"]   # micro-batches; bytes
    ((16, 16), 6704)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from memfit.checks import positive_int
from memfit.config import PRECISIONS
from memfit.engine import Trainer
from memfit.engine.setup import check_options
from memfit.errors import MemfitError, UsageError
from memfit.integrations._lightning_step import (LightningStep, SampleBatch, check_loader, loader_batch, module_loss,
                                                 optimizer_factory, rebase_plan, sample_from_loader, single_loader,
                                                 single_optimizer)
from memfit.planner import Plan, plan
from memfit.units import parse_bytes
from memfit.workload import Workload

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as _exc:  # pragma: no cover - the tests skip without Lightning
    class LightningMissing(MemfitError, ImportError):
        """Lightning is not installed."""

    raise LightningMissing("memfit.integrations.lightning needs Lightning 2.2 or later: pip install 'lightning>=2.2' "
                           "(the package 'lightning', which provides lightning.pytorch)") from _exc

__all__ = ["MemfitCallback", "trainer_kwargs", "plan_module", "module_workload"]

# memfit.plan's options a callback passes on (the engine trains one process and steps the optimizer after backward).
_PLAN_OPTIONS = ("precisions", "allow_checkpoint", "checkpoint_candidates", "allow_offload", "device", "m_half",
                 "calibrate", "optimizer_impl", "zero_grad", "profile", "exhaustive")
_REFUSED = {"world_size": "MemfitCallback trains on one device", "strategies": "MemfitCallback trains on one device",
            "optimizer_in_backward": "the engine steps the optimizer after backward (an OOM mid-backward could "
                                     "not be undone)"}
# Hooks Lightning's automatic loop calls and the engine does not (it runs backward and the update itself).
_IGNORED_HOOKS = ("backward", "optimizer_step", "optimizer_zero_grad", "on_before_backward", "on_after_backward",
                  "on_before_zero_grad")


class MemfitCallback(pl.Callback):
    """Plans the module's step for ``budget`` and trains each batch of ``batch_size`` samples under the plan.

    Args:
        budget: the device's memory: "24GiB", int bytes, a card's name, or "auto" (free CUDA memory).
            With ``plan=`` it defaults to the plan's (a smaller one only matters with ``simulate``).
        batch_size: the effective batch, samples per optimizer step; the train dataloader's
            ``batch_size`` must be this (its last batch may be shorter). With ``plan=``, the plan's.
        plan: a :class:`memfit.Plan` to apply instead of planning (from :func:`plan_module`, or
            :func:`memfit.plan` of a workload whose model is the module or the network it holds).
        simulate: on CPU, run the steps on a simulated device of ``budget`` bytes
            (:func:`memfit.simulate_budget`): out-of-memory as on a GPU, every step counted by category.
        max_retries: re-plans per batch after out-of-memory errors before :class:`memfit.OutOfMemory`.
        on_nonfinite: a NaN or inf loss: ``"skip"`` its update (the model as before, warned once) or
            ``"raise"`` :class:`memfit.NonFiniteLoss`.
        track_steps: batches whose memory is tracked by category (default 2: the first creates the
            optimizer's state, the second runs with it); None tracks all, 0 none (the peak is still
            read on CUDA and under ``simulate``).
        **plan_options: passed to :func:`memfit.plan`: ``precisions`` (default: the L.Trainer's),
            ``allow_checkpoint``, ``checkpoint_candidates``, ``allow_offload``, ``device`` (default: the
            L.Trainer's), ``m_half``, ``calibrate``, ``optimizer_impl``, ``zero_grad``, ``profile``, ``exhaustive``.

    After ``fit``: :attr:`plan`, :attr:`config` (after any re-plan), :attr:`report`, :attr:`peak`,
    :attr:`oom_events`, :attr:`engine`.

    Example:
        >>> cb = MemfitCallback("8GiB", batch_size=256, precisions=("bf16-mixed",))
        >>> trainer = L.Trainer(precision="bf16-mixed", callbacks=[cb])
        >>> trainer.fit(module, DataLoader(dataset, batch_size=256))  # doctest: +SKIP
        >>> cb.plan.accumulation, cb.report.at_peak["optimizer_state"]  # doctest: +SKIP
    """

    def __init__(self, budget: int | str | None = None, batch_size: int | None = None, *, plan: Plan | None = None,
                 simulate: bool = False, max_retries: int = 8, on_nonfinite: str = "skip",
                 track_steps: int | None = 2, **plan_options: Any) -> None:
        if plan is not None:
            if not isinstance(plan, Plan):
                raise UsageError(f"MemfitCallback(plan=...) takes a memfit.Plan (from memfit.plan or plan_module), "
                                 f"got {type(plan).__name__}")
            if plan_options:
                raise UsageError(f"MemfitCallback got plan= and planning options ({', '.join(sorted(plan_options))}); "
                                 "the options are for the plan the callback makes: give one or the other")
            if batch_size is not None and batch_size != plan.batch_size:
                raise UsageError(f"MemfitCallback(batch_size={batch_size!r}) differs from the plan's effective batch "
                                 f"of {plan.batch_size}; leave batch_size out to use the plan's")
            batch_size = plan.batch_size
            budget = plan.budget if budget is None else budget
        elif budget is None or batch_size is None:
            raise UsageError("MemfitCallback needs the device's budget and the effective batch, e.g. "
                             "MemfitCallback('24GiB', batch_size=256), or a ready plan: MemfitCallback(plan=plan)")
        positive_int(batch_size, "MemfitCallback batch_size", hint="the effective batch: samples per optimizer step")
        if not (isinstance(budget, str) and budget.strip().lower() == "auto"):
            parse_bytes(budget)
        elif simulate:
            raise UsageError("MemfitCallback(simulate=True) needs a budget in bytes, such as '64MiB', not 'auto'")
        for name in plan_options:
            if name in _REFUSED:
                raise UsageError(f"MemfitCallback does not take the plan option {name}=: {_REFUSED[name]}")
            if name not in _PLAN_OPTIONS:
                raise UsageError(f"MemfitCallback got an unknown option {name}=; the planning options are "
                                 f"{', '.join(_PLAN_OPTIONS)}")
        if not isinstance(simulate, bool):
            raise UsageError(f"MemfitCallback(simulate=...) must be True or False, got {simulate!r}")
        check_options(max_retries, None, None, on_nonfinite, None, 1.0)
        if track_steps is not None and (isinstance(track_steps, bool) or not isinstance(track_steps, int)
                                        or track_steps < 0):
            raise UsageError(f"MemfitCallback(track_steps=...) must be a whole number >= 0 or None (every step), "
                             f"got {track_steps!r}")
        self.budget = budget
        self.batch_size = batch_size
        self.simulate = simulate
        self.max_retries = max_retries
        self.on_nonfinite = on_nonfinite
        self.track_steps = track_steps
        self.plan_options = dict(plan_options)
        self._given = plan
        self._plan: Plan | None = plan
        self._step: LightningStep | None = None
        self._trainer: Any = None

    # ------------------------------------------------------------------ results

    @property
    def plan(self) -> Plan | None:
        """The plan applied (the given one, or the one made in ``on_train_start``), its globs on the module."""
        return self._plan

    @property
    def engine(self) -> Trainer | None:
        """The :class:`memfit.Trainer` that runs the steps (from ``on_train_start`` on)."""
        return self._step.engine if self._step is not None else None

    @property
    def config(self):
        """The :class:`memfit.Config` in use: the plan's, or a smaller one after an out-of-memory re-plan."""
        return self.engine.config if self.engine is not None else self._plan.config if self._plan else None

    @property
    def report(self):
        """The :class:`memfit.MemoryReport` of the tracked step with the highest peak (None before one ran)."""
        return self._step.report if self._step is not None else None

    @property
    def peak(self) -> int | None:
        """The highest step peak in bytes (tracked steps, and every step on CUDA or under ``simulate``)."""
        return self._step.peak if self._step is not None else None

    @property
    def oom_events(self) -> tuple:
        """The out-of-memory errors recovered from, each a :class:`memfit.OOMEvent`."""
        return tuple(self._step.oom_events) if self._step is not None else ()

    # ------------------------------------------------------------------ Lightning's hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._step = None  # a new run: its own step, engine and report
        _check_trainer(trainer, pl_module, self.simulate)
        if self._given is not None:
            self._plan = self._checked(self._given, trainer, pl_module)
        ignored = [h for h in _IGNORED_HOOKS if is_overridden(h, pl_module)]
        if ignored:
            warnings.warn(f"MemfitCallback runs backward and the optimizer step through memfit's engine: "
                          f"{type(pl_module).__name__}'s {', '.join(ignored)} will not be called; move per-step "
                          "changes to an LR scheduler or on_before_optimizer_step", UserWarning, stacklevel=2)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loader = single_loader(trainer.train_dataloader)
        check_loader(loader, self.batch_size)
        if len(trainer.optimizers) != 1:
            raise UsageError(f"configure_optimizers made {len(trainer.optimizers)} optimizers; MemfitCallback steps "
                             "exactly one")
        optimizer = trainer.optimizers[0]
        device = trainer.strategy.root_device
        if self._given is None:
            sample = sample_from_loader(loader, self.batch_size)
            sample = trainer.precision_plugin.convert_input(sample)
            sample = pl_module.on_after_batch_transfer(pl_module.on_before_batch_transfer(sample, 0), 0)
            workload = module_workload(pl_module, sample, optimizer=optimizer)  # the optimizer's class and defaults
            options = {"device": device.type, "precisions": (trainer.precision,), **self.plan_options}
            self._plan = self._checked(plan(workload, self.budget, self.batch_size, **options), trainer, pl_module)
        self._trainer = trainer
        step = LightningStep(trainer, pl_module, batch_size=self.batch_size, track_steps=self.track_steps,
                             log=self._log)
        # Clipping is Lightning's (configure_gradient_clipping, in the step's pre-update hook), not the engine's.
        step.engine = Trainer.from_parts(pl_module, optimizer, step.loss, self._plan, device=device,
                                         budget=self.budget if self.simulate else None, max_retries=self.max_retries,
                                         on_nonfinite=self.on_nonfinite)
        step.install()
        self._step = step
        self._log({"memfit/planned_bytes": self._plan.required, "memfit/budget_bytes": self._plan.budget}, True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._step is not None:
            self._step.begin_batch()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pl_module.automatic_optimization = True  # a batch whose training_step never ran left it manual

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        metrics: dict[str, Any] = {}
        if self.peak is not None:
            metrics["memfit/peak_bytes"] = self.peak
        if self.report is not None:
            metrics.update({f"memfit/at_peak/{name}": value for name, value in self.report.at_peak.items()})
        if self.engine is not None:
            metrics["memfit/micro_batch"] = self.engine.config.micro_batch
            metrics["memfit/retries"] = self.engine.retries
        self._log(metrics, True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._step is not None:
            self._step.uninstall()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._step is not None:
            self._step.uninstall()  # Lightning calls no teardown hook after an exception

    # ------------------------------------------------------------------ helpers

    def _checked(self, p: Plan, trainer: Any, module: Any) -> Plan:
        """``p`` if the Lightning run can train it exactly: its precision the L.Trainer's, its globs on the module."""
        if p.config.strategy != "single" or p.config.optimizer_in_backward:
            raise UsageError(f"the plan uses {p.config.describe()}; MemfitCallback trains one device with the "
                             "optimizer stepped after backward: plan with the default strategy and optimizer")
        if p.config.precision != trainer.precision:
            raise UsageError(
                f"the plan trains in precision {p.config.precision!r}, but the L.Trainer was made with "
                f"precision={trainer.precision!r}, which Lightning fixes when it is made; make it with "
                f"L.Trainer(precision={p.config.precision!r}) (trainer_kwargs(plan) gives it), or plan with "
                f"precisions=({trainer.precision!r},)")
        return rebase_plan(p, module)

    def _log(self, metrics: dict[str, Any], always: bool) -> None:
        """Write ``metrics`` to the loggers (int bytes, exact): ``always``, or every ``log_every_n_steps`` steps."""
        trainer = self._trainer
        every = trainer.log_every_n_steps
        steps = trainer.global_step
        if not metrics or (not always and (every == 0 or steps % every)):
            return
        # Lightning logs a batch's metrics at the count of steps before it.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(steps - 1, 0))


def _check_trainer(trainer: Any, module: Any, simulate: bool) -> None:
    """What the Lightning run must be for the plan to be applied exactly; a UsageError naming the setting if not."""
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise UsageError(f"MemfitCallback trains on one device, and the L.Trainer runs "
                         f"{type(trainer.strategy).__name__} over several; make it with L.Trainer(devices=1), or "
                         "train several GPUs with memfit.Trainer and Config(strategy='ddp') under torchrun")
    if trainer.accumulate_grad_batches != 1:
        raise UsageError(f"L.Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) accumulates whole "
                         "batches; MemfitCallback accumulates micro-batches inside each batch as the plan says: make "
                         "the L.Trainer with accumulate_grad_batches=1 and the DataLoader with the effective batch")
    if not module.automatic_optimization:
        raise UsageError(f"{type(module).__name__} uses manual optimization (automatic_optimization = False): its "
                         "training_step steps the optimizer itself, which MemfitCallback does; return the loss from "
                         "training_step with automatic optimization")
    if trainer.precision not in PRECISIONS:
        raise UsageError(f"L.Trainer(precision={trainer.precision!r}) is not a precision memfit trains in; use one of "
                         f"{', '.join(PRECISIONS)}")
    if simulate and trainer.strategy.root_device.type != "cpu":
        raise UsageError(f"MemfitCallback(simulate=True) simulates a device on the CPU; this run is on "
                         f"{trainer.strategy.root_device}, whose own memory is the limit: leave simulate out")


def trainer_kwargs(p: Plan) -> dict[str, Any]:
    """The ``L.Trainer`` arguments a plan needs: its precision, and no accumulation of Lightning's own.

    Example:
        >>> p = plan_module(module, loader, "8GiB", precisions=("32-true", "bf16-mixed"))  # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[MemfitCallback(plan=p)], **trainer_kwargs(p))
    """
    if not isinstance(p, Plan):
        raise UsageError(f"trainer_kwargs() takes a memfit.Plan, got {type(p).__name__}")
    return {"precision": p.config.precision, "accumulate_grad_batches": 1}


def module_workload(module: Any, batch: Any, *, optimizer: Any = None) -> Workload:
    """A :class:`memfit.Workload` of a LightningModule: the module, ``batch``'s samples, its ``training_step``.

    ``batch`` is one batch as the dataloader yields it (its rows are repeated or cut to any size).
    ``optimizer`` is an optimizer or a factory ``params -> optimizer``; by default the one
    ``module.configure_optimizers()`` returns (built once, on the module's parameters, to read its class
    and defaults).
    """
    _check_module(module, "module_workload")
    if optimizer is None:
        try:
            made = module.configure_optimizers()
        except RuntimeError as exc:  # it read self.trainer, which a module outside fit does not have
            raise UsageError(f"{type(module).__name__}.configure_optimizers() failed outside a Trainer ({exc}); pass "
                             "optimizer=, e.g. optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3)") from exc
        optimizer = single_optimizer(made, type(module).__name__)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer_factory(optimizer)
    elif not callable(optimizer):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer or a factory params -> optimizer, got "
                         f"{type(optimizer).__name__}")
    return Workload(model=module, batch=SampleBatch(batch), loss=module_loss(module), optimizer=optimizer,
                    name=type(module).__name__)


def plan_module(module: Any, dataloader: Any, budget: int | str, batch_size: int | None = None, *,
                optimizer: Any = None, **plan_options: Any) -> Plan:
    """:func:`memfit.plan` for a LightningModule and its train dataloader, before the ``L.Trainer`` is made.

    ``batch_size`` defaults to the dataloader's (the effective batch); ``plan_options`` are
    :func:`memfit.plan`'s (``precisions``, ``device``: by default CUDA when available, else CPU, ...).
    Give the plan to ``MemfitCallback(plan=...)`` and the L.Trainer ``**trainer_kwargs(plan)``.
    """
    _check_module(module, "plan_module")
    if batch_size is None:
        batch_size = loader_batch(dataloader)
        if batch_size is None:
            raise UsageError("plan_module() needs batch_size= (the effective batch): the dataloader does not say it")
    positive_int(batch_size, "plan_module batch_size", hint="the effective batch: samples per optimizer step")
    check_loader(dataloader, batch_size)
    sample = module.on_after_batch_transfer(module.on_before_batch_transfer(
        sample_from_loader(dataloader, batch_size), 0), 0)
    options = {"device": "cuda" if torch.cuda.is_available() else "cpu", **plan_options}
    return plan(module_workload(module, sample, optimizer=optimizer), budget, batch_size, **options)


def _check_module(module: Any, caller: str) -> None:
    if not isinstance(module, pl.LightningModule):
        raise UsageError(f"{caller}() takes a lightning.pytorch.LightningModule, got {type(module).__name__}")
