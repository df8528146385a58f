"""The training engine: :class:`Trainer` composed of one-job parts.

``step`` (one attempt at a logical batch, the large batch's math), ``guard`` (the
out-of-memory guard and step atomicity), ``probe`` (live and peak bytes), ``leak``
(the leak check), ``loop`` (fit's loop), ``progress`` (its bar and logged loss), ``resume`` (the loader's
position across a save) and ``state`` (a saved state checked before it loads).
"""

from memfit.engine.results import FitResult, OOMEvent, StepResult
from memfit.engine.trainer import Trainer

__all__ = ["Trainer", "StepResult", "FitResult", "OOMEvent"]
