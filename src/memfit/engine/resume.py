"""LoaderReplay: where fit is in the loader's epochs, so that a resumed run sees the batches the killed one would have.

At an epoch's start the state of every random generator and of the loader's own
``torch.Generator`` s is recorded before ``iter(loader)`` (which draws from them). A
resumed run replays that start, skips the batches already trained on, checks that the
last of them is the batch the saved run trained on last (by fingerprint), and puts
every generator back as it was at the save.

Known limitations (warned about when fit starts, not discovered later): a one-shot
iterator cannot be replayed; workers kept across epochs (``persistent_workers=True``)
carry a random state memfit cannot save; a sampler with its own generator is not seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from memfit import rng
from memfit.errors import ResumeWarning, warn

__all__ = ["LoaderReplay"]


class LoaderReplay:
    """The loader position of one trainer: the epoch's start, the last batch's fingerprint, a pending resume."""

    def __init__(self) -> None:
        self.epoch_start: dict[str, Any] | None = None  # every RNG and the loader's generators, before iter(loader)
        self.last_fingerprint: str | None = None  # of the batch a save followed
        self.pending: dict[str, Any] | None = None  # what load_state_dict read of the loader, for fit to replay
        self.generators: list[torch.Generator] = []

    def start(self, loader: Iterable[Any], saving: bool) -> None:
        """fit starts over ``loader``: find its generators; warn if a save or a resume cannot replay it."""
        self.generators = rng.loader_generators(loader)
        if saving or self.pending is not None:
            _warn_if_not_replayable(loader)

    def batches(self, loader: Iterable[Any], epoch: int, batch_in_epoch: int) -> Iterator[Any]:
        """This epoch's iterator over ``loader``, positioned after the ``batch_in_epoch`` batches already trained on."""
        resume, self.pending = self.pending, None
        generators = self.generators
        if resume is not None and len(resume["generators"]) != len(generators):
            warn(f"memfit: the saved run's loader held {len(resume['generators'])} torch.Generator(s), "
                 f"this one {len(generators)}; its order cannot be restored, so the resumed run may see "
                 "other batches than the uninterrupted one", ResumeWarning)
            resume = dict(resume, generators=None, epoch_start=None)
        if resume is not None and batch_in_epoch and resume["epoch_start"] is not None:
            self.epoch_start = resume["epoch_start"]
            _set_states(generators, resume["epoch_start"]["generators"])
            rng.restore(resume["epoch_start"]["rng"])
        else:
            if resume is not None and resume["generators"] is not None:
                _set_states(generators, resume["generators"])
            self.epoch_start = {"rng": rng.capture(), "generators": [g.get_state() for g in generators]}
        batches = iter(loader)
        if not batch_in_epoch:
            return batches
        last = None
        for _ in range(batch_in_epoch):  # trained on before the save
            last = next(batches, None)
            if last is None:
                break
        if resume is not None:
            expected = resume.get("last_batch")
            if expected is not None and (last is None or rng.fingerprint(last) != expected):
                warn(f"memfit: resuming at batch {batch_in_epoch} of epoch {epoch}, but the loader "
                     "did not give the batch the saved run trained on last: its order depends on something "
                     "memfit does not restore (a sampler's own random generator, say); the resumed run "
                     "differs from the uninterrupted one", ResumeWarning)
            rng.restore(resume["rng"])  # as at the save: the skipped batches drew nothing the run keeps
            if resume["generators"] is not None:
                _set_states(generators, resume["generators"])
        return batches

    def trained(self, batch: Any) -> None:
        """``batch`` is the last one trained on: a save records its fingerprint."""
        self.last_fingerprint = rng.fingerprint(batch)

    def state_dict(self, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "epoch_start": self.epoch_start,
            "generators": [g.get_state() for g in self.generators],
            "last_batch": self.last_fingerprint if batch_in_epoch else None,
        }

    def load_state_dict(self, loader: dict[str, Any] | None, rng_state: dict[str, Any]) -> None:
        """What a saved run recorded (None for states from before loaders were recorded); fit replays it."""
        loader = loader or {"epoch_start": None, "generators": [], "last_batch": None}
        self.epoch_start = loader["epoch_start"]
        self.last_fingerprint = loader["last_batch"]
        self.pending = dict(loader, rng=rng_state)


def _warn_if_not_replayable(loader: Any) -> None:
    """Warn at fit's start about loaders whose order a resumed run cannot replay."""
    if isinstance(loader, Iterator):
        warn(f"memfit: fit got a one-shot iterator ({type(loader).__name__}), which yields its batches "
             "once: a resumed run cannot replay the interrupted epoch; pass a DataLoader or another "
             "iterable that can be iterated again", ResumeWarning)
    if getattr(loader, "persistent_workers", False):  # DataLoader refuses it without workers
        warn("memfit: the DataLoader keeps its workers (persistent_workers=True), whose random state "
             "carries over from epoch to epoch and is not saved: random augmentations after a resume "
             "differ from the uninterrupted run's; persistent_workers=False makes them reproducible", ResumeWarning)


def _set_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    for generator, state in zip(generators, states):  # as many: batches() checked
        generator.set_state(state)
