"""LeakCheck: warns once when something keeps an earlier step's memory alive.

Three signals, read at the start of each step of :meth:`memfit.Trainer.fit`:

* live device memory (CUDA's allocator, or the simulated budget) more than 1 MiB
  (or 1%) above the second step's start;
* live memory that grew at each of the last eight step starts, outside the model
  states: a small leak (a few KiB a step) shows at once this way, since a steady
  loop's live memory at a step's start does not change;
* autograd graphs of earlier steps still alive: ``total_loss += loss`` keeps every
  step's graph. PyTorch frees a graph's saved tensors in backward, so such a graph
  holds host memory (its nodes) more than device memory, which the other signals miss.

Known limitations: the byte signals need a live-memory count (CUDA, or a simulated
budget on CPU); on CPU without a budget only the graphs are watched.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

from torch import nn

from memfit._tree import tensors
from memfit.engine.probe import Probe
from memfit.errors import LeakWarning, warn
from memfit.units import format_bytes

__all__ = ["LeakCheck"]

log = logging.getLogger("memfit")

# Growth of live memory at a step's start over the second step's that the leak
# check tolerates: allocator noise is zero for a steady loop, so anything past
# 1 MiB (or 1% of the baseline, for large models) is something kept alive.
_MIN_BYTES = 1 << 20
_FRACTION = 0.01
# A small leak (a few KiB a step) takes hundreds of steps to pass that; live memory
# that grew at each of this many step starts in a row, outside the model states, is
# flagged at once (a steady loop's live memory at a step's start does not change).
_RISES = 8
_MODEL_STATES = ("parameters", "buffers", "gradients", "optimizer_state")
# What the message calls a category: tensors made while forward or backward ran (the tracker's
# activations and temporaries) and kept past their step are the activations and outputs users keep.
_LABELS = {
    "activations": "activations and outputs of earlier steps",
    "temporaries": "activations and outputs of earlier steps",
    "inputs": "inputs of earlier steps",
}


class _GraphToken:
    """Stored in a graph node's metadata: it lives exactly as long as the node."""


class LeakCheck:
    """The leak check of one trainer: its baseline, the last step starts, and the graphs it watches."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.warned = False
        self.watching = False  # fit is running with the check on: mark each step's graph
        self._pending = False  # this attempt's graph is not marked yet
        self._step = 0  # the step being attempted
        self._baseline: tuple[int, int | None, dict[str, int] | None] | None = None  # (step, live, by category)
        self._starts: deque[int] = deque(maxlen=_RISES + 1)  # live bytes at the last step starts
        self._graphs: list[tuple[int, weakref.ref]] = []

    def start(self, model: nn.Module, enabled: bool):
        """Start watching for a run of fit; returns the forward hook's handle (None if not watching).

        The model's output marks the graph (a kept loss keeps it too, and so do kept logits);
        a loss that never calls the model itself marks its own graph instead (:meth:`watch_loss`).
        """
        self.watching = enabled and not self.warned
        return model.register_forward_hook(self._watch_output) if self.watching else None

    def stop(self) -> None:
        self.watching = False

    def begin_attempt(self, step: int) -> None:
        """An attempt at ``step`` begins: its first micro-batch's graph is the one marked."""
        self._step = step
        self._pending = self.watching

    def watch_loss(self, loss: Any) -> None:
        if self._pending and loss.grad_fn is not None:
            self._mark(loss.grad_fn)

    def _watch_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._pending:
            node = next((t.grad_fn for t in tensors(output) if t.grad_fn is not None), None)
            if node is not None:
                self._mark(node)

    def _mark(self, node) -> None:
        token = _GraphToken()
        node.metadata["memfit_step"] = token
        self._graphs.append((self._step, weakref.ref(token)))
        self._pending = False

    def check(self, steps_run: int, step: int) -> None:
        """At the start of ``step`` (the run's ``steps_run``-th): warn once if an earlier step's memory is alive."""
        if self.warned or steps_run < 1:
            return
        probe = self.probe
        live = probe.live_bytes()
        if steps_run == 1:
            # The baseline: the second step's start (the first creates the optimizer state).
            self._baseline = (step, live, None if live is None else probe.live_by_category(live))
            self._starts.clear()
            self._starts.append(live)
            return
        self._graphs = [(s, ref) for s, ref in self._graphs if ref() is not None]
        kept = len(self._graphs)
        base_step, base, base_cats = self._baseline
        growth = None if live is None or base is None else live - base
        device_leak = growth is not None and growth > max(_MIN_BYTES, _FRACTION * base)
        cats = None
        if live is not None and not device_leak:
            starts = self._starts
            starts.append(live)
            if len(starts) == starts.maxlen and all(b > a for a, b in zip(starts, list(starts)[1:])):
                # Rising at every start: a leak unless the model states grew (lazily created optimizer state).
                cats = probe.live_by_category(live)
                device_leak = growth - sum(cats.get(c, 0) - base_cats.get(c, 0) for c in _MODEL_STATES) > 0
                if not device_leak:
                    starts.clear()
        if not device_leak and kept < 2:  # one kept graph (the last loss, say) is not growth
            return
        self.warned = True
        self.watching = False  # warned once: stop marking graphs for the rest of the run
        parts = [f"memfit: possible memory leak at the start of step {step}:"]
        if kept >= 2:
            parts.append(f"the autograd graphs of {kept} earlier steps (the first from step {self._graphs[0][0]}) "
                         "are still alive, and one more is kept each step;")
        if growth is not None:
            if cats is None:
                cats = probe.live_by_category(live)  # only now: on CUDA it walks every model and optimizer tensor
            by_label: dict[str, int] = {}
            for c in cats:
                label = _LABELS.get(c, c)
                by_label[label] = by_label.get(label, 0) + cats[c] - base_cats.get(c, 0)
            grown = max(by_label.items(), key=lambda kv: kv[1])
            parts.append(f"live device memory is {format_bytes(live)}, {format_bytes(growth)} more than at step "
                         f"{base_step}" + (f", most of it {grown[0]} (+{format_bytes(grown[1])})." if growth > 0 else "."))
        parts.append("Something keeps tensors of earlier steps alive, such as a list of outputs, or a loss summed with "
                     "its history (total_loss += loss keeps every step's graph); keep loss.item() or .detach() instead.")
        message = " ".join(parts)
        log.warning(message)
        warn(message, LeakWarning)
        self._graphs.clear()
