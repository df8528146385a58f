"""fit_batch: a decorator that trains a step function on your whole batch, in micro-batches that fit.

Accelerate's ``find_executable_batch_size`` restarts the decorated function with a
smaller batch size after an out-of-memory error (90% of it in accelerate 1.15; older
releases halved it): training goes on, with another effective batch than the one asked for, so
the learning rate, the noise of the gradient and the results change with the card.
``fit_batch`` gives the same convenience and keeps the batch: the function computes
the loss of one micro-batch, and each call of the decorated function

1. splits the batch it is given into micro-batches no larger than the largest that
   fits (predicted once, before the first run, by :mod:`memfit.searcher`'s estimates
   on fake tensors: no memory is used and nothing runs out), balanced as
   :func:`memfit.config.balanced_micro_batch` does (10 samples at most 4 a time:
   4, 4, 2);
2. runs them through :class:`memfit.Trainer` (:meth:`memfit.Trainer.from_parts`): each
   micro-batch's mean loss weighted by its share of the samples (``n_i / N``), or a
   ``(loss_sum, n_items)`` loss divided by the items of the whole batch, backward,
   and one optimizer step (gradients then set to None): the full batch's gradients;
3. on ``torch.OutOfMemoryError`` (CUDA's, or :func:`memfit.simulate_budget`'s), the
   Trainer's guard drops the failed attempt's gradients, restores what it changed, and
   redoes the same samples with half the micro-batch; the smaller size is kept for later
   calls. At micro-batch 1 it raises :class:`memfit.OutOfMemory` with its ``fixes``,
   the model and optimizer as they were before the call.

Example:
    >>> model = torch.nn.Linear(784, 10)
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> @memfit.fit_batch(budget="8GiB", model=model, optimizer=optimizer)   # budget="auto" on CUDA
    ... def train_step(batch):                       # called with micro-batches of the batch
    ...     x, y = batch
    ...     return F.cross_entropy(model(x), y)      # the micro-batch's mean loss, or (loss_sum, n_items)
    >>> result = train_step((torch.randn(256, 784), torch.randint(0, 10, (256,))))   # one optimizer step
    >>> result.loss, result.micro_batches, result.retries          # a memfit.StepResult

The budget: on a CUDA model the bytes the prediction plans for (``"auto"``: what this
process can still use of the card; out-of-memory errors come from the card itself); on a
CPU model a simulated device of that size (:func:`memfit.simulate_budget`), as
:class:`memfit.Trainer` runs one.

Known limitations:
* The function is estimated by running it on fake tensors, with the model's
  parameters and buffers swapped for fake ones (``torch.func.functional_call``).
  Where that cannot run (the function reads a value with ``.item()``, uses a real tensor
  other than the model's, moves the batch to a device itself), the first call starts from
  the whole batch and halves on out-of-memory instead, logged once; the math is the same.
* The prediction is made on the first batch (again for a batch larger than any before,
  until an out-of-memory error has lowered the size): a later batch whose samples need
  more memory (longer sequences) finds its micro-batch by out-of-memory and retry.
* Checkpointing, offload and several GPUs are :class:`memfit.Trainer`'s: use it (with
  :func:`memfit.plan`) for those; ``precision`` is the one Config setting passed here.
* memfit's estimate cache (:mod:`memfit.traces`, the last few traces) refers to the model
  until later estimates push it out; ``memfit.traces.clear()`` drops it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from memfit._tree import map_tensors, tensors
from memfit.config import Config, balanced_micro_batch, check_precision
from memfit.devices import default_profile
from memfit.engine import StepResult, Trainer
from memfit.errors import UsageError
from memfit.searcher import Searcher
from memfit.units import format_budget, parse_bytes
from memfit.workload import Workload, batch_size_of

__all__ = ["fit_batch", "FitBatch"]

log = logging.getLogger("memfit")

_AUTO_MARGIN = 0.05
"""``budget="auto"`` plans for 95% of what the process can use: the allocator's fragmentation and
other libraries' buffers are not in the estimate (the planner's margin, :mod:`memfit.planner`)."""


def fit_batch(
    fn: Callable[[Any], Any] | None = None,
    *,
    budget: int | str = "auto",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str = "32-true",
    max_retries: int = 8,
) -> Any:
    """Decorate a one-micro-batch step function so that each call trains on a whole batch exactly.

    Args:
        fn: ``fn(micro_batch) -> loss``, the micro-batch's mean loss (a scalar tensor) or
            ``(loss_sum, n_items)`` for a token-level loss. It computes the loss only:
            memfit runs backward, the optimizer step and ``zero_grad``.
        budget: device bytes: an int, ``"8GiB"``, a card's name (``"h100"``), or ``"auto"``
            (CUDA: what this process can use of the card now, 5% kept aside). On a CPU model
            the steps run on a simulated device of this size.
        model: the module ``fn`` trains (its parameters' device is where micro-batches go).
        optimizer: the optimizer over ``model``'s parameters, stepped once per call.
        precision: :data:`memfit.PRECISIONS` (``"bf16-mixed"`` runs ``fn`` under autocast;
            a ``*-true`` precision casts the model in place at the first call).
        max_retries: out-of-memory re-plans per batch before :class:`memfit.OutOfMemory`.

    Returns:
        A decorator; with ``fn`` given, the :class:`FitBatch` itself. Calling it with a batch
        (tensors with the samples on dimension 0, in any tuples, lists and dicts) returns a
        :class:`memfit.StepResult`.

    Raises:
        memfit.UsageError: no model or optimizer, a budget that is not a positive size,
            ``"auto"`` on a CPU model, an optimizer over other parameters.

    Example:
        >>> @memfit.fit_batch(budget="auto", model=model, optimizer=optimizer)
        ... def train_step(batch):
        ...     return F.cross_entropy(model(batch[0]), batch[1])
    """
    def decorate(function: Callable[[Any], Any]) -> FitBatch:
        return FitBatch(function, budget=budget, model=model, optimizer=optimizer, precision=precision,
                        max_retries=max_retries)

    return decorate(fn) if fn is not None else decorate


class FitBatch:
    """A step function trained on whole batches in micro-batches that fit; see the module docstring.

    Built by :func:`fit_batch`. Calling it with a batch returns a :class:`memfit.StepResult`:
    ``loss`` (the whole batch's mean), ``samples``, ``micro_batches`` (summing to the batch),
    ``retries`` and ``oom_events`` (the out-of-memory errors recovered from), ``peak``.
    """

    def __init__(self, fn: Callable[[Any], Any], *, budget: int | str, model: nn.Module | None,
                 optimizer: torch.optim.Optimizer | None, precision: str, max_retries: int) -> None:
        name = getattr(fn, "__name__", "the step function")
        if model is None or optimizer is None:
            raise UsageError(
                f"fit_batch needs model= and optimizer= (missing: "
                f"{', '.join(k for k, v in (('model', model), ('optimizer', optimizer)) if v is None)}): memfit "
                "discards a failed attempt's gradients, steps the optimizer once per batch and predicts the "
                "micro-batch from the model, which it cannot do exactly without them; write "
                "@memfit.fit_batch(budget='8GiB', model=model, optimizer=optimizer)")
        _check_parts(fn, name, model, optimizer)
        check_precision(precision, "fit_batch(precision=...)")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise UsageError(f"fit_batch(max_retries=...) must be a whole number >= 0, got {max_retries!r}")
        first = next(iter(model.parameters()), None)
        if first is None:
            raise UsageError(f"fit_batch: the model {type(model).__name__} has no parameters to train")
        self.device = first.device
        self._budget = _check_budget(budget, self.device)
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.max_retries = max_retries
        self.predicted: int | None = None
        """The micro-batch predicted to fit before the first run; None before it, or where no estimate could be made."""
        self._name = name
        self._trainer: Trainer | None = None
        self._largest: int | None = None  # the micro-batch the next batch is split by (before balancing)
        self._limit = 0  # the batch size the prediction searched up to
        self._shrunk = False  # an out-of-memory error lowered the size: predictions no longer lead
        self._step_module = _StepModule(model, fn)

    @property
    def micro_batch(self) -> int | None:
        """The largest micro-batch the next call splits its batch by (None before the first call)."""
        return self._largest

    @property
    def trainer(self) -> Trainer | None:
        """The :class:`memfit.Trainer` that runs the steps (made at the first call): its counters, ``save()``."""
        return self._trainer

    @property
    def budget(self) -> int | str:
        """The budget in bytes, or ``"auto"`` until the first call reads the card."""
        return self._budget

    def __call__(self, batch: Any) -> StepResult:
        """Train on ``batch`` (all its samples, one optimizer step); see the module docstring.

        Raises:
            memfit.OutOfMemory: micro-batch 1 ran out (or ``max_retries`` re-plans did not fit); the model,
                optimizer and gradients are as before the call, and the next call starts from the size before.
            memfit.UsageError: a batch without a batch dimension, or empty; a function that returns no scalar loss,
                or runs backward, ``zero_grad`` or ``optimizer.step()`` itself.
        """
        n = self._batch_size(batch)
        if self._trainer is None:
            self._start(batch, n)
        elif n > self._limit and self.predicted is not None and not self._shrunk and self._largest == self._limit:
            self._predict(batch, n)  # the whole of every batch so far fitted: a larger one may too
        trainer = self._trainer
        micro = balanced_micro_batch(n, min(self._largest, n))
        if trainer.config.micro_batch != micro:
            trainer.use(dataclasses.replace(trainer.config, micro_batch=micro))
        result = trainer.step(batch)
        if result.retries and trainer.config.micro_batch < self._largest:
            self._largest = trainer.config.micro_batch  # the guard re-planned: later batches start from there
            self._shrunk = True
        return result

    # ------------------------------------------------------------------ the first call

    def _start(self, batch: Any, n: int) -> None:
        """Resolve the budget, predict the micro-batch, build the Trainer."""
        if self._budget == "auto":
            self._budget = _auto_budget(self.device)
        self._predict(batch, n)
        self._trainer = Trainer.from_parts(self.model, self.optimizer, self._loss,
                                           Config(micro_batch=self._largest, precision=self.precision),
                                           budget=self._budget, max_retries=self.max_retries)

    def _predict(self, batch: Any, n: int) -> None:
        """The largest micro-batch up to ``n`` that the estimate fits in the budget (the whole batch where none can be made)."""
        self._limit = n
        target = "cuda" if self.device.type == "cuda" else "cpu"
        template = map_tensors(batch, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
        workload = Workload(model=self.model, batch=functools.partial(_zeros_like, template), loss=self._fake_loss,
                            optimizer=self._fake_optimizer, name=self._name)
        base = Config(micro_batch=1, precision=self.precision)
        try:
            searcher = Searcher(workload, target, batch_size=n)
            # The whole batch in one step keeps no gradients across micro-steps: it may fit where n - 1 samples
            # accumulating do not, so it is asked first, and the search (memory monotone in m) runs below it.
            if searcher.fits(dataclasses.replace(base, micro_batch=n), self._budget):
                m = n
            else:
                m = searcher.largest_micro_batch(base, self._budget, n - 1) if n > 1 else 0
        except _StepError:
            raise  # the function returns the wrong thing: its error, not a missing prediction
        except Exception as exc:  # noqa: BLE001 - any error of the fake run: train without a prediction
            self.predicted = None
            self._largest = n
            log.warning("memfit.fit_batch: could not predict %s's micro-batch on fake tensors (%s: %s); starting "
                        "from the whole batch of %d and halving on out-of-memory (the math is the same)",
                        self._name, type(exc).__name__, str(exc).split("\n")[0], n)
            return
        if m == 0:
            log.warning("memfit.fit_batch: the estimate says not even a micro-batch of 1 of %s fits in %s; "
                        "trying 1", self._name, format_budget(self._budget))
        self.predicted = self._largest = max(m, 1)
        log.info("memfit.fit_batch: %s: micro-batch %d predicted to fit in %s (batch of %d)", self._name,
                 self._largest, format_budget(self._budget), n)

    # ------------------------------------------------------------------ the step function, run and checked

    def _loss(self, _model: nn.Module, micro: Any) -> Any:
        """The Trainer's loss: ``fn(micro)``, checked for what it returned and for steps it must leave to memfit."""
        before = self._grads()
        handle = self.optimizer.register_step_pre_hook(self._refuse_step)
        try:
            out = self.fn(micro)
        finally:
            handle.remove()
        if self._grads() != before:
            raise _StepError(f"{self._name}() changed the gradients (it called backward() or zero_grad()); under "
                             "fit_batch it returns the micro-batch's loss only: memfit runs backward, the optimizer "
                             "step and zero_grad once per batch")
        return self._checked(out)

    def _fake_loss(self, model: nn.Module, micro: Any) -> Any:
        """``fn(micro)`` with the user's model holding the fake model's tensors (the estimate runs it on those)."""
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        out = functional_call(self._step_module, {f"model.{k}": v for k, v in state.items()}, (micro,), strict=True)
        return self._checked(out)

    def _fake_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The user's optimizer rebuilt over the fake parameters: its type and every group's settings."""
        # The fake model is a copy of the user's (cut to fewer blocks where the estimator shortens a deep
        # model, which it does to the user's model too while it runs): parameters pair up in order.
        fake = dict(zip((id(p) for p in self.model.parameters()), params))
        groups = []
        for group in self.optimizer.param_groups:
            own = [fake[id(p)] for p in group["params"] if id(p) in fake]
            if own:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": own})
        try:
            return type(self.optimizer)(groups, **self.optimizer.defaults)
        except TypeError:  # an optimizer whose defaults are not all constructor arguments: the groups say them
            return type(self.optimizer)(groups)

    def _checked(self, out: Any) -> Any:
        """``out`` if it is a loss the Trainer can weigh: a scalar that requires grad, or ``(loss_sum, n_items)``."""
        token = isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor)
        loss = out[0] if token else out
        forms = "return the micro-batch's mean loss (a scalar tensor), or (loss_sum, n_items) for a token-level loss"
        if not isinstance(loss, torch.Tensor):
            what = "a number (.item() or float() cut it from the graph)" if isinstance(out, (int, float)) else \
                f"a {type(out).__name__}"
            raise _StepError(f"{self._name}() returned {what}; {forms}")
        if loss.dim() != 0:
            raise _StepError(f"{self._name}() returned a {'loss_sum' if token else 'loss'} of shape "
                             f"{tuple(loss.shape)}, not a scalar; {forms} (e.g. .mean() over the micro-batch)")
        if not loss.requires_grad:
            raise _StepError(f"{self._name}() returned a loss that does not require grad (computed under "
                             "torch.no_grad(), or detached); return the loss tensor itself")
        return out

    def _grads(self) -> list[tuple[int, int] | None]:
        """Each parameter's gradient as (object, version): backward or zero_grad inside ``fn`` changes it."""
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.model.parameters()]

    def _refuse_step(self, *_: Any) -> None:
        raise _StepError(f"{self._name}() called optimizer.step(); under fit_batch it returns the micro-batch's "
                         "loss only: memfit steps the optimizer once per batch, after the last micro-batch")

    def _batch_size(self, batch: Any) -> int:
        if not any(t.dim() > 0 for t in tensors(batch)):
            kind = type(batch).__name__ if not isinstance(batch, torch.Tensor) else f"a 0-d tensor ({batch!r})"
            raise UsageError(f"{self._name}(batch): the batch has no tensor with a batch dimension (got {kind}); "
                             "pass tensors with the samples on dimension 0, e.g. (x of shape (B, ...), y of shape "
                             "(B,)), in tuples, lists or dicts")
        n = batch_size_of(batch)
        if n == 0:  # before anything runs: no micro-batch to split, no mean to weigh, no step to take
            raise UsageError(f"{self._name}(batch): the batch is empty (0 samples on dimension 0); each call takes "
                             "one optimizer step over the batch's samples: skip empty batches, e.g. "
                             f"`if len(x): {self._name}(batch)`")
        return n


class _StepError(UsageError):
    """The step function did something fit_batch cannot train exactly (a wrong return, its own backward or step)."""


class _StepModule(nn.Module):
    """The user's model as a submodule, ``forward`` the step function: ``functional_call`` swaps the model's tensors."""

    def __init__(self, model: nn.Module, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, micro: Any) -> Any:
        return self.fn(micro)


def _zeros_like(template: Any, n: int) -> Any:
    """``n`` samples shaped like the template's (zeros: on fake tensors only shapes and dtypes count)."""
    return map_tensors(template, lambda t: torch.zeros((n, *t.shape[1:]) if t.dim() else (), dtype=t.dtype))


def _check_parts(fn: Any, name: str, model: Any, optimizer: Any) -> None:
    if not callable(fn):
        raise UsageError(f"fit_batch decorates a function micro_batch -> loss, got {type(fn).__name__}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"fit_batch(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"fit_batch(optimizer=...) must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in params)
    if foreign:
        raise UsageError(f"fit_batch: {foreign} of the optimizer's {len(params)} parameters are not the model's; "
                         "build the optimizer on this model's parameters, e.g. torch.optim.AdamW(model.parameters())")
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        raise UsageError(
            f"{name}{inspect.signature(fn)}: fit_batch calls the function with one argument, the micro-batch "
            f"(def {name}(batch): return loss); Accelerate's find_executable_batch_size passes a batch size "
            "first, fit_batch splits the batch you pass instead") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass


def _check_budget(budget: Any, device: torch.device) -> int | str:
    """Int bytes > 0, or ``"auto"`` on a CUDA model (read at the first call, when the card is as training finds it)."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        if device.type != "cuda":
            raise UsageError(f"fit_batch(budget='auto') reads the free memory of the CUDA device the model is on, and "
                             f"the model is on {device}; give a size such as budget='2GiB' (on the CPU, memfit "
                             "simulates a device of that size)")
        return "auto"
    size = parse_bytes(budget)
    if size <= 0:
        raise UsageError(f"fit_batch(budget={budget!r}): a budget must be more than 0 bytes; give a size such as "
                         "'8GiB', a card's name such as 'h100', or 'auto' on CUDA")
    return size


def _auto_budget(device: torch.device) -> int:
    """The bytes this process can use on ``device``: free memory plus what torch's allocator holds, less a margin.

    The estimate counts the model's own tensors (already allocated: in the allocator's reserved
    memory) and a CUDA context (this process has one already: it is not in the free figure), so
    both are added back to what the card reports free.
    """
    free, _total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    return int(usable * (1 - _AUTO_MARGIN)) + default_profile().context
