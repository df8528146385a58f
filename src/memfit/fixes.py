"""Fix: one lever that would make a training step fit, what it changes, and what it saves.

The out-of-memory guard's advice (:attr:`memfit.OutOfMemory.fixes`) and the planner's
levers when nothing fits (:attr:`memfit.PlanError.fixes`) are both lists of fixes, rendered
by :meth:`Fix.describe`, so that the two say the same thing the same way.
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
