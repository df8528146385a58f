"""What each rank of tests/test_sharded_save.py runs (spawned processes import it by name).

Every function here is ``fn(rank, world_size, port, case, out)`` like tests/dist_worker.py's: it joins a
gloo process group on ``port``, saves or loads as ``case`` says, and writes what the parent checks to
``out/rank<r>.pt``.
"""

from __future__ import annotations

import errno
import os
import time

import torch
import torch.distributed as dist

import memfit
from dist_worker import batches, join, rank_part, workload

BATCHES = batches((8, 8, 8, 8))
"""The uninterrupted run trains on the first three; a loading trainer first takes a step on the fourth, so
that its weights are none of the saved ones."""


def _trainer(strategy: str, timeout: float = 30) -> memfit.Trainer:
    return memfit.Trainer(workload(), memfit.Config(micro_batch=2, strategy=strategy), device="cpu", timeout=timeout)


def _step(trainer: memfit.Trainer, i: int, rank: int, world: int) -> None:
    trainer.step(rank_part(BATCHES[i], rank, world))


def _weights(trainer: memfit.Trainer) -> dict[str, torch.Tensor]:
    """The whole model's weights, copied (under DDP ``full_state_dict`` gives the live parameters)."""
    return {k: v.detach().clone() for k, v in trainer.full_state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saves(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """The uninterrupted run under each of ``case["strategies"]``: three steps, saved to ``out/<strategy>/A``
    after the first and ``out/<strategy>/B`` after the second; the weights after each step."""
    join(rank, world, port)
    try:
        weights: dict[str, list] = {}
        for strategy in case["strategies"]:
            trainer = _trainer(strategy)
            weights[strategy] = []
            for i in range(3):
                _step(trainer, i, rank, world)
                if i < 2:
                    trainer.save(os.path.join(out, strategy, "AB"[i]))
                weights[strategy].append(_weights(trainer))
        torch.save(weights, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def loads(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """``trainer.load(path)`` of each of ``case["loads"]`` in turn: the error, and whether the weights and the
    step count stayed as before it; or the weights loaded, the step and strategy, the weights after the next
    step of the uninterrupted run, and (``"save"``) a save to the same path after it."""
    join(rank, world, port)
    try:
        trainer = _trainer(case["strategy"])
        _step(trainer, 3, rank, world)
        results = {}
        for name, entry in case["loads"].items():
            before, step = _weights(trainer), trainer.step_count
            try:
                trainer.load(entry["path"])
            except memfit.MemfitError as exc:
                results[name] = {"error": type(exc).__name__, "message": str(exc),
                                 "unchanged": _same(before, _weights(trainer)) and trainer.step_count == step}
                continue
            loaded, step = _weights(trainer), trainer.step_count
            strategy = trainer.config.strategy
            _step(trainer, step, rank, world)
            results[name] = {"loaded": loaded, "step": step, "strategy": strategy, "next": _weights(trainer)}
            if entry.get("save"):
                trainer.save(entry["path"])
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected)")


def fails(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """A save, then saves that fail on rank 1 (DCP's write, then its own file, on a full disk), a load of what
    is left, and last a save that rank 1 reaches ``case["timeout"] + 2`` seconds late."""
    import torch.distributed.checkpoint as dcp

    from memfit import statefile

    join(rank, world, port)
    results: dict = {}
    try:
        trainer = _trainer("fsdp", timeout=case["timeout"])
        path = os.path.join(out, "run")
        _step(trainer, 0, rank, world)
        trainer.save(path)
        saved = _weights(trainer)
        _step(trainer, 1, rank, world)
        for name, owner, attribute in [("dcp", dcp.FileSystemWriter, "write_data"), ("own", statefile, "write")]:
            original = getattr(owner, attribute)
            if rank == 1:
                setattr(owner, attribute, _disk_full)
            try:
                trainer.save(path)
                results[name] = {"error": None}
            except BaseException as exc:  # noqa: BLE001 - what the parent checks: a memfit error, nothing else
                results[name] = {"error": type(exc).__name__, "message": str(exc)}
            finally:
                setattr(owner, attribute, original)
        trainer.load(path)
        results["kept"] = _same(saved, _weights(trainer)) and trainer.step_count == 1
        if rank == 1:
            time.sleep(case["timeout"] + 2)  # stuck: rank 0 must not wait for it past the timeout
        start = time.monotonic()
        try:
            trainer.save(path)
            results["late"] = {"error": None}
        except BaseException as exc:  # noqa: BLE001
            results["late"] = {"error": type(exc).__name__, "message": str(exc)}
        results["late"]["seconds"] = time.monotonic() - start
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
