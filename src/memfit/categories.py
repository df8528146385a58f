"""The names memfit sorts memory by: categories of tensors and phases of a training step.

A leaf module: the tracker, the reports, the estimator and the display all read these
names, and none of them needs the others to do so.
"""

__all__ = ["CATEGORIES", "PHASES"]

CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "activations",
    "inputs",
    "temporaries",
)
"""The memory categories, in display order."""

PHASES = ("forward", "backward", "optimizer")
"""Phases of a step: ops before backward (batch, forward, loss), backward, optimizer.step()."""
