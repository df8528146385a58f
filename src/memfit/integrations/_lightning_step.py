"""The parts of :class:`memfit.integrations.lightning.MemfitCallback`: Lightning's batches through memfit's engine.

:class:`LightningStep` replaces the module's ``training_step`` for the run: each batch Lightning hands
over is one logical batch, which :meth:`memfit.Trainer.step` splits into the plan's micro-batches (the
large batch's math, the out-of-memory guard) and steps the optimizer Lightning built once. Lightning's
own counters (``global_step``), LR schedulers and ``on_before_optimizer_step`` hooks still see one
optimizer step per batch. The rest turns a LightningModule into a :class:`memfit.Workload`
(:func:`module_workload`'s parts: :class:`SampleBatch`, :func:`optimizer_factory`, :func:`module_loss`),
reads the train dataloader (:func:`sample_from_loader`, :func:`check_loader`) and carries a plan's
checkpoint globs over to the module (:func:`rebase_plan`).

Imported by :mod:`memfit.integrations.lightning` only, which has imported Lightning already.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from memfit import _torch_private, rng
from memfit._tree import map_tensors
from memfit.checkpointing import Checkpointing
from memfit.errors import UsageError
from memfit.planner import Plan
from memfit.tracker import MemoryTracker
from memfit.workload import batch_size_of

__all__ = ["LightningStep", "SampleBatch", "optimizer_factory", "single_optimizer", "module_loss", "loss_of",
           "rebase_plan", "sample_from_loader", "single_loader", "loader_batch", "check_loader"]


class LightningStep:
    """The module's ``training_step`` for a run: one logical batch through ``engine`` (a :class:`memfit.Trainer`).

    Lightning decides per batch between automatic and manual optimization; :meth:`begin_batch` (from the
    callback's ``on_train_batch_start``) turns the module to manual for the batch, so that Lightning runs
    no backward or optimizer step of its own, and the step turns it back to automatic when it returns, so
    that Lightning steps the LR schedulers and counts the step with its automatic rules. Before each update
    (a pre-step hook of the optimizer, after the GradScaler has unscaled) it runs what Lightning's automatic
    loop runs there: the ``on_before_optimizer_step`` hooks, then ``configure_gradient_clipping``.

    Args:
        trainer, module: Lightning's Trainer and the LightningModule being fitted. ``engine`` (set
            before :meth:`install`) is the memfit Trainer over ``module`` and the optimizer Lightning
            built, with :meth:`loss` (the module's own ``training_step`` on a micro-batch) as its loss.
        batch_size: the effective batch: the most samples a Lightning batch may have.
        track_steps: logical batches tracked by category (None: all); the reports are kept per step.
    """

    def __init__(self, trainer: Any, module: nn.Module, *, batch_size: int, track_steps: int | None,
                 log: Callable[[dict[str, Any], bool], None]) -> None:
        self.trainer = trainer
        self.module = module
        self.engine: Any = None  # set by the callback: its loss is this step's loss
        own = module.__dict__.get("training_step")  # a step left installed by a run that failed to clean up
        self.original = type(module).training_step.__get__(module) if getattr(own, "_memfit_step", False) \
            else module.training_step  # bound; called once per micro-batch
        self.takes_index = takes_batch_idx(self.original)
        self.batch_size = batch_size
        self.track_steps = track_steps
        self.log = log
        self.batch_idx = 0
        self.steps = 0
        self.peak: int | None = None  # the highest step peak seen, in bytes
        self.report = None  # the MemoryReport of the tracked step with the highest peak
        self.oom_events: list[Any] = []
        self._tracker: MemoryTracker | None = None
        self._handle = None

    # ------------------------------------------------------------------ installed on the module

    def install(self) -> None:
        """Put the step in place of the module's ``training_step``, and the optimizer's pre-step hook."""
        if self.takes_index:
            def training_step(batch: Any, batch_idx: int) -> torch.Tensor:
                return self.run(batch, batch_idx)
        else:
            def training_step(batch: Any) -> torch.Tensor:
                return self.run(batch, None)
        training_step._memfit_step = True
        self.module.training_step = training_step  # an instance attribute: the class's method is untouched
        self._handle = self.engine.optimizer.register_step_pre_hook(self._before_optimizer_step)

    def uninstall(self) -> None:
        """The module as it was: its own ``training_step``, automatic optimization, no checkpoint wrappers."""
        if getattr(self.module.__dict__.get("training_step"), "_memfit_step", False):
            del self.module.training_step
        self.module.automatic_optimization = True
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        Checkpointing.remove(self.module, Checkpointing(self.engine.config.checkpoint).select(self.module))

    def begin_batch(self) -> None:
        """Before Lightning picks the batch's loop: manual, so that it leaves backward and the update to the step."""
        self.module.automatic_optimization = False

    def loss(self, model: nn.Module, micro: Any) -> Any:
        """The engine's loss: the module's own ``training_step`` on one micro-batch."""
        out = self.original(micro, self.batch_idx) if self.takes_index else self.original(micro)
        return loss_of(out, type(self.module).__name__)

    # ------------------------------------------------------------------ one logical batch

    def run(self, batch: Any, batch_idx: int | None) -> torch.Tensor:
        try:
            self._check(batch)
            self.batch_idx = batch_idx
            tracker = self._tracker_for_step()
            # Under Lightning's mixed precision this runs inside its autocast, of the plan's dtype (checked): the
            # engine's own around each forward changes nothing, and backward and the update are as memfit.Trainer
            # runs them (autograd does not autocast backward; torch.optim's ops are on no autocast list).
            if tracker is not None:
                with tracker:
                    tracker.forget_history()  # this step's record only: the peak starts from what is live
                    result = self.engine.step(batch)
            else:
                result = self.engine.step(batch)
            self.steps += 1
            _count_optimizer_step(self.trainer)
            self._record(result, tracker)
            return result.loss_tensor
        finally:
            self.module.automatic_optimization = True

    def _check(self, batch: Any) -> None:
        if isinstance(batch, Iterator):
            raise UsageError("MemfitCallback needs training_step(batch, batch_idx); a training_step that takes the "
                             "dataloader iterator cannot be split into micro-batches")
        n = batch_size_of(batch)
        if n > self.batch_size:
            raise UsageError(f"the train dataloader gave a batch of {n} samples, more than the effective batch "
                             f"MemfitCallback plans for ({self.batch_size}); give DataLoader(batch_size="
                             f"{self.batch_size}): each batch is one optimizer step")

    def _tracker_for_step(self) -> MemoryTracker | None:
        """This step's tracker, where categories are counted now: the engine's simulated device has its own."""
        if self.track_steps is not None and self.steps >= self.track_steps:
            self._tracker = None  # tracking is over: its record goes
            return None
        if device_tracker(self.engine) is not None:
            return None
        if self._tracker is None:
            self._tracker = MemoryTracker(self.module, self.engine.optimizer, device=self.engine.device)
        return self._tracker

    def _record(self, result: Any, tracker: MemoryTracker | None) -> None:
        tracked = self.track_steps is None or self.steps <= self.track_steps
        source = tracker if tracker is not None else device_tracker(self.engine) if tracked else None
        report = source.report() if source is not None else None
        peak = result.peak if result.peak is not None else report.peak if report is not None else None
        if report is not None and (self.report is None or report.peak > self.report.peak):
            self.report = report
        if peak is not None:
            self.peak = peak if self.peak is None else max(self.peak, peak)
        self.oom_events.extend(result.oom_events)
        # The loss tensor is read (one sync) only if a logger writes it.
        metrics: dict[str, Any] = {"memfit/loss": result.loss_tensor, "memfit/micro_steps": len(result.micro_batches),
                                   "memfit/retries": result.retries}
        if peak is not None:
            metrics["memfit/step_peak_bytes"] = peak
        self.log(metrics, False)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """What Lightning's automatic loop does between backward and the update: the ``on_before_optimizer_step``
        hooks, then gradient clipping through ``configure_gradient_clipping`` (``gradient_clip_val``)."""
        trainer, module = self.trainer, self.module
        for callback in trainer.callbacks:
            callback.on_before_optimizer_step(trainer, module, optimizer)
        module.on_before_optimizer_step(optimizer)
        if trainer.gradient_clip_val:
            module.configure_gradient_clipping(optimizer, gradient_clip_val=trainer.gradient_clip_val,
                                              gradient_clip_algorithm=trainer.gradient_clip_algorithm)


def device_tracker(engine: Any) -> MemoryTracker | None:
    """The simulated device a memfit Trainer runs on (a tracker that counts by category), or None.

    memfit.Trainer keeps it as ``_sim``; a public accessor is requested (see the integration's report).
    """
    return getattr(engine, "_sim", None)


def _count_optimizer_step(trainer: Any) -> None:
    """Count the update in Lightning's automatic-optimization progress, which ``trainer.global_step`` reads.

    Lightning counts an automatic step when its own ``optimizer.step()`` returns; the engine stepped the
    optimizer itself, so the count is made here (``max_steps``, schedulers and checkpoints follow it).
    """
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
    progress.increment_ready()
    progress.increment_completed()


def takes_batch_idx(training_step: Callable[..., Any]) -> bool:
    """Whether Lightning passes ``batch_idx`` to this ``training_step`` (its own rule: the name, or two arguments)."""
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    return is_param_in_hook_signature(training_step, "batch_idx", min_args=2)


# ---------------------------------------------------------------------- the module as a Workload


def loss_of(out: Any, owner: str) -> Any:
    """The loss in ``training_step``'s output: a tensor, ``{"loss": ...}``, or ``(loss_sum, n_items)``."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise UsageError(f"{owner}.training_step returned a dict without 'loss' (keys: {sorted(map(str, out))}); "
                             "return the loss tensor, or a dict with the loss under 'loss'")
        return out["loss"]
    if out is None:
        raise UsageError(f"{owner}.training_step returned None, which tells Lightning to skip the batch; under "
                         "MemfitCallback every micro-batch needs a loss: return a mean, or (loss_sum, n_items)")
    return out


def module_loss(module: nn.Module) -> Callable[[nn.Module, Any], Any]:
    """``(model, batch) -> loss`` from the module's class's ``training_step``, for copies of the module.

    The estimator runs it on a copy without a Trainer, where ``self.log`` only warns: that warning is silenced.
    """
    function = type(module).training_step
    index = takes_batch_idx(function)
    owner = type(module).__name__

    def loss(model: nn.Module, batch: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")
            out = function(model, batch, 0) if index else function(model, batch)
        return loss_of(out, owner)

    return loss


class SampleBatch:
    """``n -> batch`` of ``n`` samples shaped like ``batch`` (any nesting; the batch on dimension 0).

    Real tensors repeat the sample's rows (labels and token ids keep valid values); under
    ``FakeTensorMode`` (an estimate) fresh tensors of the same shapes and dtypes are made,
    since a real tensor cannot enter the fake mode.
    """

    def __init__(self, batch: Any) -> None:
        self.batch = map_tensors(batch, lambda t: t.detach().cpu())
        self.size = batch_size_of(self.batch)

    def __call__(self, n: int) -> Any:
        if _torch_private.is_fake(torch.empty(0)):
            return map_tensors(self.batch, lambda t: torch.zeros((n, *t.shape[1:]) if t.dim() else (), dtype=t.dtype))
        index = torch.arange(n) % self.size
        return map_tensors(self.batch, lambda t: t[index] if t.dim() else t.clone())


def sample_from_loader(loader: Any, batch_size: int) -> Any:
    """One batch of up to ``batch_size`` samples as ``loader`` yields them, every random generator left as it was.

    A map-style dataset gives its first samples through the loader's ``collate_fn`` (no worker starts,
    no sampler draws); anything else gives the loader's first batch.
    """
    generators = [g for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None),
                                                                          "generator", None))
                  if isinstance(g, torch.Generator)]
    saved = rng.capture(portable=False), [g.get_state() for g in generators]
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    try:
        # Only where the loader collates samples into batches (batch_size=None hands out the dataset's own items).
        if collate is not None and getattr(loader, "batch_sampler", None) is not None \
                and not isinstance(dataset, torch.utils.data.IterableDataset) \
                and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            count = min(batch_size, len(dataset))
            if count == 0:
                raise UsageError("the train dataloader's dataset is empty; there is nothing to plan or train on")
            return collate([dataset[i] for i in range(count)])
        try:
            return next(iter(loader))
        except StopIteration:
            raise UsageError("the train dataloader yields no batch; there is nothing to plan or train on") from None
    finally:
        rng.restore(saved[0])
        for g, state in zip(generators, saved[1]):
            g.set_state(state)


def loader_batch(loader: Any) -> int | None:
    """The batch size a loader says it yields (a DataLoader's, its batch sampler's), or None."""
    return getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)


def check_loader(loader: Any, batch_size: int) -> None:
    """A loader that says its batch size must yield the effective batch: each of its batches is one step."""
    known = loader_batch(loader)
    if known is not None and known != batch_size:
        raise UsageError(f"the train dataloader yields batches of {known} samples, but the effective batch is "
                         f"{batch_size}; give DataLoader(batch_size={batch_size}): each batch is one optimizer "
                         "step, which memfit splits into the plan's micro-batches")


def single_loader(loaders: Any) -> Any:
    """The one train dataloader of ``trainer.train_dataloader`` (Lightning also takes lists and dicts of them)."""
    if isinstance(loaders, (list, tuple, dict)):
        if len(loaders) != 1:
            raise UsageError(f"MemfitCallback trains from one train dataloader, got {len(loaders)}")
        return next(iter(loaders.values() if isinstance(loaders, dict) else loaders))
    return loaders


def optimizer_factory(optimizer: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer`` of ``optimizer``'s class and defaults (its state's memory follows from them)."""
    cls, defaults = type(optimizer), dict(optimizer.defaults)
    signature = inspect.signature(cls)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        defaults = {k: v for k, v in defaults.items() if k in signature.parameters}
    return lambda params: cls(params, **defaults)


def single_optimizer(out: Any, owner: str) -> torch.optim.Optimizer:
    """The one optimizer in what ``configure_optimizers`` returned (an optimizer, a dict, lists, a pair of lists)."""
    found: list[Any] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.optim.Optimizer):
            found.append(obj)
        elif isinstance(obj, Mapping):
            visit(obj.get("optimizer"))
        elif isinstance(obj, (list, tuple)):
            # ([optimizers], [schedulers]): only the first list holds optimizers.
            items = obj[:1] if len(obj) == 2 and all(isinstance(o, (list, tuple)) for o in obj) else obj
            for item in items:
                visit(item)

    visit(out)
    if len(found) != 1:
        raise UsageError(f"{owner}.configure_optimizers returned {len(found)} optimizers; MemfitCallback steps "
                         "exactly one (one optimizer over all parameters, its groups as you like)")
    return found[0]


# ---------------------------------------------------------------------- a plan's checkpoint globs on the module


def rebase_plan(plan: Plan, module: nn.Module) -> Plan:
    """``plan`` with each checkpoint glob naming modules of ``module``.

    A plan made for the bare network (``encoder.layer.0``) names modules one attribute below a
    LightningModule that holds it (``bert.encoder.layer.0``): such a glob gets the one path prefix
    under which it matches. The plan's alternatives, which a re-plan after an OOM may switch to, too.
    """
    cache: dict[str, str] = {}

    def config(c: Any) -> Any:
        globs = tuple(_rebase_glob(g, module, cache) for g in c.checkpoint)
        return c if globs == c.checkpoint else dataclasses.replace(c, checkpoint=globs)

    alternatives = tuple(dataclasses.replace(a, config=config(a.config)) for a in plan.alternatives)
    return dataclasses.replace(plan, config=config(plan.config), alternatives=alternatives)


def _rebase_glob(glob: str, module: nn.Module, cache: dict[str, str]) -> str:
    if glob in cache:
        return cache[glob]
    if glob == "all" or _matches(glob, module):
        cache[glob] = glob
        return glob
    prefixes = [path for path, sub in module.named_modules() if path and _matches(glob, sub)]
    # The outermost prefixes only: a glob of one component ('*') matches under every level.
    prefixes = [p for p in prefixes if not any(p.startswith(q + ".") for q in prefixes)]
    if len(prefixes) != 1:
        children = ", ".join(name for name, _ in module.named_children()) or "none"
        where = (f"under each of {', '.join(prefixes)}" if prefixes else
                 f"anywhere in {type(module).__name__} (its children: {children})")
        raise UsageError(f"the plan checkpoints {glob!r}, which matches no module of {type(module).__name__} and "
                         f"{'is ambiguous' if prefixes else 'no module'} {where}; plan with the LightningModule "
                         "itself (MemfitCallback plans it when given no plan=), or name the modules by their "
                         "path in it")
    cache[glob] = f"{prefixes[0]}.{glob}"
    return cache[glob]


def _matches(glob: str, module: nn.Module) -> bool:
    try:
        return bool(Checkpointing((glob,)).select(module))
    except UsageError:
        return False
