"""What FSDP2's storages are to the tracker: local shards, gathered parameters, communication buffers.

Under ``fully_shard`` a parameter is a DTensor whose memory is its rank's shard (the observer counts
a tensor by :func:`memfit._torch_private.local_tensor`). Two categories are added to the ledger:

* ``unsharded_parameters``: what FSDP all-gathers for a block's forward and backward, marked by a
  pre-forward hook after FSDP's own (stronger than ``parameters``: the root's gathered parameters are
  also ``model.parameters()`` during its forward);
* ``communication``: the tensors FSDP's and c10d's ops read and write (all-gather and reduce-scatter
  buffers), where no stronger role holds them (a reduce-scatter's output becomes the gradients).

The gathered parameters' gradients (kept unsharded between micro-steps while gradient sync is off)
are ``gradients``, by a hook on each gathered parameter.

An all-gather's buffer is attributed to the block it gathers, not to the module running when FSDP
issues it (in backward FSDP prefetches the next block's parameters from the current block's hook), so
a block's records stay its own: the depth extrapolation (:mod:`memfit.extrapolation`) relies on it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memfit import _torch_private
from memfit._tree import tensors as _tensors

__all__ = ["ShardRoles", "COMM_NAMESPACES", "CATEGORIES"]

CATEGORIES = (("unsharded_parameters", 65), ("communication", 5))
"""The categories added under FSDP, with their strengths (see :data:`memfit.categories.STRENGTH`)."""

COMM_NAMESPACES = frozenset({"fsdp", "c10d", "_c10d_functional"})
"""The op namespaces of FSDP's copies and of the collectives."""


class ShardRoles:
    """The roles of an FSDP model's storages, for a :class:`memfit.observer.StepObserver`."""

    def __init__(self, observer: Any, sharded: list[nn.Module], handles: list[Any]) -> None:
        self.observer = observer
        self.handles = handles  # the observer's: removed when it stops
        self.hooked: set[int] = set()
        ledger = observer.ledger
        for name, strength in CATEGORIES:
            if name not in ledger.names:
                ledger.add_category(name, strength)
        self.unsharded, self.comm = (ledger.index(name) for name, _ in CATEGORIES)
        self.copy_in = _torch_private.fsdp_all_gather_copy_in()
        self.owner: dict[int, int] = {}  # id(a local shard's storage) -> the module that gathers it
        for module in reversed(sharded):  # innermost first: a block's parameters are its own, not the root's
            mid = observer.modules.ids.get(id(module), -1)
            for p in module.parameters():
                if (st := observer._storage(p)) is not None:
                    self.owner.setdefault(id(st), mid)

    @classmethod
    def install(cls, observer: Any, handles: list[Any]) -> ShardRoles | None:
        """The roles for the observer's model if FSDP shards it (hooks appended to ``handles``), else None."""
        model = observer.model
        sharded = [m for m in model.modules() if _torch_private.is_fsdp_module(m)] if model is not None else []
        if not sharded:
            return None
        roles = cls(observer, sharded, handles)
        for module in sharded:  # after fully_shard's own pre-forward hook, which all-gathers
            handles.append(module.register_forward_pre_hook(roles._mark_unsharded))
        return roles

    def on_collective(self, func: Any, out: Any, args: tuple, kwargs: dict | None) -> None:
        """After an op of :data:`COMM_NAMESPACES`: its tensors are communication buffers, unless more."""
        observer, ledger = self.observer, self.observer.ledger
        owner = self._owner(args[0]) if func is self.copy_in else None
        for t in _tensors((out, args, kwargs)):
            if (st := observer._storage(t)) is not None and (rec := ledger.recs.get(id(st))) is not None:
                ledger.promote(rec, self.comm)
                if owner is not None and rec.cat == self.comm:
                    ledger.sid_module[rec.sid] = owner

    def _owner(self, inputs: Any) -> int | None:
        """The module whose shards ``inputs`` (an all-gather's inputs) are."""
        for t in _tensors(inputs):
            if (st := self.observer._storage(t)) is not None and id(st) in self.owner:
                return self.owner[id(st)]
        return None

    def _mark_unsharded(self, module: nn.Module, args: Any) -> None:
        observer = self.observer
        if observer.active:
            for p in module.parameters():
                if _torch_private.local_tensor(p) is p:  # gathered: a plain tensor, not the DTensor shard
                    observer.mark(p, self.unsharded)
                    if p.requires_grad and id(p) not in self.hooked:  # its gradients are gradients, unsharded
                        self.hooked.add(id(p))
                        self.handles.append(p.register_post_accumulate_grad_hook(self._mark_gradient))

    def _mark_gradient(self, p: Any) -> None:
        if self.observer.active:
            self.observer.mark(p.grad, self.observer.ledger.index("gradients"))
