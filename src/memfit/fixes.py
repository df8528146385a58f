"""Fix: one lever that would make a training step fit, what it changes, and what it saves.

The out-of-memory guard's advice (:attr:`memfit.OutOfMemory.fixes`), the planner's levers
when nothing fits (:attr:`memfit.PlanError.fixes`) and an explanation's fixes
(:func:`memfit.explain`) are all lists of fixes, rendered by :meth:`Fix.describe`, so that
they say the same thing the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memfit.config import Config
from memfit.units import format_bytes

__all__ = ["Fix"]


@dataclass(frozen=True, slots=True)
class Fix:
    """A lever, and what pulling it would save.

    Example:
        >>> Fix("precision bf16-true", change=(("precision", "bf16-true"),), saves=1 << 20, verified=True).describe()
        'precision bf16-true saves 1.00 MiB'
    """

    lever: str
    """What to do, as the user would say or type it (``"checkpoint='all'"``, ``"sharding over 8 GPUs (FSDP)"``)."""
    effect: str = ""
    """Why it helps, when no figure says it (``"halves activations"``)."""
    change: tuple[tuple[str, Any], ...] = ()
    """The :class:`memfit.Config` fields it sets; empty for levers outside a Config (an optimizer, more GPUs)."""
    saves: int | None = None
    """Bytes it saves at the peak; None where not quantified."""
    verified: bool = False
    """True if ``saves`` comes from an estimate of the changed configuration; False if from arithmetic."""
    required: int | None = None
    """Bytes the device needs with the fix (the estimate's ``required``), where estimated."""
    step_cost: float | None = None
    """Predicted time of the logical batch with the fix, relative to without it (1.0), where costed."""
    fits: bool | None = None
    """Whether the step then fits the budget; None without a budget."""
    world_size: int = 1
    """The ranks the changed configuration runs on (a fix that shards over GPUs), its figures one rank's."""
    optimizer: Any = None
    """The optimizer factory it swaps in (``params -> Optimizer``), for a lever outside the Config."""

    def config(self, base: Config) -> Config | None:
        """``base`` with this fix applied, or None for a lever outside the Config."""
        return dataclasses.replace(base, **dict(self.change)) if self.change else None

    def describe(self) -> str:
        """One phrase: the lever, then what it saves or why it helps."""
        if self.saves is None:
            return f"{self.lever} {self.effect}".rstrip()
        if not self.effect:
            return f"{self.lever} saves {format_bytes(self.saves)}"
        return f"{self.lever} {self.effect} (saves {format_bytes(self.saves)}" + (", estimated)" if self.verified
                                                                                  else ")")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the swapped-in optimizer by its lever only)."""
        return {"lever": self.lever, "effect": self.effect, "change": {k: _plain(v) for k, v in self.change},
                "saves": self.saves, "verified": self.verified, "required": self.required,
                "step_cost": self.step_cost, "fits": self.fits, "world_size": self.world_size}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
