"""MemoryTracker: counts every tensor storage of a training step, by category and module.

How it counts (and why this way):

* A ``TorchDispatchMode`` sees every aten op below autograd, so it sees the
  outputs of forward, backward and optimizer ops alike, on real tensors, on
  ``FakeTensorMode`` tensors (no memory used) and on CUDA. Each new output
  storage is registered once; views and in-place results share a storage and
  add nothing. A weak reference to the storage tells when it is freed, so a
  storage freed mid-step leaves the count at once.
* Storages are keyed by their ``UntypedStorage`` Python object, which torch
  keeps alive exactly as long as the storage (PyObject preservation), as
  torch's own MemTracker does.
* ``UntypedStorage.resize_`` (how FSDP2 allocates and frees its unsharded
  parameters) is not an aten op, so no dispatch mode sees it: while entered,
  the tracker wraps it, as PyTorch's own ``torch.distributed._tools.mem_tracker``
  does (``_track_resize``). ``Tensor.resize_`` and ``set_`` are seen as ops.
* Categories are roles: the model's parameters and buffers, gradients (seen by
  ``register_post_accumulate_grad_hook`` and before each optimizer step), the
  optimizer's state (seen after each step, so lazily created state counts),
  activations (tensors autograd saves for backward, seen by a
  ``saved_tensors_hooks`` pack hook, and tensors that a checkpoint recomputes
  in backward and keeps), inputs (the batch) and temporaries (the rest). A
  storage that takes several roles gets the strongest for its whole life
  (parameters > buffers > optimizer_state > gradients > inputs > activations >
  temporaries): the bytes of a gradient are a gradient from the backward op
  that allocated them, even though autograd only names them ``.grad`` later.
  More categories can be added (:meth:`MemoryTracker.add_category`), for
  roles a strategy introduces (FSDP's unsharded parameters, communication buffers).
* Each allocation is attributed to the innermost module whose forward (module
  hooks) or backward (``register_multi_grad_hook`` on its outputs and inputs)
  was running (:mod:`memfit.attribution`).

The parts: :mod:`memfit.ledger` keeps the live storages, roles, peak and
history; :mod:`memfit.attribution` knows the running module; :mod:`memfit.replay`
repeats a recorded step; :mod:`memfit.report` replays the history into a report.
This module connects them to PyTorch: the dispatch mode, the saved-tensor hooks,
the parameter and optimizer hooks.

Known limitations:

* Only storages created while the tracker is entered count, plus the model's
  and optimizer's tensors and the tensors passed to the model's forward (the
  batch). Other tensors created before entry do not.
* Memory that no tensor owns (CUDA context, cuBLAS workspace, allocator
  fragmentation and cache) is not counted: this is the figure of
  ``torch.cuda.max_memory_allocated``, not of ``nvidia-smi``. Scratch memory
  inside one kernel is invisible too.
* The activation pack hook is shadowed by any ``saved_tensors_hooks`` the user
  enters inside the tracker (only the innermost pair runs): tensors saved under
  those hooks count as temporaries. ``torch.utils.checkpoint`` is handled.
* Only one tracker should be entered at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memfit._tree import tensors as _tensors
from memfit.categories import CATEGORIES
from memfit.checks import positive_int
from memfit.device import default_device
from memfit.errors import MemfitError
from memfit.ledger import StorageLedger
from memfit.observer import StepObserver
from memfit.replay import repeat_since
from memfit.report import History, MemoryReport, build_report

__all__ = ["MemoryTracker", "track", "CATEGORIES"]

# PyTorch's CUDA caching allocator rounds every block up to 512 bytes
# (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp); max_memory_allocated counts that.
_CUDA_BLOCK = 512


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # Tensors report "cuda:0", never bare "cuda"; compare like with like.
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = torch.device("cuda", index)
    return device


class MemoryTracker:
    """Counts the memory of tensor storages on one device, by category and module.

    Use it through :func:`track`. Every figure is int bytes.

    Args:
        model: the module whose parameters, buffers and gradients count and
            whose submodules get allocations attributed (dotted paths as in
            ``model.named_modules()``, the root being ``""``).
        optimizer: the optimizer whose state counts, including state created
            lazily by its first ``step()``.
        device: the device to count; by default the model's (or optimizer's)
            device, else CUDA when available, else CPU.
        round_to: each storage's bytes are rounded up to a multiple of this;
            by default 512 on CUDA (the caching allocator's block) and 1 elsewhere.
            memfit's estimator passes 512 when fake CPU tensors stand for CUDA.
        sources: also record the line of the model's code that ran each allocating forward op
            (:mod:`memfit.sources`; slower): what :func:`memfit.explain` shows beside the largest tensors.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> with track(model) as tracker:
        ...     model(torch.ones(8, 4)).sum().backward()
        >>> tracker.report().peak_by_category["gradients"]
        40
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str | None = None,
        round_to: int | None = None,
        sources: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise MemfitError(f"track(model=...) takes a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise MemfitError(f"track(optimizer=...) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.device = _normalize_device(device if device is not None else self._infer_device())
        if round_to is None:
            round_to = _CUDA_BLOCK if self.device.type == "cuda" else 1
        positive_int(round_to, "round_to", hint="bytes", error=MemfitError)
        self._ledger = StorageLedger(round_to, self._over_budget)
        self._observer = StepObserver(model, optimizer, self.device, self._ledger, sources=sources)

    # ------------------------------------------------------------------ public

    def __enter__(self) -> MemoryTracker:
        if self._observer.active:
            raise MemfitError("this MemoryTracker is already entered; use one `with` block at a time")
        self._observer.enter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._observer.exit(*exc)

    @property
    def categories(self) -> tuple[str, ...]:
        """This tracker's categories, in display order: :data:`CATEGORIES` and any added."""
        return tuple(self._ledger.names)

    def add_category(self, name: str, *, strength: float) -> None:
        """Add a category of memory for a role memfit does not know (a strategy's buffers).

        ``strength`` places it among the roles a storage can take at once (it keeps
        the strongest): see :data:`memfit.categories.STRENGTH` (parameters 60 ...
        temporaries 0). Give storages the role with :meth:`mark`; reports list it
        after the standard categories.

        Example:
            >>> tracker = MemoryTracker(torch.nn.Linear(4, 2))
            >>> tracker.add_category("all_gather_buffers", strength=5)
            >>> tracker.categories[-1]
            'all_gather_buffers'
        """
        self._ledger.add_category(name, strength)

    def mark_inputs(self, batch: Any) -> None:
        """Count the tensors of ``batch`` (any nesting) as ``inputs``.

        The tensors passed to the model's forward are marked automatically; use
        this for the rest of the batch, such as labels the loss reads.
        """
        self.mark(batch, "inputs")

    def mark(self, tensors: Any, category: str) -> None:
        """Give the tensors in ``tensors`` (any nesting) the role ``category``.

        For state the tracker cannot see on its own, such as a GradScaler's
        scale (``"optimizer_state"``). A storage keeps its strongest role.
        """
        cat = self._ledger.index(category)
        for t in _tensors(tensors):
            self._observer.mark(t, cat)

    @property
    def peak(self) -> int:
        """The highest live bytes seen so far."""
        return self._ledger.peak

    def reset_peak(self) -> None:
        """Start the peak over from the live bytes now (like ``torch.cuda.reset_peak_memory_stats``)."""
        self._ledger.reset_peak()

    def live_bytes(self) -> int:
        """Bytes of counted storages alive now."""
        return self._ledger.live

    def live_by_category(self) -> dict[str, int]:
        """Bytes alive now, by category (roles as known at this moment)."""
        return dict(zip(self._ledger.names, self._ledger.live_cat))

    def forget_history(self) -> None:
        """Drop the history of ops and events, keeping the live storages (as allocated before any op).

        For a tracker entered for a long run (a Trainer's simulated budget): its history
        would grow by every op of every step. Afterwards :meth:`report` covers what ran
        since, starting from what is alive now, and the peak starts over from the live bytes.
        """
        self._ledger.forget_history()

    def position(self) -> tuple[int, int, int, int]:
        """A position in the history, for :meth:`repeat_since`."""
        return self._ledger.position()

    def repeat_since(self, position: tuple[int, int, int, int], times: int = 1) -> bool:
        """Append ``times`` copies of the training step(s) recorded since ``position``, without running them.

        See :func:`memfit.replay.repeat_since`. Returns False, appending nothing,
        when the recorded window cannot be repeated (it freed or resized a storage
        created before it); ``memfit.estimate`` then runs the steps instead.
        """
        return repeat_since(self._ledger, position, times)

    def allocation_events(self) -> list[tuple[int, int, int]]:
        """The raw history: (op index, storage serial, byte delta) per allocation, free or resize.

        Each storage's first event is its allocation (positive), a negative one its
        free. The allocator model of :mod:`memfit.allocator` replays this.
        """
        return list(self._ledger.events)

    def report(self) -> MemoryReport:
        """Everything measured so far, as a :class:`~memfit.report.MemoryReport`."""
        return build_report(**self.history()._asdict())

    def history(self) -> History:
        """The raw record a report is built from (:class:`memfit.report.History`), without copying it."""
        ledger = self._ledger
        return History(
            device=str(self.device),
            fake=self._observer.fake,
            steps=ledger.steps,
            categories=tuple(ledger.names),
            paths=self._observer.modules.paths,
            sid_cat=ledger.sid_cat,
            sid_module=ledger.sid_module,
            events=ledger.events,
            ops=ledger.ops,
            peak=ledger.peak,
            peak_event=ledger.peak_event,
            peak_op=ledger.peak_op,
            live_cat=ledger.live_cat,
            sources=None if (lines := self._observer.sources) is None else lines.by_path(self._observer.modules.paths),
        )

    # ----------------------------------------------------------------- internals

    def _infer_device(self) -> torch.device:
        if self.model is not None:
            for t in self.model.parameters():
                return t.device
            for t in self.model.buffers():
                return t.device
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    return p.device
        return default_device()

    def _over_budget(self, nbytes: int) -> None:
        """Called before an allocation that would cross the ledger's limit; simulate_budget raises here."""


def track(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str | None = None,
    round_to: int | None = None,
    sources: bool = False,
) -> MemoryTracker:
    """Track a training step's memory: ``with memfit.track(model, opt) as t: ...``.

    Returns a :class:`MemoryTracker` to use as a context manager; after the
    block, ``t.report()`` gives peak, categories, modules and the timeline in
    int bytes. Works on real tensors, under ``FakeTensorMode`` (enter the fake
    mode first) and on CUDA; one tracker may be entered again for more steps.
    """
    return MemoryTracker(model, optimizer, device=device, round_to=round_to, sources=sources)
