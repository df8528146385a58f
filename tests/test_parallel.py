"""memfit.parallel: jobs in forked workers give what they give run here; errors and bad settings come back clearly."""

from __future__ import annotations

import os

import pytest

import memfit
from memfit import parallel


def _pid_and(value: int) -> tuple[int, int]:
    return os.getpid(), value * value


def test_forked_jobs_give_the_results_of_running_them_here_in_order(monkeypatch):
    jobs = [lambda v=v: _pid_and(v) for v in range(5)]
    monkeypatch.setenv("MEMFIT_WORKERS", "1")
    here = parallel.run_all(jobs)
    assert {pid for pid, _ in here} == {os.getpid()}
    monkeypatch.setenv("MEMFIT_WORKERS", "2")
    forked = parallel.run_all(jobs)
    assert [v for _, v in forked] == [v for _, v in here] == [0, 1, 4, 9, 16]
    assert os.getpid() not in {pid for pid, _ in forked}  # they did run in other processes


def test_a_workers_usage_error_is_raised_here_and_another_error_names_it(monkeypatch):
    monkeypatch.setenv("MEMFIT_WORKERS", "2")

    def refuse():
        raise memfit.UsageError("a bad config, as the worker said")

    with pytest.raises(memfit.UsageError, match="a bad config, as the worker said"):
        parallel.run_all([lambda: 1, refuse])
    with pytest.raises(memfit.MemfitError, match="an estimate in a worker process failed: ZeroDivisionError"):
        parallel.run_all([lambda: 1, lambda: 1 // 0])


@pytest.mark.parametrize("setting", ["0", "two", "-1"])
def test_a_bad_memfit_workers_is_one_clear_error(monkeypatch, setting):
    monkeypatch.setenv("MEMFIT_WORKERS", setting)
    with pytest.raises(memfit.UsageError, match=f"MEMFIT_WORKERS={setting!r}: give a whole number"):
        parallel.workers()
