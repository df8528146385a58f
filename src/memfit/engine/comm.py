"""Comm: what the training step needs from the other processes of a run, behind one seam.

A single process has no others: :class:`LocalComm` answers every question locally and
costs a Python call. A distributed run (DDP, FSDP2 over ``torch.distributed``) uses
:class:`DistComm`. ``torch.distributed`` is imported by a few seams only: this module,
:mod:`memfit.sharding` (which wraps the model), :mod:`memfit.engine.sharded` (saves),
:mod:`memfit.fakedist` (estimates) and ``_torch_private`` (``tests/test_layout.py`` checks it).

What the step asks:

* ``agree(status, *values)``: the ranks' agreement. Every rank calls it at the same points:
  right before every collective a step issues (under FSDP inside each all-gather and
  reduce-scatter FSDP issues by itself, its prefetches included: :mod:`memfit.sharding`;
  under DDP before its buffer broadcast and its one bucket rebuild), before the update, at
  the end of fit and before a save. ``status`` says whether this rank got through, ran out
  of memory (every rank retries), failed (every rank stops) or ran out where no retry is
  possible (``STOP``: every rank stops with :class:`memfit.OutOfMemory`); ``values`` are
  summed over the ranks (samples, loss items, the loss); each rank's samples and status
  travel too, so that messages name the rank and a re-plan is alike everywhere. A rank that
  fails between two points tells the others at their next one, in place of its own: the
  ranks never issue different collectives, so nobody waits on a peer that left (Composer's
  lesson: the flag is agreed before every collective the step issues). The agreement runs
  on a process group of its own (gloo, CPU tensors), with a timeout: a rank that neither
  answers nor fails (stuck, or killed) ends the others' wait with :class:`CommTimeout`
  naming it after ``timeout`` seconds instead of a hang.
* ``no_sync(model)``: the context the micro-batches before the last run in
  (:func:`memfit.sharding.no_sync`: FSDP2's ``set_requires_gradient_sync(False)``; nothing
  under memfit's DDP, whose reduction is deferred anyway): gradients are reduced once per
  logical batch, not per micro-batch.
* ``reduce(model, scale)``: gradients reduced after the agreement; see :mod:`memfit.sharding`
  for why DDP's reduction is deferred until every rank has said it got through backward.

Known limitations: a failure after the update's agreement on one rank (the reduce, clipping,
``optimizer.step()``) cannot be retried by that rank alone: every rank stops (``STOP``), and
the ranks' models may then differ by that step. An OOM inside a collective itself (NCCL's
own buffers) is the communication library's error. Clipping under FSDP reduces the norm in
a collective of DTensor's after the update's agreement: a rank that fails between them
leaves its peers to the process group's timeout.
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

__all__ = ["Comm", "LocalComm", "DistComm", "PeerOutOfMemory", "PeerFailed", "PeerStopped", "CommTimeout", "OK", "OOM",
           "FAILED", "STOP", "make_comm"]

OK, OOM, FAILED, STOP = 0, 1, 2, 3
"""A rank's status at an agreement: got through; ran out of memory before the update (every rank retries);
failed otherwise (every rank stops); ran out of memory where no retry is possible, after its peers had
applied an update or with nothing left to try (every rank stops with :class:`memfit.OutOfMemory`)."""


class Comm(Protocol):
    world_size: int
    rank: int

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        """``values`` (at most 3) summed over the ranks; raises PeerOutOfMemory, PeerFailed or PeerStopped if
        another rank's ``status`` is not OK. Every rank must call it (or :meth:`counts`) at the same point."""

    def counts(self, own: float, where: str = "") -> list[float]:
        """Every rank's ``own`` value, by rank: an agreement like :meth:`agree`."""

    def signal(self, status: int) -> None:
        """This rank failed (``OOM``, ``FAILED`` or ``STOP``): tells the ranks waiting at an agreement."""

    def reduce(self, model: Any, scale: float) -> None:
        """Gradients multiplied by ``scale`` and summed over the ranks, where the wrapper deferred it (DDP);
        after the last agreement."""

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        """A context whose backward passes accumulate gradients without reducing them across ranks."""

    def most_samples(self, own: int) -> int:
        """The most samples any rank had in this attempt, as the last exchange told (``own`` where none did)."""


class LocalComm:
    """One process: no other rank, nothing to agree on or to reduce."""

    world_size = 1
    rank = 0
    samples = 0.0

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        return list(values)

    def signal(self, status: int) -> None:
        pass

    def counts(self, own: float, where: str = "") -> list[float]:
        return [own]

    def reduce(self, model: Any, scale: float) -> None:
        pass

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def most_samples(self, own: int) -> int:
        return own


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this step: this rank drops its attempt too and re-plans alike."""


_VALUES = 3


class PeerFailed(MemfitError):
    """Another rank failed with an error other than running out of memory: this rank undoes its attempt and stops."""


class PeerStopped(MemfitError):
    """Another rank ran out of memory where no retry is possible: this rank undoes its attempt and stops with
    :class:`memfit.OutOfMemory`. ``ranks`` are the ranks that stopped."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


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
        self.samples = 0.0  # this rank's samples in the attempt under way: every exchange tells the others
        self._samples_by_rank: list[float] | None = None  # as the last exchange told
        # Its own group: the agreement's tiny all-reduces never pair up with the model's collectives,
        # and a CPU backend (gloo), so that a flag costs no device synchronisation under NCCL.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))

    def agree(self, status: int, *values: float, where: str = "") -> list[float]:
        return self._exchange(status, values, where)[0][:len(values)]

    def counts(self, own: float, where: str = "") -> list[float]:
        self.samples = own
        return self._exchange(OK, (), where)[1]

    def most_samples(self, own: int) -> int:
        told = self._samples_by_rank
        return max(own, int(max(told))) if told else own

    def _exchange(self, status: int, values: tuple[float, ...], where: str) -> tuple[list[float], list[float]]:
        # One shape for every agreement, so that a failing rank's flag pairs with whatever its peers
        # are at: [three sums, each rank's samples, each rank's status].
        assert len(values) <= _VALUES, values
        w = self.world_size
        flags = torch.zeros(_VALUES + 2 * w, dtype=torch.float64)
        flags[:len(values)] = torch.tensor(values, dtype=torch.float64)
        flags[_VALUES + self.rank] = self.samples
        flags[_VALUES + w + self.rank] = status
        try:
            dist.all_reduce(flags, group=self.group)
        except RuntimeError as exc:  # gloo's timeout, or a peer's connection closed: the run cannot go on
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            others = f"rank {1 - self.rank}" if w == 2 else f"one of the other {w - 1} ranks"
            raise CommTimeout(f"rank {self.rank}: no answer from {others} within {self.timeout:g} s at "
                              f"{where or 'an agreement'}: it is stuck or has died (see its log); this rank stops "
                              f"instead of waiting (raise Trainer(timeout=) for slow steps; {first})") from None
        values_out = flags[:_VALUES].tolist()
        self._samples_by_rank = samples = flags[_VALUES:_VALUES + w].tolist()
        statuses = [int(x) for x in flags[_VALUES + w:].tolist()]
        if status == OK:
            at = where or "an agreement"
            for code, error in ((FAILED, PeerFailed), (STOP, PeerStopped), (OOM, PeerOutOfMemory)):
                ranks = [r for r, x in enumerate(statuses) if x == code]
                if not ranks:
                    continue
                who = ", ".join(str(r) for r in ranks)
                if code == FAILED:
                    raise PeerFailed(f"rank {who} failed (see its log) while rank {self.rank} was at {at}; "
                                     f"rank {self.rank} undid its attempt and stops too")
                if code == STOP:
                    raise PeerStopped(f"rank {who} ran out of memory where no retry is possible (see its log) "
                                      f"while rank {self.rank} was at {at}", ranks)
                raise PeerOutOfMemory(f"out of memory on rank {who} (rank {self.rank} was at {at})")
        return values_out, samples

    def signal(self, status: int) -> None:
        """This rank failed (OOM, FAILED or STOP): its peers learn it at their next agreement."""
        self._exchange(status, (), "a failure")

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return no_sync(model)

    def reduce(self, model: Any, scale: float) -> None:
        deferred = getattr(model, "_memfit_deferred", None)
        if deferred is not None:
            deferred.reduce(scale)


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
