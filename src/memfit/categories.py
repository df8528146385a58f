"""The names memfit sorts memory by: categories of tensors and phases of a training step.

A leaf module: the tracker, the reports, the estimator and the display all read these
names, and none of them needs the others to do so.
"""

__all__ = ["CATEGORIES", "STRENGTH", "PHASES"]

CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "activations",
    "inputs",
    "temporaries",
)
"""The memory categories, in display order. A tracker may add more (``MemoryTracker.add_category``)."""

STRENGTH = {
    "parameters": 60,
    "buffers": 50,
    "optimizer_state": 40,
    "gradients": 30,
    "inputs": 20,
    "activations": 10,
    "temporaries": 0,
}
"""How strong each role is: a storage that takes several roles keeps the strongest for its whole life
(a weight saved for backward by a matmul stays a parameter). Added categories fit in between."""

PHASES = ("forward", "backward", "optimizer")
"""Phases of a step: ops before backward (batch, forward, loss), backward, optimizer.step()."""
