"""Comm: what the training step needs from the other processes of a run, behind one seam.

A single process has no others: :class:`LocalComm` answers every question locally and
costs a Python call. A distributed run (DDP, FSDP2 over ``torch.distributed``) gives the
engine another implementation of the same four members; this module is the one place in
memfit that will import ``torch.distributed`` (``tests/test_layout.py`` checks it).

What the step asks:

* ``any(flag)``: did any rank raise its flag? The OOM guard's agreement: a rank that ran
  out of memory before the update says so, the others learn it at the same point (before
  ``optimizer.step()``), and every rank drops the attempt and re-plans alike, so that the
  ranks never train on different batches or configurations.
* ``no_sync(model)``: the context the micro-batches before the last run their backward in
  (DDP's ``no_sync``: gradients are reduced once per logical batch, not per micro-batch).

Known limitations: only an out-of-memory error is agreed on. Any other exception on one
rank propagates there alone (its peers wait at the agreement until the launcher, torchrun,
ends the run); and a rank that runs out of memory in the last micro-batch's backward, while
DDP reduces gradients, leaves its peers waiting in that reduction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

__all__ = ["Comm", "LocalComm", "PeerOutOfMemory"]


class Comm(Protocol):
    world_size: int
    rank: int

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank; every rank must call it at the same point."""

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        """A context whose backward passes accumulate gradients without reducing them across ranks."""


class LocalComm:
    """One process: no other rank, nothing to agree on or to reduce."""

    world_size = 1
    rank = 0

    def any(self, flag: bool) -> bool:
        return flag

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this step: this rank drops its attempt too and re-plans alike."""
