"""A run across ranks saved and resumed with ``torch.distributed.checkpoint``: each rank writes its part.

``trainer.save(path)`` under DDP or FSDP writes a directory:

* the model's and optimizer's state through DCP (``get_state_dict``: FSDP2's DTensor shards, each
  rank its own; DDP's replicated tensors written once), in DCP's own files and ``.metadata``;
* ``trainer-rank{r}.pt`` for each rank: the rest of :meth:`memfit.Trainer.state_dict` (the config in
  use, counters, the scheduler and scaler, this rank's random generators and loader position), written
  atomically with a checksum by :mod:`memfit.statefile`; rank 0's, written last, is the seal: the
  manifest of every other file (size, SHA-256).

The directory is written beside the target (``path + ".tmp"``) and renamed over it once it is sealed;
:mod:`memfit.engine.dcp_files` has the protocol, and why a run killed at any point of it keeps a save
that ``load`` finds (``path``, or ``path.tmp`` / ``path.old`` between the renames).

``trainer.load(path)`` refuses, before anything changes, a save any of whose files is missing, extra,
truncated or altered (the ranks share the hashing and agree), DCP metadata naming anything but DCP's
own types (read by an allow-list unpickler: no pickled code runs) and a non-tensor entry that
weights-only loading refuses; then this rank's file is checked against the trainer (the config, the
optimizer's type, the world size), and only then the shards load into the model and optimizer as they
are sharded now (``set_state_dict``); a DDP save loads under FSDP and back (which config a resumed run
keeps is :func:`memfit.engine.state.load_trainer_state`'s to say).

Across ranks nothing waits alone: each step of a save or load ends with an agreement on the trainer's
own gloo group, under its timeout (``Trainer(timeout=...)``): a monitored barrier, which names a rank
that does not arrive, then every rank's outcome; a rank that failed (a full disk, a damaged file) makes
every rank raise the same :class:`CheckpointError` or :class:`memfit.UsageError`, naming the rank and
the file. (What every rank reads alike before the first agreement, which directory, the world size and
the files' names and sizes, every rank refuses alike, at once.) DCP's own collectives run on that
group too; its ``CheckpointException`` (a ``BaseException``) becomes a :class:`CheckpointError`.
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` turns such a directory into one file.

Known limitations: the world size must be the one saved (DCP can reshard, but the per-rank loader and
random states are for that many ranks); the ranks must share one filesystem; a load that fails inside
DCP after the checks (a file changed while loading) may have written some shards: restart from the save.
"""

from __future__ import annotations

import datetime
import errno
import functools
import io
import os
import re
from typing import Any, Callable

import torch
import torch.distributed as dist

from memfit import statefile
from memfit.engine import dcp_files
from memfit.engine.state import check_state, load_trainer_state, trainer_state
from memfit.errors import MemfitError, UsageError

__all__ = ["CheckpointError", "save", "load", "save_state", "load_state"]


class CheckpointError(MemfitError):
    """A sharded save or load failed on some rank (a full disk, a rank that did not answer, DCP's error):
    the message names the rank and the file; a failed save keeps the previous one."""


def save_state(trainer: Any, path: str | os.PathLike) -> None:
    """:meth:`memfit.Trainer.save`: one file on one process, a directory of every rank's part across ranks."""
    if trainer.config.strategy != "single":
        save(trainer, path)
    else:
        statefile.write(trainer.state_dict(), path)


def load_state(trainer: Any, path: str | os.PathLike, *, weights_only: bool = True) -> None:
    """:meth:`memfit.Trainer.load`: what :func:`save_state` wrote."""
    if trainer.config.strategy != "single":
        load(trainer, path)
    else:
        trainer.load_state_dict(statefile.read(path, weights_only=weights_only))


# ---------------------------------------------------------------- agreements

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
"""A full disk, or a full quota on it: the same fix."""


def _outcome(fn: Callable[[], Any]) -> tuple[str | None, Any]:
    """``(None, fn())``, or ``(what failed, None)``: a failing rank says so at the next agreement instead of
    leaving its peers in a collective."""
    try:
        return None, fn()
    except MemfitError as exc:
        return str(exc), None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        full = " (disk full: free space there or save elsewhere)" if exc.errno in _FULL else ""
        return f"{where}{exc.strerror or exc}{full}", None
    except Exception as exc:  # noqa: BLE001 - any failure is carried to every rank, then raised there
        return f"{type(exc).__name__}: {_first_line(exc)}", None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else "no detail"


def _agree(comm: Any, problem: str | None, where: str, error: type[MemfitError], payload: Any = None,
           then: str = "") -> list[Any]:
    """Every rank's ``payload`` once all have reached ``where``; raises ``error`` on every rank if one had a
    ``problem`` (naming the ranks; ``then``: what that leaves), :class:`CheckpointError` if one did not arrive
    within the timeout."""
    try:
        # monitored_barrier names the ranks that did not arrive (gloo only: comm.group is gloo).
        dist.monitored_barrier(group=comm.group, timeout=datetime.timedelta(seconds=comm.timeout),
                               wait_all_ranks=True)
        gathered: list[Any] = [None] * comm.world_size
        dist.all_gather_object(gathered, (problem, payload), group=comm.group)
    except RuntimeError as exc:  # gloo's timeout, or a peer's connection closed
        # Rank 0 hears who did not arrive: "Ranks 1, 3 failed to pass monitoredBarrier" (ProcessGroupGloo.cpp).
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
        if missing:
            who = missing.group(1).strip()
            raise CheckpointError(f"rank {comm.rank}: rank{'s' if ',' in who else ''} {who} did not reach {where} "
                                  f"within {comm.timeout:g} s: it is stuck or has died (see its log); this rank stops "
                                  "instead of waiting (for slow disks, raise Trainer(timeout=...))") from None
        raise CheckpointError(f"rank {comm.rank}: no answer from the other ranks at {where} within {comm.timeout:g} s "
                              f"({_first_line(exc)}); one is stuck or has died (see its log); this rank stops "
                              "instead of waiting") from None
    by_problem: dict[str, list[int]] = {}
    for rank, (failed, _) in enumerate(gathered):
        if failed:
            by_problem.setdefault(failed, []).append(rank)
    if by_problem:
        said = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {failed}"
                         for failed, ranks in by_problem.items())
        raise error(f"{where} failed on {said}{then}")
    return [value for _, value in gathered]


def _dcp_failure(exc: BaseException, comm: Any, doing: str, then: str) -> CheckpointError:
    """One line for DCP's ``CheckpointException`` (``failures``: rank -> (exception, traceback); api.py, torch
    2.13: every rank gets it) or gloo's error inside DCP's collectives; ``then``: what that leaves."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts, disk = [], False
        for rank, (cause, _) in sorted(failures.items()):
            full = isinstance(cause, OSError) and cause.errno in _FULL
            disk |= full
            parts.append(f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}{' (disk full)' if full else ''}")
        fix = "; free space on that disk or save elsewhere" if disk else ""
        return CheckpointError(f"torch.distributed.checkpoint could not {doing}: {'; '.join(parts)}{fix}{then}")
    if isinstance(exc, RuntimeError):  # gloo's, from DCP's collectives: a timeout or a peer's closed connection
        return CheckpointError(f"rank {comm.rank}: torch.distributed.checkpoint could not {doing}: no answer from "
                               f"the other ranks within {comm.timeout:g} s ({_first_line(exc)}); one is stuck or has "
                               f"died (see its log){then}")
    return CheckpointError(f"rank {comm.rank}: torch.distributed.checkpoint could not {doing} "
                           f"({type(exc).__name__}: {_first_line(exc)}){then}")


# ---------------------------------------------------------------- save

def save(trainer: Any, path: str | os.PathLike) -> None:
    """Every rank writes its part of the run's state to the directory ``path`` (see the module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.fspath(path)
    tmp = f"{path}.tmp"
    comm, rank, world = trainer._attempt.comm, trainer.rank, trainer.world_size
    cleared = _outcome(lambda: dcp_files.recover(path))[0] if rank == 0 else None
    problem, states = _outcome(lambda: get_state_dict(trainer._attempt.model, trainer.optimizer))
    kept = f"; the previous save at {path} is kept"
    _agree(comm, cleared or problem, f"the start of saving {path}", CheckpointError, then=kept)  # path.tmp is clear
    model_state, optimizer_state = states
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=dcp.FileSystemWriter(tmp),
                 process_group=comm.group)  # every rank learns of any rank's failure (DCP gathers them)
    except (dcp.CheckpointException, RuntimeError) as exc:
        raise _dcp_failure(exc, comm, f"write {tmp}", kept) from None
    problem, rest = _outcome(lambda: {**trainer_state(trainer, weights=False), "world_size": world})
    if rank and problem is None:
        problem = _outcome(lambda: statefile.write(rest, dcp_files.rank_file(tmp, rank)))[0]
    _agree(comm, problem, f"writing {tmp}", CheckpointError, then=kept)  # every file but the seal is written
    problem, mine = _outcome(lambda: _hash_share(tmp, rank, world))
    shares = _agree(comm, problem, f"hashing {tmp}", CheckpointError, mine, then=kept)
    if rank == 0:
        problem = _outcome(lambda: _seal_and_commit(path, rest, shares))[0]
    _agree(comm, problem, f"sealing {tmp} as {path}", CheckpointError,  # the save is complete at path
           then="; the previous save is kept where the failure came before the renames")
    if rank == 0:
        problem = _outcome(lambda: dcp_files.remove(f"{path}.old"))[0]
        if problem:  # the save is done; the next save's recover() removes what is left
            dcp_files.log.warning("memfit: could not remove the previous save %s.old: %s", path, problem)


def _hash_share(directory: str, rank: int, world: int) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """This rank's share of a save's files hashed (and synced to disk before the seal vouches for them)."""
    names = dcp_files.payload_names(directory)
    return names, dcp_files.hash_files(directory, names[rank::world], sync=True)


def _seal_and_commit(path: str, rest: dict[str, Any], shares: list[Any]) -> None:
    tmp = f"{path}.tmp"
    names = shares[0][0]
    if any(listed != names for listed, _ in shares):
        raise CheckpointError(f"the ranks list different files in {tmp}: they must share one filesystem")
    manifest = {name: share[name] for _, share in shares for name in share}
    dcp_files.seal(tmp, rest, dict(sorted(manifest.items())))
    dcp_files.commit(path)


# ---------------------------------------------------------------- load

@functools.cache
def _dcp_parts() -> tuple[type, type]:
    """DCP's file reader and load planner, made safe; built on first use (importing DCP takes a second)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(dcp.FileSystemReader):
        """DCP's reader over a verified save, whose metadata :func:`memfit.engine.dcp_files.read_metadata` read
        (allow-listed types only): ``FileSystemReader.read_metadata`` would ``pickle.load`` the file
        (torch/distributed/checkpoint/filesystem.py, torch 2.13). Tensors it reads with ``weights_only=True``
        (``read_data``); non-tensor entries go to the planner's ``load_bytes``."""

        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self.verified = metadata

        # No **kwargs: DCP then never falls back to a rank-local "__<rank>.metadata" (state_dict_loader.py,
        # _load_state_dict's local_step inspects the signature).
        def read_metadata(self) -> Any:
            metadata = self.verified
            if metadata.storage_meta is None:  # what FileSystemReader.read_metadata does after unpickling
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
        """DCP's default planner, its non-tensor entries (an optimizer's ``lr``, ``betas``) loaded weights-only.

        ``DefaultLoadPlanner.load_bytes`` calls ``torch.load(value, weights_only=False)`` (default_planner.py,
        torch 2.13). Here the value is loaded weights-only and saved again from the plain values that gives:
        what the default planner then unpickles is what memfit just wrote, and it files it where the state
        dict wants it (its flattening maps are its own)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            plain = io.BytesIO()
            torch.save(torch.load(value, map_location="cpu", weights_only=True), plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return VerifiedReader, WeightsOnlyPlanner


def load(trainer: Any, path: str | os.PathLike) -> None:
    """Resume this rank from the directory ``path`` that :func:`save` wrote; checked before anything changes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.fspath(path)
    rank, world = trainer.rank, trainer.world_size
    # Every rank reads the same files here, so every rank refuses alike (a rank on another filesystem would
    # be named by the agreement below, within the timeout).
    found = dcp_files.locate(path, rank, world)
    sealed = dcp_files.read_seal(found)
    if sealed.get("world_size") != world:
        raise UsageError(f"{path} was saved by {sealed.get('world_size')} ranks and this run has "
                         f"{world}; resume with the same number of ranks")
    manifest = dcp_files.manifest_of(found, sealed)
    dcp_files.check_listing(found, manifest)
    comm, model = trainer._attempt.comm, trainer._attempt.model

    def verify() -> tuple[Any, dict[str, Any]]:
        names = [n for n in sorted(manifest) if n != dcp_files.METADATA]  # every rank reads .metadata itself
        dcp_files.check_digests(found, manifest, names[rank::world])
        metadata = dcp_files.read_metadata(found, manifest)
        rest = sealed if rank == 0 else statefile.read(dcp_files.rank_file(found, rank))
        check_state(rest, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                    scaler=trainer._recipe.scaler(), config=trainer.config, weights=False)
        return metadata, rest

    problem, verified = _outcome(verify)
    chosen = _agree(comm, problem, f"checking the save {found}", UsageError, found)
    if len(set(chosen)) > 1:
        raise UsageError(f"the ranks found different saves ({', '.join(sorted(set(chosen)))}) for {path}: they "
                         "must share one filesystem")
    metadata, rest = verified

    def load_weights() -> None:
        model_state, optimizer_state = get_state_dict(model, trainer.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            reader, planner = _dcp_parts()
            dcp.load(state, storage_reader=reader(found, metadata), planner=planner(), process_group=comm.group)
        except (dcp.CheckpointException, Exception) as exc:  # noqa: BLE001 - DCP's errors, said in one line
            raise _dcp_failure(exc, comm, f"load the model and optimizer from {found}", "; the save is from "
                               "another model, or changed while loading: the model and optimizer may be partly "
                               "loaded, load a good save again") from None
        set_state_dict(model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    load_trainer_state(trainer, rest, weights=False, load_weights=load_weights)
