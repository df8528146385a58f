"""Comm: what the training step needs from the other processes of a run, behind one seam.

A single process has no others: :class:`LocalComm` answers every question locally and
costs a Python call. A distributed run (DDP, FSDP2 over ``torch.distributed``) uses
:class:`DistComm`. ``torch.distributed`` is imported by a few seams only: this module,
:mod:`memfit.sharding` (which wraps the model), :mod:`memfit.engine.sharded` (saves),
:mod:`memfit.fakedist` (estimates) and ``_torch_private`` (``tests/test_layout.py`` checks it).

What the step asks:

* ``agree(status, *values)``: the ranks' agreement. Every rank calls it at the same points
  of a step (at its start, before each micro-step's forward and backward where the wrapper
  issues collectives there, before the update, and under FSDP around each block's
  collectives): ``status`` says whether this rank ran out of
  memory or failed, ``values`` are summed over the ranks (samples, loss items, the loss).
  A rank that fails between two points tells the others at their next one, in place of
  its own: the ranks never issue different collectives, so nobody waits on a peer that
  left (Composer's lesson: the flag is agreed before every collective the step issues).
  The agreement runs on a process group of its own (gloo, CPU tensors), with a timeout:
  a rank that neither answers nor fails (stuck, or killed) ends the others' wait with
  :class:`memfit.MemfitError` after ``timeout`` seconds instead of a hang.
* ``no_sync(model)``: the context the micro-batches before the last run in
  (:func:`memfit.sharding.no_sync`: FSDP2's ``set_requires_gradient_sync(False)``; nothing
  under memfit's DDP, whose reduction is deferred anyway): gradients are reduced once per
  logical batch, not per micro-batch.
* ``reduce(model)``: gradients reduced after the agreement; see :mod:`memfit.sharding`
  for why DDP's reduction is deferred until every rank has said it got through backward.

Known limitations: a rank that runs out of memory inside FSDP's backward, between the
collectives FSDP issues there, leaves its peers in a collective that will not complete:
they end with the process group's timeout (the run stops, it does not hang). An OOM
inside ``optimizer.step()`` on one rank (after the last agreement) ends the run likewise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Protocol

import torch
import torch.distributed as dist

from memfit.errors import MemfitError, UsageError
from memfit.sharding import no_sync

__all__ = ["Comm", "LocalComm", "DistComm", "PeerOutOfMemory", "PeerFailed", "CommTimeout", "OK", "OOM", "FAILED", "make_comm"]

OK, OOM, FAILED = 0, 1, 2
"""A rank's status at an agreement: got through, ran out of memory (every rank retries), failed otherwise (every rank stops)."""


class Comm(Protocol):
    world_size: int
    rank: int

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        """``values`` (at most 3) summed over the ranks; raises PeerOutOfMemory or PeerFailed if another rank's
        ``status`` is not OK. Every rank must call it (or :meth:`counts`) at the same point."""

    def counts(self, own: float, where: str = "") -> list[float]:
        """Every rank's ``own`` value, by rank: an agreement like :meth:`agree`."""

    def signal(self, status: int) -> None:
        """This rank failed (``OOM`` or ``FAILED``) before the update: tells the ranks waiting at an agreement."""

    def reduce(self, model: Any) -> None:
        """Gradients averaged over the ranks, where the wrapper deferred it (DDP); after the last agreement."""

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        """A context whose backward passes accumulate gradients without reducing them across ranks."""


class LocalComm:
    """One process: no other rank, nothing to agree on or to reduce."""

    world_size = 1
    rank = 0

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        return list(values)

    def signal(self, status: int) -> None:
        pass

    def counts(self, own: float, where: str = "") -> list[float]:
        return [own]

    def reduce(self, model: Any) -> None:
        pass

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this step: this rank drops its attempt too and re-plans alike."""


_VALUES = 3


class PeerFailed(MemfitError):
    """Another rank failed with an error other than running out of memory: this rank undoes its attempt and stops."""


class CommTimeout(MemfitError):
    """The other ranks did not answer at an agreement within the timeout (one is stuck or died): the run ends."""


class DistComm:
    """The ranks of an initialised ``torch.distributed`` process group; see the module docstring.

    Args:
        timeout: seconds a rank waits at an agreement for the others before ending with an error.
    """

    def __init__(self, timeout: float) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.timeout = timeout
        # Its own group: the agreement's tiny all-reduces never pair up with the model's collectives,
        # and a CPU backend (gloo), so that a flag costs no device synchronisation under NCCL.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        return self._exchange(status, values, None, where)[:len(values)]

    def counts(self, own: float, where: str = "") -> list[float]:
        return self._exchange(OK, (), own, where)[_VALUES:]

    def _exchange(self, status: int, values: tuple[float, ...], own: float | None, where: str) -> list[float]:
        # One shape for every agreement, so that a failing rank's flag pairs with whatever its peers
        # are at: [ran out of memory, failed, three sums, one slot per rank].
        assert len(values) <= _VALUES, values
        flags = torch.zeros(2 + _VALUES + self.world_size, dtype=torch.float64)
        flags[0], flags[1] = float(status == OOM), float(status == FAILED)
        flags[2:2 + len(values)] = torch.tensor(values, dtype=torch.float64)
        if own is not None:
            flags[2 + _VALUES + self.rank] = own
        try:
            dist.all_reduce(flags, group=self.group)
        except RuntimeError as exc:  # gloo's timeout, or a peer's connection closed: the run cannot go on
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CommTimeout(f"rank {self.rank}: no answer from the other ranks within {self.timeout:g} s at "
                              f"{where or 'an agreement'}: one of them is stuck or has died (see its log); this "
                              f"rank stops instead of waiting ({first})") from None
        oom, failed, *sums = flags.tolist()
        if status == OK and failed:
            raise PeerFailed(f"another rank failed at {where or 'an agreement'} (see its log); rank {self.rank} "
                             "undid its attempt and stops too")
        if status == OK and oom:
            raise PeerOutOfMemory(f"out of memory on {int(oom)} other rank(s) at {where or 'an agreement'}")
        return sums

    def signal(self, status: int) -> None:
        """This rank failed (OOM or FAILED) before the update: its peers learn it at their next agreement."""
        self._exchange(status, (), None, "a failure")

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return no_sync(model)

    def reduce(self, model: Any) -> None:
        deferred = getattr(model, "_memfit_deferred", None)
        if deferred is not None:
            deferred.reduce()


def make_comm(strategy: str, timeout: float) -> Comm:
    """The ranks of this run for ``strategy``: LocalComm for ``single``, else DistComm over the process group.

    A process started by torchrun whose process group is not initialised yet gets one here
    (NCCL where CUDA is available, else gloo), from torchrun's environment.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if strategy == "single":
        if initialised and dist.get_world_size() > 1:
            raise UsageError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()} but the config's "
                             "strategy is 'single': every rank would train alone on its own data; use "
                             "Config(strategy='ddp') or 'fsdp'")
        return LocalComm()
    if not initialised:
        if not dist.is_available():
            raise UsageError(f"strategy {strategy!r} needs torch.distributed, which this torch build lacks")
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UsageError(f"strategy {strategy!r} needs a process group: launch with "
                             "`torchrun --nproc-per-node N script.py`, or call torch.distributed.init_process_group() "
                             "before building the Trainer")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistComm(timeout)
