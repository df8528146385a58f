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
* Each allocation is attributed to the innermost module whose forward (module
  hooks) or backward (``register_multi_grad_hook`` on its outputs and inputs)
  was running.

Known limitations:

* Only storages created while the tracker is entered count, plus the model's
  and optimizer's tensors and the tensors passed to the model's forward (the
  batch). Other tensors created before entry do not.
* Memory that no tensor owns (CUDA context, cuBLAS workspace, allocator
  fragmentation and cache) is not counted: this is the figure of
  ``torch.cuda.max_memory_allocated``, not of ``nvidia-smi``. Scratch memory
  inside one kernel is invisible too.
* ``UntypedStorage.resize_`` called directly (FSDP's parameter storage) is not
  seen; ``Tensor.resize_`` is.
* The activation pack hook is shadowed by any ``saved_tensors_hooks`` the user
  enters inside the tracker (only the innermost pair runs): tensors saved under
  those hooks count as temporaries. ``torch.utils.checkpoint`` is handled.
* Only one tracker should be entered at a time.
"""

from __future__ import annotations

import functools

import weakref
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks

from memfit import _torch_private
from memfit._tree import tensors as _tensors
from memfit.categories import CATEGORIES, PHASES
from memfit.checks import positive_int
from memfit.device import default_device
from memfit.errors import MemfitError
from memfit.report import MemoryReport, build_report

__all__ = ["MemoryTracker", "track", "CATEGORIES"]

PARAMETERS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, INPUTS, TEMPORARIES = range(7)
# Strength of each role; a storage keeps the strongest role it ever took.
_RANK = {PARAMETERS: 6, BUFFERS: 5, OPTIMIZER_STATE: 4, GRADIENTS: 3, INPUTS: 2, ACTIVATIONS: 1, TEMPORARIES: 0}
_FORWARD, _BACKWARD, _OPTIMIZER = range(3)
assert PHASES == ("forward", "backward", "optimizer")
# PyTorch's CUDA caching allocator rounds every block up to 512 bytes
# (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp); max_memory_allocated counts that.
_CUDA_BLOCK = 512


class _Storage:
    """A live storage: its serial id, current size and role, and the weak reference."""

    __slots__ = ("sid", "nbytes", "cat", "ref")

    def __init__(self, sid: int, nbytes: int, cat: int, ref: weakref.ref) -> None:
        self.sid = sid
        self.nbytes = nbytes
        self.cat = cat
        self.ref = ref


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # Tensors report "cuda:0", never bare "cuda"; compare like with like.
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = torch.device("cuda", index)
    return device


class _Mode(_torch_private.TorchDispatchMode):
    """Sees each aten op's outputs and hands them to the tracker."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return self.tracker._after_op(func, out, args, kwargs)


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
        self._round = round_to
        self._limit: int | None = None  # set by memfit.simulate_budget

        self._recs: dict[int, _Storage] = {}  # id(storage object) -> live storage
        self._live = 0
        self._live_cat = [0] * len(CATEGORIES)
        self._peak = 0
        self._peak_event = 0
        self._peak_op = 0
        # Append-only history, replayed by report(): per storage (by sid) its final role
        # and module; events (op index, sid, byte delta); ops (aten op, module, phase, step).
        self._sid_cat: list[int] = []
        self._sid_module: list[int] = []
        self._events: list[tuple[int, int, int]] = []
        self._ops: list[tuple[Any, int, int, int]] = []

        self._paths: list[str] = []
        self._module_ids: dict[int, int] = {}
        if model is not None:
            for path, module in model.named_modules():
                self._module_ids[id(module)] = len(self._paths)
                self._paths.append(path)
        self._root = 0 if model is not None else -1
        self._fw_stack: list[int] = []
        self._bw_stack: list[int] = []
        self._in_optimizer = False
        self._steps = 0
        self._recompute: dict[int, None] = {}  # storages a checkpoint recomputed in this segment
        self._quiet = 0  # >0 while memfit itself runs ops (detach in the pack hook)
        self._fake = False
        self._active = False
        self._handles: list[Any] = []
        self._hooked_params: set[int] = set()
        self._mode: _Mode | None = None
        self._saved_hooks: saved_tensors_hooks | None = None

    # ------------------------------------------------------------------ public

    def __enter__(self) -> MemoryTracker:
        if self._active:
            raise MemfitError("this MemoryTracker is already entered; use one `with` block at a time")
        self._active = True
        try:
            self._install_hooks()
            self._scan_states()
        except BaseException:
            self._remove_hooks()
            self._active = False
            raise
        # Saved-tensor hooks first, dispatch mode second: they leave in reverse order.
        self._saved_hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
            if self._saved_hooks is not None:
                self._saved_hooks.__exit__(*exc)
        finally:
            self._mode = None
            self._saved_hooks = None
            self._promote_recomputed()
            self._remove_hooks()
            self._fw_stack.clear()
            self._bw_stack.clear()
            self._in_optimizer = False
            self._active = False

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
        if category not in CATEGORIES:
            raise MemfitError(f"unknown category {category!r}; the categories are: {', '.join(CATEGORIES)}")
        cat = CATEGORIES.index(category)
        for t in _tensors(tensors):
            self._mark(t, cat)

    @property
    def peak(self) -> int:
        """The highest live bytes seen so far."""
        return self._peak

    def reset_peak(self) -> None:
        """Start the peak over from the live bytes now (like ``torch.cuda.reset_peak_memory_stats``)."""
        self._peak = self._live
        self._peak_event = len(self._events)
        self._peak_op = len(self._ops)

    def live_bytes(self) -> int:
        """Bytes of counted storages alive now."""
        return self._live

    def live_by_category(self) -> dict[str, int]:
        """Bytes alive now, by category (roles as known at this moment)."""
        return dict(zip(CATEGORIES, self._live_cat))

    def forget_history(self) -> None:
        """Drop the history of ops and events, keeping the live storages (as allocated before any op).

        For a tracker entered for a long run (a Trainer's simulated budget): its history
        would grow by every op of every step. Afterwards :meth:`report` covers what ran
        since, starting from what is alive now, and the peak starts over from the live bytes.
        """
        self._sid_cat, self._sid_module, self._events, self._ops = [], [], [], []
        for rec in self._recs.values():
            rec.sid = len(self._sid_cat)
            self._sid_cat.append(rec.cat)
            self._sid_module.append(-1)
            self._events.append((0, rec.sid, rec.nbytes))
        self._peak = self._live
        self._peak_event = len(self._events)
        self._peak_op = 0

    def position(self) -> tuple[int, int, int, int]:
        """A position in the history, for :meth:`repeat_since`."""
        return len(self._events), len(self._ops), len(self._sid_cat), self._steps

    def repeat_since(self, position: tuple[int, int, int, int], times: int = 1) -> bool:
        """Append ``times`` copies of the training step(s) recorded since ``position``, without running them.

        A later step of a training loop repeats the allocations of the first
        except those of the storages the first created and kept (optimizer
        state, a GradScaler's scale): these exist from the copy's start. The
        copies are appended to the history (ops, events, peak) as if run.

        Returns False, appending nothing, when the recorded window cannot be
        repeated that way: it freed or resized a storage created before it.
        ``memfit.estimate`` then runs the steps instead; its tests check that
        repeated and run steps give identical memory figures (peak, categories,
        phases, modules, allocator). Op names may differ where an optimizer's
        first step differs from later ones (SGD's clone vs mul_/add_).
        """
        e0, o0, sid0, steps0 = position
        window = self._events[e0:]
        if any(sid < sid0 for _, sid, _ in window):
            return False
        kept = {rec.sid for rec in self._recs.values() if rec.sid >= sid0}
        ops = self._ops[o0:]
        # Ops whose only effect was creating kept storages (AdamW's lazy zeros_like)
        # do not run again in a later step: leave them out of the copies.
        creating: dict[int, bool] = {}
        for op, sid, _ in window:
            creating[op] = creating.get(op, True) and sid in kept
        skipped = {op - o0 for op, only_kept in creating.items() if only_kept}
        index = []  # window op offset -> offset in a copy
        for i in range(len(ops) + 1):
            index.append(i - sum(1 for j in skipped if j < i))
        steps_per_copy = self._steps - steps0
        for _ in range(times):
            base = len(self._ops)
            step_offset = self._steps - steps0
            self._ops.extend(
                (func, module, phase, step + step_offset)
                for i, (func, module, phase, step) in enumerate(ops)
                if i not in skipped
            )
            new_sid: dict[int, int] = {}
            for op, sid, delta in window:
                if sid in kept:
                    continue
                copy = new_sid.get(sid)
                if copy is None:
                    copy = new_sid[sid] = len(self._sid_cat)
                    self._sid_cat.append(self._sid_cat[sid])
                    self._sid_module.append(self._sid_module[sid])
                cat = self._sid_cat[copy]
                self._live += delta
                self._live_cat[cat] += delta
                self._events.append((base + index[op - o0], copy, delta))
                if delta > 0 and self._live > self._peak:
                    self._peak = self._live
                    self._peak_event = len(self._events)
                    self._peak_op = base + index[op - o0]
            self._steps += steps_per_copy
        return True

    def allocation_events(self) -> list[tuple[int, int, int]]:
        """The raw history: (op index, storage serial, byte delta) per allocation, free or resize.

        Each storage's first event is its allocation (positive), a negative one its
        free. The allocator model of :mod:`memfit.allocator` replays this.
        """
        return list(self._events)

    def report(self) -> MemoryReport:
        """Everything measured so far, as a :class:`~memfit.report.MemoryReport`."""
        return build_report(
            device=str(self.device),
            fake=self._fake,
            steps=self._steps,
            paths=self._paths,
            sid_cat=self._sid_cat,
            sid_module=self._sid_module,
            events=self._events,
            ops=self._ops,
            peak=self._peak,
            peak_event=self._peak_event,
            peak_op=self._peak_op,
            live_cat=self._live_cat,
        )

    # ------------------------------------------------------------ registration

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

    def _size(self, storage: torch.UntypedStorage) -> int:
        n = int(storage.nbytes())
        r = self._round
        return n if r == 1 else -(-n // r) * r

    def _storage(self, t: torch.Tensor) -> torch.UntypedStorage | None:
        # On a FakeTensor, .device and .untyped_storage() are themselves dispatched
        # (prim.device): keep memfit's own queries out of the op timeline.
        self._quiet += 1
        try:
            if t.device != self.device:
                return None
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # sparse, nested or wrapper-subclass tensors without one storage
        finally:
            self._quiet -= 1

    def _mark(self, t: torch.Tensor | None, cat: int) -> None:
        """Give ``t``'s storage the role ``cat``, registering it if it is new."""
        if t is None:
            return
        st = self._storage(t)
        if st is None:
            return
        rec = self._recs.get(id(st))
        if rec is None:
            if not self._fake and _torch_private.is_fake(t):
                self._fake = True
            nbytes = self._size(st)
            if self._limit is not None and self._live + nbytes > self._limit:
                self._over_budget(nbytes)
            self._add(st, nbytes, cat, self._current_module())
            self._note_peak()
        elif _RANK[cat] > _RANK[rec.cat]:
            self._recategorize(rec, cat)

    def _add(self, st: torch.UntypedStorage, nbytes: int, cat: int, module: int) -> _Storage:
        key = id(st)
        sid = len(self._sid_cat)
        self._sid_cat.append(cat)
        self._sid_module.append(module)
        rec = _Storage(sid, nbytes, cat, weakref.ref(st, lambda _, key=key: self._on_free(key)))
        self._recs[key] = rec
        self._live += nbytes
        self._live_cat[cat] += nbytes
        self._events.append((len(self._ops), sid, nbytes))
        return rec

    def _note_peak(self) -> None:
        if self._live > self._peak:
            self._peak = self._live
            self._peak_event = len(self._events)
            self._peak_op = len(self._ops)

    def _recategorize(self, rec: _Storage, cat: int) -> None:
        self._live_cat[rec.cat] -= rec.nbytes
        self._live_cat[cat] += rec.nbytes
        rec.cat = cat
        self._sid_cat[rec.sid] = cat

    def _on_free(self, key: int) -> None:
        # Called by the weak reference when the storage is deallocated, wherever that happens.
        rec = self._recs.pop(key, None)
        if rec is None:
            return
        self._live -= rec.nbytes
        self._live_cat[rec.cat] -= rec.nbytes
        self._events.append((len(self._ops), rec.sid, -rec.nbytes))

    def _over_budget(self, nbytes: int) -> None:
        """Called before an allocation that would cross ``_limit``; simulate_budget raises here."""

    # --------------------------------------------------------------- the op hook

    def _after_op(self, func: Any, out: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self._quiet or _is_metadata_query(func):
            return out
        in_bw = _torch_private.in_backward()
        if not in_bw:
            if self._bw_stack:
                self._bw_stack.clear()
            if self._recompute:
                self._promote_recomputed()
        elif not torch.is_grad_enabled() and self._recompute:
            # Back to plain backward ops: what the checkpoint recomputed and still keeps
            # alive is saved for backward, i.e. activations.
            self._promote_recomputed()
        module = self._current_module()
        new: dict[int, tuple[torch.UntypedStorage, int, torch.Tensor]] = {}
        new_bytes = 0
        recs = self._recs
        for t in _tensors(out):
            st = self._storage(t)
            if st is None:
                continue
            key = id(st)
            rec = recs.get(key)
            if rec is None:
                if key not in new:
                    nbytes = self._size(st)
                    new[key] = (st, nbytes, t)
                    new_bytes += nbytes
            else:
                nbytes = self._size(st)
                if nbytes != rec.nbytes:  # Tensor.resize_ / set_ changed a known storage
                    delta = nbytes - rec.nbytes
                    rec.nbytes = nbytes
                    self._live += delta
                    self._live_cat[rec.cat] += delta
                    self._events.append((len(self._ops), rec.sid, delta))
        if new and _returns_alias(func):
            # A view or in-place op on a tensor made before tracking began (a batch sliced
            # inside the tracker): its storage existed already, the op allocated nothing.
            inputs = {id(st) for t in _tensors((args, kwargs)) if (st := self._storage(t)) is not None}
            for key in [k for k in new if k in inputs]:
                new_bytes -= new.pop(key)[1]
        if new:
            if self._limit is not None and self._live + new_bytes > self._limit:
                self._over_budget(new_bytes)
            recompute = in_bw and torch.is_grad_enabled()
            for key, (st, nbytes, t) in new.items():
                if not self._fake and _torch_private.is_fake(t):
                    self._fake = True
                self._add(st, nbytes, TEMPORARIES, module)
                if recompute:
                    self._recompute[key] = None
        self._note_peak()
        phase = _OPTIMIZER if self._in_optimizer else (_BACKWARD if in_bw else _FORWARD)
        self._ops.append((func, module, phase, self._steps))
        return out

    def _promote_recomputed(self) -> None:
        for key in self._recompute:
            rec = self._recs.get(key)
            if rec is not None and _RANK[ACTIVATIONS] > _RANK[rec.cat]:
                self._recategorize(rec, ACTIVATIONS)
        self._recompute.clear()

    def _current_module(self) -> int:
        if self._fw_stack:
            return self._fw_stack[-1]
        if self._bw_stack:
            return self._bw_stack[-1]
        return -1

    # -------------------------------------------------------------------- hooks

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Autograd saves ``t`` for backward: its storage is an activation (unless it
        # has a stronger role, such as a weight saved by a matmul).
        if self._active:
            self._mark_existing(t, ACTIVATIONS)
        if self._fake and _torch_private.is_fake(t):
            # A FakeTensor owns no memory, and detach() costs a fake dispatch
            # (a quarter of the tracker's time on Llama): keep it as is.
            return t
        # Return a detached alias, never ``t`` itself: a saved output that holds its
        # own grad_fn would be a reference cycle that outlives an abandoned graph.
        self._quiet += 1
        try:
            return t.detach()
        finally:
            self._quiet -= 1

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _mark_existing(self, t: torch.Tensor, cat: int) -> None:
        st = self._storage(t)
        if st is None:
            return
        rec = self._recs.get(id(st))
        if rec is not None and _RANK[cat] > _RANK[rec.cat]:
            self._recategorize(rec, cat)

    def _scan_states(self) -> None:
        """(Re)register the model's and optimizer's tensors with their roles."""
        if self.model is not None:
            for p in self.model.parameters():
                self._mark(p, PARAMETERS)
                self._mark(p.grad, GRADIENTS)
                self._hook_param(p)
            for b in self.model.buffers():
                self._mark(b, BUFFERS)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self._mark(p, PARAMETERS)
                    self._mark(p.grad, GRADIENTS)
                    self._hook_param(p)
            self._scan_optimizer_state()

    def _scan_optimizer_state(self) -> None:
        for state in self.optimizer.state.values():
            for t in _tensors(state):
                self._mark(t, OPTIMIZER_STATE)

    def _hook_param(self, p: torch.Tensor) -> None:
        if not p.requires_grad or id(p) in self._hooked_params:
            return
        self._hooked_params.add(id(p))
        self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._active:
            self._mark(p.grad, GRADIENTS)

    def _install_hooks(self) -> None:
        if self.model is not None:
            for module in self.model.modules():
                mid = self._module_ids.get(id(module))
                if mid is None:  # a submodule added after the tracker was made
                    continue
                self._handles.append(module.register_forward_pre_hook(self._pre_forward_hook(mid), with_kwargs=True))
                self._handles.append(
                    module.register_forward_hook(self._post_forward_hook(mid), with_kwargs=True, always_call=True)
                )
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked_params.clear()

    def _pre_forward_hook(self, mid: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active:
                return
            if mid == self._root and not self._fw_stack:
                self._in_optimizer = False  # a step that raised never ran its post-hook
                # The root's arguments are the batch; new parameters (a lazy
                # module, a dtype cast inside the tracker) take their role too.
                for t in _tensors((args, kwargs)):
                    self._mark(t, INPUTS)
                self._scan_states()
            self._fw_stack.append(mid)
            if torch.is_grad_enabled() and not _torch_private.in_backward():
                inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
                if inputs:
                    # The module's backward ends when the grads of its inputs exist.
                    register_multi_grad_hook(inputs, self._bw_exit(mid), mode="any")

        return hook

    def _post_forward_hook(self, mid: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._active:
                return
            stack = self._fw_stack
            if mid in stack:
                del stack[len(stack) - 1 - stack[::-1].index(mid) :]
            if torch.is_grad_enabled() and not _torch_private.in_backward():
                outputs = [t for t in _tensors(output) if t.requires_grad]
                if outputs:
                    # The module's backward starts when the first grad of its outputs exists.
                    register_multi_grad_hook(outputs, self._bw_enter(mid), mode="any")

        return hook

    def _bw_enter(self, mid: int):
        def hook(grad: Any) -> None:
            if not self._active:
                return
            paths = self._paths
            path = paths[mid]
            # Backward of siblings does not interleave: entries that are neither
            # ancestors nor descendants of this module have finished (a module
            # whose inputs need no grad never reports its end).
            stack = [m for m in self._bw_stack if _is_ancestor(paths[m], path) or _is_ancestor(path, paths[m])]
            # A parent and its last child share an output, so their hooks fire
            # together (child first): keep the innermost module on top.
            position = len(stack)
            while position > 0 and _is_ancestor(path, paths[stack[position - 1]]):
                position -= 1
            stack.insert(position, mid)
            self._bw_stack = stack

        return hook

    def _bw_exit(self, mid: int):
        def hook(grad: Any) -> None:
            if not self._active:
                return
            stack = self._bw_stack
            if mid in stack:
                del stack[stack.index(mid) :]

        return hook

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._mark(p.grad, GRADIENTS)
        self._in_optimizer = True

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        self._in_optimizer = False
        self._scan_optimizer_state()
        self._steps += 1


_METADATA_QUERIES: dict[Any, bool] = {}


@functools.lru_cache(maxsize=None)
def _returns_alias(func: Any) -> bool:
    """True for ops whose outputs may share an input's storage (views, in-place and out= ops)."""
    schema = getattr(func, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _is_metadata_query(func: Any) -> bool:
    """Ops that never allocate device memory: prim.device and aten.sym_size (dispatched for
    FakeTensors only) and the profiler's record_function markers (optimizer steps)."""
    skip = _METADATA_QUERIES.get(func)
    if skip is None:
        name = getattr(func, "__name__", "")
        namespace = getattr(func, "namespace", "")
        skip = _METADATA_QUERIES[func] = namespace in ("prim", "profiler") or name.startswith("sym_")
    return skip


def _is_ancestor(parent: str, child: str) -> bool:
    return parent == "" or child == parent or child.startswith(parent + ".")


def track(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str | None = None,
    round_to: int | None = None,
) -> MemoryTracker:
    """Track a training step's memory: ``with memfit.track(model, opt) as t: ...``.

    Returns a :class:`MemoryTracker` to use as a context manager; after the
    block, ``t.report()`` gives peak, categories, modules and the timeline in
    int bytes. Works on real tensors, under ``FakeTensorMode`` (enter the fake
    mode first) and on CUDA; one tracker may be entered again for more steps.
    """
    return MemoryTracker(model, optimizer, device=device, round_to=round_to)
