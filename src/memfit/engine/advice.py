"""OOMAdvice: what an out-of-memory error says: the report of what was live, the fixes, the explanation.

Apart from :mod:`memfit.engine.guard`, which recovers; this only describes a failure, on the failure
path (its estimates run on fake tensors, once per Config).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from memfit.checkpointing import blocks
from memfit.config import Config
from memfit.engine.probe import model_state_bytes
from memfit.estimator import estimate
from memfit.explain import explain
from memfit.fixes import Fix
from memfit.units import format_budget, format_bytes

__all__ = ["OOMAdvice"]

log = logging.getLogger("memfit")


class OOMAdvice:
    """The advice of one :class:`memfit.Trainer`'s out-of-memory errors (the trainer typed ``Any``, as in the guard)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._estimates: dict[Config, Any] = {}  # the failure path's estimates: the report and the advice share them

    def report(self, failed: Config):
        """The memory report for an OOM: the simulated device's own, else an estimate of the failed config."""
        t = self.trainer
        if t._sim is not None:
            return t._sim.report()
        if t._workload is None:
            return None
        try:
            return self._estimate(failed).report
        except Exception as exc:  # noqa: BLE001 - the report is a courtesy; the OOM is the error to raise
            log.debug("memfit: no estimate for the out-of-memory report: %s", exc)
            return None

    def explanation(self, failed: Config, n: int, report: Any):
        """The failure explained (:func:`memfit.explain`): ``report`` (what was live), and with the trainer's
        workload, fixes of ``failed`` for the batch of ``n``, each estimated, against the budget it ran under."""
        if report is None:
            return None
        t = self.trainer
        budget = t._sim.budget if t._sim is not None else t.plan.budget if t.plan is not None else None
        config = dataclasses.replace(failed, micro_batch=min(failed.micro_batch, n))
        return explain(report, config, budget, batch_size=max(n, config.micro_batch) * t.world_size,
                       workload=t._workload, device=t.device.type, world_size=t.world_size)

    def advice(self, failed: Config) -> tuple[str, ...]:
        """What would make ``failed`` fit, one phrase each (see :meth:`fixes`)."""
        return tuple(fix.describe() for fix in self.fixes(failed))

    def fixes(self, failed: Config) -> tuple[Fix, ...]:
        """What would make ``failed`` fit, the Config changes first, ending with the last resort.

        For a Trainer built from a workload, each Config change is estimated (fake tensors,
        on the failure path only): what it saves is stated, the changes that would save
        nothing are left out, and the rest are ordered by what they save.
        """
        t = self.trainer
        levers = []
        if failed.precision == "32-true":
            levers.append(Fix("precision 'bf16-mixed' (or '16-mixed' on GPUs without bf16)", "halves activations",
                              change=(("precision", "bf16-mixed"),)))
        if not failed.checkpoint and blocks(t.model):
            levers.append(Fix("checkpoint='all'", "recomputes each block's activations in backward",
                              change=(("checkpoint", ("all",)),)))
        if t.device.type == "cuda" and not failed.offload_activations:
            levers.append(Fix("offload_activations=True", "keeps saved activations in CPU memory",
                              change=(("offload_activations", True),)))
        fixes = self._quantified(failed, levers)
        if t.plan is not None:
            fixes.append(Fix(f"the plan predicted {format_bytes(t.plan.required)} of {format_budget(t.plan.budget)}; "
                             "if something else holds device memory, plan for less (memfit plan --budget)"))
        live = t._probe.live_bytes()
        if live is not None:
            fixes.append(Fix(f"{format_bytes(live)} was still live after the failure; the model states alone are "
                             f"{format_bytes(sum(model_state_bytes(t.model, t.optimizer).values()))}"))
        fixes.append(Fix("a larger budget or device"))
        return tuple(fixes)

    def _estimate(self, config: Config):
        """The estimate of ``config`` for the trainer's workload and device, made once (Configs are hashable)."""
        if config not in self._estimates:
            t = self.trainer
            self._estimates[config] = estimate(t._workload, config, device=t.device.type)
        return self._estimates[config]

    def _quantified(self, failed: Config, levers: list[Fix]) -> list[Fix]:
        """``levers`` with what each saves by an estimate, where the trainer's workload allows one."""
        t = self.trainer
        if t._workload is None or not levers:
            return levers
        try:
            base = self._estimate(failed).required
            quantified = [dataclasses.replace(fix, saves=base - self._estimate(fix.config(failed)).required,
                                              verified=True) for fix in levers]
        except Exception as exc:  # noqa: BLE001 - the figures are a courtesy; the OOM is the error to raise
            log.debug("memfit: no estimates for the out-of-memory advice: %s", exc)
            return levers
        return sorted((fix for fix in quantified if fix.saves > 0), key=lambda fix: -fix.saves)
