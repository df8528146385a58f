"""StepObserver: what PyTorch shows of a training step's tensors, handed to a ledger.

Four sources, each the one PyTorch offers for its event:

* a ``TorchDispatchMode`` sees every aten op below autograd, so the outputs of
  forward, backward and optimizer ops alike, on real, fake and CUDA tensors:
  each new output storage is registered once (views and in-place results share
  a storage and add nothing), and a known storage whose size changed
  (``Tensor.resize_``, ``set_``) is resized;
* ``UntypedStorage.resize_`` is not an aten op: it is wrapped while the
  observer is entered (how FSDP2 allocates and frees unsharded parameters);
* ``saved_tensors_hooks`` see the tensors autograd saves for backward
  (activations), and ``torch.utils.checkpoint``'s recomputation is told apart
  by running with grad enabled inside backward;
* parameter hooks (``register_post_accumulate_grad_hook``) and the optimizer's
  step hooks see gradients and the optimizer's (lazily created) state.

Under FSDP2 a tensor is counted by its local shard (a DTensor's storage is its rank's part),
and :mod:`memfit.shard_roles` adds the gathered parameters and communication buffers.

Storages are keyed by their ``UntypedStorage`` Python object, which torch keeps
alive exactly as long as the storage (PyObject preservation), as torch's own
MemTracker does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from memfit import _torch_private
from memfit._tree import tensors as _tensors
from memfit.attribution import ModuleAttribution
from memfit.categories import CATEGORIES, PHASES
from memfit.ledger import StorageLedger
from memfit.shard_roles import COMM_NAMESPACES, ShardRoles
from memfit.sources import SourceLines

__all__ = ["StepObserver"]

PARAMETERS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, INPUTS, TEMPORARIES = range(7)
assert CATEGORIES[ACTIVATIONS] == "activations" and CATEGORIES[TEMPORARIES] == "temporaries"
_FORWARD, _BACKWARD, _OPTIMIZER = range(3)
assert PHASES == ("forward", "backward", "optimizer")


class _Mode(_torch_private.TorchDispatchMode):
    """Sees each aten op's outputs and hands them to the observer."""

    def __init__(self, observer: StepObserver) -> None:
        super().__init__()
        self.observer = observer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return self.observer.after_op(func, out, args, kwargs)


class StepObserver:
    """Registers the storages of ``device`` that a step allocates, frees and gives roles, in ``ledger``.

    Args:
        model, optimizer: whose parameters, buffers, gradients and state take their roles (either may be None).
        device: the device counted; tensors elsewhere are ignored.
        ledger: where storages, roles and ops are recorded.
        sources: also record the model's line that ran each allocating forward op (:mod:`memfit.sources`).
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, device: torch.device,
                 ledger: StorageLedger, *, sources: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.ledger = ledger
        self.modules = ModuleAttribution(model, self._on_root_forward, lambda: self.active)
        self.fake = False  # FakeTensors were seen: the figures are what real tensors would take
        self.active = False
        self._in_optimizer = False
        self._recompute: dict[int, None] = {}  # storages a checkpoint recomputed in this segment
        self._quiet = 0  # >0 while memfit itself runs ops (detach in the pack hook)
        self._handles: list[Any] = []
        self._hooked_params: set[int] = set()
        self._stack: contextlib.ExitStack | None = None  # what enter() started, for exit() to stop
        self._shards: ShardRoles | None = None  # under FSDP
        self.sources = SourceLines() if sources else None

    def enter(self) -> None:
        """Start observing: hooks, the model's and optimizer's tensors, storage resizes, saved tensors, ops."""
        self.active = True
        stack = contextlib.ExitStack()
        try:
            stack.callback(self._stop)
            self._install_hooks()
            self._scan_states()
            stack.enter_context(_storage_resizes(self._before_storage_resize, self._after_storage_resize))
            # Saved-tensor hooks first, dispatch mode second: they leave in reverse order.
            stack.enter_context(saved_tensors_hooks(self._pack, self._unpack))
            stack.enter_context(_Mode(self))
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def exit(self, *exc: Any) -> None:
        """Stop observing; what checkpoints recomputed and still keep becomes activations."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc)

    def _stop(self) -> None:
        self._promote_recomputed()
        self._remove_hooks()
        self.modules.clear()
        self._in_optimizer = False
        self.active = False

    def _storage(self, t: torch.Tensor) -> torch.UntypedStorage | None:
        # On a FakeTensor, .device and .untyped_storage() are themselves dispatched
        # (prim.device): keep memfit's own queries out of the op timeline.
        self._quiet += 1
        try:
            t = _torch_private.local_tensor(t)
            if t.device != self.device:
                return None
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # sparse, nested or wrapper-subclass tensors without one storage
        finally:
            self._quiet -= 1

    def mark(self, t: torch.Tensor | None, cat: int) -> None:
        """Give ``t``'s storage the role ``cat``, registering it if it is new."""
        if t is None:
            return
        st = self._storage(t)
        if st is None:
            return
        ledger = self.ledger
        rec = ledger.recs.get(id(st))
        if rec is None:
            if not self.fake and _torch_private.is_fake(t):
                self.fake = True
            nbytes = ledger.size(st)
            ledger.check(nbytes)
            ledger.add(st, nbytes, cat, self.modules.current())
            ledger.note_peak()
        else:
            ledger.promote(rec, cat)

    def _before_storage_resize(self, storage: torch.UntypedStorage, size: int) -> None:
        ledger = self.ledger
        rec = ledger.recs.get(id(storage))  # known storages count wherever they live (a FakeTensor's is on meta)
        if self._quiet or (rec is None and storage.device != self.device):
            return
        # An unknown storage (made before entry, uncounted) counts whole once it holds memory.
        grow = ledger.rounded(int(size)) - (rec.nbytes if rec is not None else 0)
        if grow > 0:
            ledger.check(grow)

    def _after_storage_resize(self, storage: torch.UntypedStorage) -> None:
        ledger = self.ledger
        rec = ledger.recs.get(id(storage))
        if self._quiet or (rec is None and storage.device != self.device):
            return
        if rec is not None:
            ledger.resize(rec, ledger.size(storage))
        elif storage.nbytes() > 0:  # a storage made before entry (empty, as FSDP2 keeps it) now holds memory
            ledger.add(storage, ledger.size(storage), TEMPORARIES, self.modules.current())
        ledger.note_peak()

    # --------------------------------------------------------------- the op hook

    def after_op(self, func: Any, out: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self._quiet or _is_metadata_query(func):
            return out
        in_bw = _torch_private.in_backward()
        if not in_bw:
            if self.modules.backward_stack:
                self.modules.backward_stack.clear()
            if self._recompute:
                self._promote_recomputed()
        elif not torch.is_grad_enabled() and self._recompute:
            # Back to plain backward ops: what the checkpoint recomputed and still keeps
            # alive is saved for backward, i.e. activations.
            self._promote_recomputed()
        ledger = self.ledger
        module = self.modules.current()
        new: dict[int, tuple[torch.UntypedStorage, int, torch.Tensor]] = {}
        new_bytes = 0
        recs = ledger.recs
        for t in _tensors(out):
            st = self._storage(t)
            if st is None:
                continue
            key = id(st)
            rec = recs.get(key)
            if rec is None:
                if key not in new:
                    nbytes = ledger.size(st)
                    new[key] = (st, nbytes, t)
                    new_bytes += nbytes
            else:
                ledger.resize(rec, ledger.size(st))  # Tensor.resize_ / set_ may have changed a known storage
        if new and _returns_alias(func):
            # A view or in-place op on a tensor made before tracking began (a batch sliced
            # inside the tracker): its storage existed already, the op allocated nothing.
            inputs = {id(st) for t in _tensors((args, kwargs)) if (st := self._storage(t)) is not None}
            for key in [k for k in new if k in inputs]:
                new_bytes -= new.pop(key)[1]
        if new:
            ledger.check(new_bytes)
            recompute = in_bw and torch.is_grad_enabled()
            for key, (st, nbytes, t) in new.items():
                if not self.fake and _torch_private.is_fake(t):
                    self.fake = True
                ledger.add(st, nbytes, TEMPORARIES, module)
                if recompute:
                    self._recompute[key] = None
            if self.sources is not None and not in_bw and not self._in_optimizer:
                self.sources.note(module, func)
        if self._shards is not None and getattr(func, "namespace", None) in COMM_NAMESPACES:
            self._shards.on_collective(func, out, args, kwargs)
        ledger.note_peak()
        phase = _OPTIMIZER if self._in_optimizer else (_BACKWARD if in_bw else _FORWARD)
        ledger.ops.append((func, module, phase, ledger.steps))
        return out

    def _promote_recomputed(self) -> None:
        recs = self.ledger.recs
        for key in self._recompute:
            rec = recs.get(key)
            if rec is not None:
                self.ledger.promote(rec, ACTIVATIONS)
        self._recompute.clear()

    # -------------------------------------------------------------------- hooks

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Autograd saves ``t`` for backward: its storage is an activation (unless it
        # has a stronger role, such as a weight saved by a matmul).
        if self.active:
            st = self._storage(t)
            rec = self.ledger.recs.get(id(st)) if st is not None else None
            if rec is not None:
                self.ledger.promote(rec, ACTIVATIONS)
        if self.fake and _torch_private.is_fake(t):
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

    def _on_root_forward(self, args: tuple, kwargs: dict) -> None:
        self._in_optimizer = False  # a step that raised never ran its post-hook
        # The root's arguments are the batch; new parameters (a lazy
        # module, a dtype cast inside the tracker) take their role too.
        for t in _tensors((args, kwargs)):
            self.mark(t, INPUTS)
        self._scan_states()

    def _scan_states(self) -> None:
        """(Re)register the model's and optimizer's tensors with their roles."""
        if self.model is not None:
            for p in self.model.parameters():
                self.mark(p, PARAMETERS)
                self.mark(p.grad, GRADIENTS)
                self._hook_param(p)
            for b in self.model.buffers():
                self.mark(b, BUFFERS)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.mark(p, PARAMETERS)
                    self.mark(p.grad, GRADIENTS)
                    self._hook_param(p)
            self._scan_optimizer_state()

    def _scan_optimizer_state(self) -> None:
        for state in self.optimizer.state.values():
            for t in _tensors(state):
                self.mark(t, OPTIMIZER_STATE)

    def _hook_param(self, p: torch.Tensor) -> None:
        if not p.requires_grad or id(p) in self._hooked_params:
            return
        self._hooked_params.add(id(p))
        self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.active:
            self.mark(p.grad, GRADIENTS)

    def _install_hooks(self) -> None:
        self._handles.extend(self.modules.install())
        self._shards = ShardRoles.install(self, self._handles)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked_params.clear()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.mark(p.grad, GRADIENTS)
        self._in_optimizer = True

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        self._in_optimizer = False
        self._scan_optimizer_state()
        self.ledger.steps += 1


@contextlib.contextmanager
def _storage_resizes(before: Callable[[torch.UntypedStorage, int], None],
                     after: Callable[[torch.UntypedStorage], None]) -> Iterator[None]:
    """Call ``before(storage, size)`` and ``after(storage)`` around every ``UntypedStorage.resize_``.

    The method goes straight to the allocator, below the dispatcher, so no dispatch
    mode sees it; wrapping it is how torch's own MemTracker sees it
    (torch/distributed/_tools/mem_tracker.py, ``_track_resize``; checked on torch 2.13).
    """
    original = torch.UntypedStorage.resize_

    @functools.wraps(original)
    def resize_(storage: torch.UntypedStorage, size: int) -> Any:
        before(storage, size)
        out = original(storage, size)
        after(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


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
