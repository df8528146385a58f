"""StorageLedger: the live storages of a tracked step, their roles and bytes, and the history a report replays.

The ledger knows nothing about autograd, modules or dispatch: the tracker
(:mod:`memfit.tracker`) tells it that a storage was allocated, resized, freed or
given a role, and which op ran; the ledger keeps the live bytes by category,
the peak, and an append-only history:

* per storage (by serial id, ``sid``): its final category and its module;
* events ``(op index, sid, byte delta)``: an allocation (positive, the
  storage's first event), a resize (either sign) or a free (negative);
* ops ``(aten op, module, phase, step)``, ``step`` counting the optimizer steps before the op.

Categories are roles with a strength: a storage that takes several roles keeps
the strongest for its whole life (the bytes of a gradient are a gradient from
the backward op that allocated them, though autograd names them ``.grad``
later). The ledger starts with :data:`memfit.categories.CATEGORIES` and takes
more with :meth:`StorageLedger.add_category` (a sharding strategy's unsharded
parameters or communication buffers).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from memfit.categories import CATEGORIES, STRENGTH
from memfit.errors import MemfitError

__all__ = ["StorageLedger", "StorageRecord"]


class StorageRecord:
    """A live storage: its serial id, current size in bytes, category index and the weak reference."""

    __slots__ = ("sid", "nbytes", "cat", "ref")

    def __init__(self, sid: int, nbytes: int, cat: int, ref: weakref.ref) -> None:
        self.sid = sid
        self.nbytes = nbytes
        self.cat = cat
        self.ref = ref


class StorageLedger:
    """Live storages keyed by the ``id`` of their ``UntypedStorage`` object, with roles, peak and history.

    Args:
        round_to: each storage's bytes are rounded up to a multiple of this
            (512 for CUDA's caching allocator, 1 for the bytes themselves).
        over_budget: called with the bytes about to be allocated when they would
            cross :attr:`limit` (``memfit.simulate_budget`` raises there).
    """

    def __init__(self, round_to: int, over_budget: Callable[[int], None]) -> None:
        self.round_to = round_to
        self.over_budget = over_budget
        self.limit: int | None = None
        self.names: list[str] = list(CATEGORIES)
        self.strength: list[float] = [STRENGTH[name] for name in CATEGORIES]
        self.recs: dict[int, StorageRecord] = {}  # id(storage object) -> live storage
        self.live = 0
        self.live_cat = [0] * len(self.names)
        self.peak = 0
        self.peak_event = 0
        self.peak_op = 0
        self.sid_cat: list[int] = []
        self.sid_module: list[int] = []
        self.events: list[tuple[int, int, int]] = []
        self.ops: list[tuple[Any, int, int, int]] = []
        self.steps = 0  # optimizer steps completed

    def add_category(self, name: str, strength: float) -> None:
        """Add a category, shown after the existing ones."""
        if not isinstance(name, str) or not name.isidentifier():
            raise MemfitError(f"a category name is a lowercase identifier such as 'unsharded_parameters', got {name!r}")
        if name in self.names:
            raise MemfitError(f"the category {name!r} exists already; the categories are: {', '.join(self.names)}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise MemfitError(f"a category's strength is a number (parameters {STRENGTH['parameters']}, "
                              f"temporaries {STRENGTH['temporaries']}), got {strength!r}")
        self.names.append(name)
        self.strength.append(float(strength))
        self.live_cat.append(0)

    def index(self, name: str) -> int:
        """The index of category ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise MemfitError(f"unknown category {name!r}; the categories are: {', '.join(self.names)}") from None

    def size(self, storage: torch.UntypedStorage) -> int:
        """The storage's bytes as counted: rounded up to :attr:`round_to`."""
        return self.rounded(int(storage.nbytes()))

    def rounded(self, nbytes: int) -> int:
        r = self.round_to
        return nbytes if r == 1 else -(-nbytes // r) * r

    def check(self, nbytes: int) -> None:
        """Before allocating ``nbytes`` more: hand over to :attr:`over_budget` if they cross the limit."""
        if self.limit is not None and self.live + nbytes > self.limit:
            self.over_budget(nbytes)

    def add(self, storage: torch.UntypedStorage, nbytes: int, cat: int, module: int) -> StorageRecord:
        """Register a new storage of ``nbytes`` as allocated now (freed when its object is)."""
        key = id(storage)
        sid = len(self.sid_cat)
        self.sid_cat.append(cat)
        self.sid_module.append(module)
        rec = StorageRecord(sid, nbytes, cat, weakref.ref(storage, lambda _, key=key: self.free(key)))
        self.recs[key] = rec
        self.live += nbytes
        self.live_cat[cat] += nbytes
        self.events.append((len(self.ops), sid, nbytes))
        return rec

    def resize(self, rec: StorageRecord, nbytes: int) -> None:
        """A known storage now holds ``nbytes`` (``Tensor.resize_``, ``set_``, ``UntypedStorage.resize_``)."""
        delta = nbytes - rec.nbytes
        if delta == 0:
            return
        rec.nbytes = nbytes
        self.live += delta
        self.live_cat[rec.cat] += delta
        self.events.append((len(self.ops), rec.sid, delta))

    def free(self, key: int) -> None:
        """The storage is gone (called by its weak reference, wherever that happens)."""
        rec = self.recs.pop(key, None)
        if rec is None:
            return
        self.live -= rec.nbytes
        self.live_cat[rec.cat] -= rec.nbytes
        self.events.append((len(self.ops), rec.sid, -rec.nbytes))

    def promote(self, rec: StorageRecord, cat: int) -> None:
        """Give ``rec`` the role ``cat`` if it is stronger than the one it has."""
        if self.strength[cat] > self.strength[rec.cat]:
            self.live_cat[rec.cat] -= rec.nbytes
            self.live_cat[cat] += rec.nbytes
            rec.cat = cat
            self.sid_cat[rec.sid] = cat

    def position(self) -> tuple[int, int, int, int]:
        """A position in the history (events, ops, storages, steps), for :func:`memfit.replay.repeat_since`."""
        return len(self.events), len(self.ops), len(self.sid_cat), self.steps

    def note_peak(self) -> None:
        if self.live > self.peak:
            self.peak = self.live
            self.peak_event = len(self.events)
            self.peak_op = len(self.ops)

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_event = len(self.events)
        self.peak_op = len(self.ops)

    def forget_history(self) -> None:
        """Drop the history, keeping the live storages (as allocated before any op); the peak starts over."""
        self.sid_cat, self.sid_module, self.events, self.ops = [], [], [], []
        for rec in self.recs.values():
            rec.sid = len(self.sid_cat)
            self.sid_cat.append(rec.cat)
            self.sid_module.append(-1)
            self.events.append((0, rec.sid, rec.nbytes))
        self.peak = self.live
        self.peak_event = len(self.events)
        self.peak_op = 0
