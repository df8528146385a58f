"""memfit's exception base. Every error memfit raises on purpose derives from it."""

from __future__ import annotations

import errno

from typing import Any

import torch

__all__ = ["user_frame", "warn", "Explained", "MemfitError", "UsageError", "OutOfMemory", "WriteError", "DISK_FULL", "NotEnoughMemory", "NonFiniteLoss", "LeakWarning", "NonFiniteLossWarning",
           "ResumeWarning"]


class MemfitError(Exception):
    """Base class of memfit's own errors; the CLI prints these as one line."""


class UsageError(MemfitError, ValueError):
    """A bad value from the user: the message names it and the valid forms."""


class Explained:
    """An error that can say why memory ran out: :attr:`explanation`, made when first read (it estimates fixes).

    The raiser gives the means with :meth:`explain_with`; errors.py imports nothing that explains.
    """

    _explainer: Any = None
    _explanation: Any = None

    def explain_with(self, explainer: Any) -> None:
        """``explainer()`` returns the :class:`memfit.explain.Explanation` of this error (called once, when read)."""
        self._explainer = explainer

    @property
    def explanation(self) -> Any:
        """A :class:`memfit.explain.Explanation` (what the peak was made of, the tensors, the causes, verified
        fixes), or None where nothing could be explained (no record of the step)."""
        if self._explainer is not None:
            explainer, self._explainer = self._explainer, None
            try:
                self._explanation = explainer()
            except Exception as exc:  # noqa: BLE001 - an explanation is a courtesy; the error is the error
                import logging

                logging.getLogger("memfit").debug("memfit: no explanation of the error: %s", exc)
        return self._explanation


class WriteError(MemfitError, OSError):
    """A file memfit writes (a trainer's save, an exported page or memory snapshot) could not be written: a
    full disk, a folder missing or read-only.

    An ``OSError`` too, with the failure's ``errno`` where one was known, so handlers of file errors
    still see it. Nothing partial is left: the temporary file is removed and a file already at the path
    (a previous save) is as it was.
    """


DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
"""The ``errno`` values of a full disk, or of a full quota on it: the same fix."""


class OutOfMemory(Explained, MemfitError, torch.OutOfMemoryError):
    """Training ran out of memory and memfit's guard could not recover.

    A ``torch.OutOfMemoryError`` too, so handlers that recognise CUDA's OOM still do.

    Attributes:
        micro_batch: the micro-batch of the last failed attempt.
        retries: how many times the logical batch was retried.
        report: a :class:`memfit.MemoryReport`: under a simulated budget, the
            run's own (its peak is the failed attempt's); for a Trainer built from a
            workload, an estimate of the failed configuration; else None.
        advice: what would make it fit, most effective first, one phrase each.
        fixes: the same as :class:`memfit.fixes.Fix` records (the lever, the Config change,
            the bytes it saves where an estimate could say).
        events: the out-of-memory errors of the logical batch, each a :class:`memfit.OOMEvent`,
            the last one the error that ended it.
        explanation: what was live and which fixes would fit, each estimated (:func:`memfit.explain`),
            made when first read; None where the step left no record.
    """

    def __init__(self, message: str, *, micro_batch: int, retries: int, report: Any = None,
                 advice: tuple[str, ...] = (), events: tuple[Any, ...] = (), fixes: tuple[Any, ...] = ()) -> None:
        if fixes:
            advice = tuple(fix.describe() for fix in fixes)
        full = message + ("" if not advice else " Try: " + "; ".join(advice) + ".")
        super().__init__(full)
        self.micro_batch = micro_batch
        self.retries = retries
        self.report = report
        self.advice = tuple(advice)
        self.events = tuple(events)
        self.fixes = tuple(fixes)


class NotEnoughMemory(MemfitError):
    """The machine has less memory than a run needs: memfit refused to start it (the message has the figures)."""


class NonFiniteLoss(MemfitError, FloatingPointError):
    """A step's loss was NaN or inf and the Trainer was asked to stop (``on_nonfinite="raise"``).

    The step was undone: the model, optimizer and BatchNorm statistics are as before it.
    """


# Warnings are UserWarnings: Python shows those by default (a ResourceWarning it hides).
class LeakWarning(UserWarning):
    """Live memory at the start of a training step keeps growing: something keeps tensors alive."""


class NonFiniteLossWarning(UserWarning):
    """A step's loss was NaN or inf: its update was skipped and the model left as it was."""


class ResumeWarning(UserWarning):
    """A resumed run cannot be (or was not) the uninterrupted run's continuation bit for bit."""


def user_frame(exc: BaseException) -> str:
    """`` at file.py:line`` of the innermost frame of the user's own code (outside memfit and installed packages).

    Where an error raised deep in torch was asked for: the line to look at.
    """
    import os
    import sysconfig
    import traceback

    paths = sysconfig.get_paths()
    libraries = (os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))),
                 os.path.dirname(os.path.abspath(__file__)), paths["purelib"], paths["platlib"], paths["stdlib"])
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.abspath(f.filename).startswith(libraries)]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the user's line that called into memfit (the first frame outside it)."""
    import sys
    import warnings

    frame, level = sys._getframe(1), 2  # stacklevel 2 is the line that called warn()
    # memfit's frames, and those of mutmut's trampolines, which wrap memfit's functions under `make mutate`.
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("memfit", "mutmut"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
