"""Independent estimates in forked worker processes, one per core.

Tracing a step on fake tensors is Python-bound (each op's dispatch), so threads would share one
core; :func:`run_all` forks one worker per core instead (Linux's ``fork``: the workers start with
everything the parent imported and built, the workload's model included, and return plain
data). Where forking is not available or safe (not Linux, one core, ``MEMFIT_WORKERS=1``) the
jobs run one after another in this process, with the same results.

Known limitations: a job must return picklable data (ints, tuples, dicts of them); memfit's
errors come back as they were raised; any other exception is raised again as a MemfitError
naming it, with the worker's traceback in the message.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from memfit.errors import MemfitError, UsageError

__all__ = ["run_all", "start", "Pending", "workers"]

_JOBS: Sequence[Callable[[], Any]] = ()  # what the forked workers run, inherited from the parent


def workers() -> int:
    """Worker processes :func:`run_all` uses: this process's cores, or ``MEMFIT_WORKERS``; 1 where it cannot fork."""
    if sys.platform != "linux":
        return 1
    setting = os.environ.get("MEMFIT_WORKERS", "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise UsageError(f"MEMFIT_WORKERS={setting!r}: give a whole number of processes, 1 or more")
        return int(setting)
    return len(os.sched_getaffinity(0))


def run_all(jobs: Sequence[Callable[[], Any]]) -> list[Any]:
    """Each job's result, in order; the longest jobs should come first (they are handed out in order)."""
    return start(jobs).results()


def start(jobs: Sequence[Callable[[], Any]]) -> Pending:
    """Start the jobs in worker processes (see :func:`run_all`) and return at once: this process may work
    meanwhile; :meth:`Pending.results` waits. Where the jobs do not fork, they run when the results are asked."""
    return Pending(jobs)


class Pending:
    """Jobs running in forked workers (or waiting to run here); :meth:`results` gives their results in order."""

    def __init__(self, jobs: Sequence[Callable[[], Any]]) -> None:
        self.jobs = list(jobs)
        self._pool = self._async = None
        count = min(workers(), len(self.jobs))
        if count >= 2:
            global _JOBS
            _JOBS = self.jobs  # the workers fork now, with the jobs in their memory
            try:
                self._pool = multiprocessing.get_context("fork").Pool(count)
                self._async = self._pool.map_async(_run, range(len(self.jobs)), chunksize=1)
            finally:
                _JOBS = ()

    def results(self) -> list[Any]:
        if self._pool is None:
            return [job() for job in self.jobs]
        try:
            results = self._async.get()
        finally:
            self._pool.terminate()
            self._pool.join()
        return _raised(results)


def _raised(results: list[Any]) -> list[Any]:
    for result in results:
        if isinstance(result, _Failed):
            if result.usage:
                raise UsageError(result.message)
            raise MemfitError(result.message)
    return results


class _Failed:
    def __init__(self, message: str, usage: bool) -> None:
        self.message = message
        self.usage = usage


def _run(index: int) -> Any:
    try:
        return _JOBS[index]()
    except UsageError as exc:
        return _Failed(str(exc), True)
    except Exception as exc:  # noqa: BLE001 - carried back to the parent, which raises it
        return _Failed(f"an estimate in a worker process failed: {exc!r}\n{traceback.format_exc()}", False)
