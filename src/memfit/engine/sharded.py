"""A run across ranks saved and resumed with ``torch.distributed.checkpoint``: each rank writes its part.

``trainer.save(path)`` under DDP or FSDP writes a directory:

* the model's and optimizer's state through DCP (``get_state_dict``: FSDP2's DTensor shards, each
  rank its own; DDP's replicated tensors written once), in DCP's own files and ``.metadata``;
* ``trainer-rank{r}.pt`` for each rank: the rest of :meth:`memfit.Trainer.state_dict` (the config in
  use, counters, the scheduler and scaler, this rank's random generators and loader position), written
  atomically with a checksum by :mod:`memfit.statefile`.

The directory is written beside the target (``path + ".tmp"``) and renamed over it once every rank
has finished, so a run killed while saving keeps its previous save. ``trainer.load(path)`` checks this
rank's file first (the config, the optimizer's type, the world size), then loads the shards into the
model and optimizer as they are sharded now (``set_state_dict``) and restores the rest.
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` turns such a directory into one file.

Known limitations: the world size must be the one saved (DCP can reshard, but the per-rank loader and
random states are for that many ranks); a load that fails inside DCP may have written some shards:
restart from the save.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch.distributed as dist

from memfit import statefile
from memfit.engine.state import load_trainer_state, trainer_state
from memfit.errors import UsageError

__all__ = ["save", "load", "save_state", "load_state"]


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


def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"trainer-rank{rank}.pt")


def save(trainer: Any, path: str | os.PathLike) -> None:
    """Every rank writes its part of the run's state to the directory ``path`` (see the module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.fspath(path)
    tmp = f"{path}.tmp"
    if trainer.rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # what a run killed while saving left
    dist.barrier()
    model_state, optimizer_state = get_state_dict(trainer._attempt.model, trainer.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    rest = trainer_state(trainer, weights=False)
    rest["world_size"] = trainer.world_size
    statefile.write(rest, _rank_file(tmp, trainer.rank))
    dist.barrier()  # every rank's part is written
    if trainer.rank == 0:
        old = f"{path}.old"
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
    dist.barrier()


def load(trainer: Any, path: str | os.PathLike) -> None:
    """Resume this rank from the directory ``path`` that :func:`save` wrote; checked before anything changes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.fspath(path)
    own = _rank_file(path, trainer.rank)
    if os.path.isfile(path) or not os.path.isfile(own):
        raise UsageError(f"{path} is not a save of this run's rank {trainer.rank}: a run on several ranks saves a "
                         f"directory with a trainer-rank<r>.pt per rank; load it with the same world size "
                         f"({trainer.world_size} now)")
    rest = statefile.read(own)
    if rest.get("world_size") != trainer.world_size:
        raise UsageError(f"{path} was saved by {rest.get('world_size')} ranks and this run has "
                         f"{trainer.world_size}; resume with the same number of ranks")

    def load_weights() -> None:
        model = trainer._attempt.model
        model_state, optimizer_state = get_state_dict(model, trainer.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as exc:  # noqa: BLE001 - DCP's errors name the key; say which save and what to do
            raise UsageError(f"cannot load the model and optimizer state from {path} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the save is damaged or "
                             "from another model: use an earlier save") from exc
        set_state_dict(model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    load_trainer_state(trainer, rest, weights=False, load_weights=load_weights)
