"""Searcher: estimates of one workload under many Configs, cached, and the largest micro-batch that fits.

The planner and ``find_batch_size`` ask the same questions many times over (does
this micro-batch fit?); a Config is frozen and hashable, so each is estimated once.
"""

from __future__ import annotations

import dataclasses

from memfit.config import Config
from memfit.devices import DeviceProfile, load_profile
from memfit.estimator import Estimate, estimate
from memfit.workload import Workload

__all__ = ["Searcher"]


class Searcher:
    """Estimates with a cache, and the FLOP counts of the cost model."""

    def __init__(self, workload: Workload, device: str, steps: int = 2, batch_size: int | None = None,
                 profile: DeviceProfile | str | None = None, extrapolate: bool | None = None,
                 world_size: int = 1) -> None:
        self.workload = workload
        self.device = device
        self.profile = load_profile(profile) if profile is not None and device == "cuda" else None
        self.steps = steps
        self.batch_size = batch_size
        self.cache: dict[tuple, Estimate] = {}
        self.calls = 0
        self.extrapolate = extrapolate
        """Passed to :func:`memfit.estimate`: False traces every estimate in full (the search before issue 12)."""
        self.world_size = world_size
        """The ranks of a distributed Config's estimates (``batch_size`` is then one rank's share)."""

    def estimate(self, config: Config) -> Estimate:
        # A micro-batch smaller than the batch means accumulation: the first
        # micro-step's gradients are alive during the next, so estimate two.
        # (A step in backward accumulates nothing: the plan gives it the whole batch.)
        accumulation = 2 if (self.batch_size is not None and config.micro_batch < self.batch_size
                             and not config.optimizer_in_backward) else 1
        if accumulation == 1 and config.sync_every_micro_step:  # one micro-step: nothing to sync more often
            config = dataclasses.replace(config, sync_every_micro_step=False)
        key = (config, accumulation)
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = estimate(self.workload, config, steps=self.steps, device=self.device,
                                       accumulation=accumulation, profile=self.profile,
                                       extrapolate=self.extrapolate,
                                       world_size=self.world_size if config.strategy != "single" else 1)
        return self.cache[key]

    def fits(self, config: Config, budget: int) -> bool:
        return self.estimate(config).required <= budget

    def largest_micro_batch(self, base: Config, budget: int, limit: int, start: int = 1) -> int:
        """The largest micro-batch <= limit that fits (0 if 1 does not).

        Memory grows with the micro-batch, so "fits" is monotone and a search is
        exact. Memory is also close to affine in the micro-batch (activations scale
        with it, model states do not), so two estimates predict the answer and two
        more confirm it; where the prediction is off, doubling and bisection finish.
        """
        def at(m: int) -> Config:
            return dataclasses.replace(base, micro_batch=m)

        def required(m: int) -> int:
            return self.estimate(at(m)).required

        if base.strategy != "single" and required(limit) <= budget:
            # Across ranks, accumulating costs memory of its own (FSDP keeps gradients unsharded while
            # sync is off): the whole batch in one micro-step may fit where a smaller micro-batch that
            # accumulates does not, so "fits" is monotone below the limit only.
            return limit
        lo = max(1, min(start, limit))
        if lo > 1 and required(lo) > budget:
            lo = 1
        if required(lo) > budget:
            return 0
        if lo == limit:
            return lo
        nxt = min(lo + max(1, lo), limit)
        slope = (required(nxt) - required(lo)) / (nxt - lo)
        if required(nxt) > budget:
            return self._bisect(at, budget, lo, nxt)
        if slope <= 0:
            return self._double(at, budget, nxt, limit)
        guess = max(nxt, min(limit, lo + int((budget - required(lo)) // slope)))
        if required(guess) <= budget:
            if guess == limit or required(guess + 1) > budget:
                return guess
            return self._double(at, budget, guess + 1, limit)
        return self._bisect(at, budget, nxt, guess)

    def _double(self, at, budget: int, good: int, limit: int) -> int:
        """From a size that fits, double until one does not (or the limit), then bisect."""
        while good < limit:
            trial = min(good * 2, limit)
            if not self.fits(at(trial), budget):
                return self._bisect(at, budget, good, trial)
            good = trial
        return good

    def _bisect(self, at, budget: int, good: int, bad: int) -> int:
        """The largest size in [good, bad) that fits, given good fits and bad does not."""
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.fits(at(mid), budget):
                good = mid
            else:
                bad = mid
        return good
