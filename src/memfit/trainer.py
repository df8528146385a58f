"""``memfit.trainer``: where :class:`memfit.Trainer` was before the engine split; see :mod:`memfit.engine`."""

from memfit.engine import FitResult, StepResult, Trainer

__all__ = ["Trainer", "StepResult", "FitResult"]
