"""The one check of a count the user gives (a batch size, a number of steps): a whole number >= 1.

``True`` is an int in Python and 2.0 is not; neither is taken for a count.
"""

from __future__ import annotations

from typing import Any

from memfit.errors import MemfitError, UsageError

__all__ = ["positive_int"]


def positive_int(value: Any, what: str, *, hint: str = "", noun: str = "int",
                 error: type[MemfitError] = UsageError) -> int:
    """``value`` if it is a whole number >= 1 (not a bool); else ``error`` saying
    ``"{what} must be a positive {noun} ({hint}), got {value!r}"`` (the hint only if given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} must be a positive {noun}" + (f" ({hint})" if hint else "") + f", got {value!r}")
    return value
