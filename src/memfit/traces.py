"""Traces: the recorded steps of a workload under Configs, shared by estimate, plan and find_batch_size in one process.

:func:`memfit.estimate` asks :func:`history` for the step's history (the
records a report is built from) instead of tracing it every time:

* a history already traced for the same workload, Config and target is reused
  (the last :data:`CACHE_SIZE`; a Config is frozen and hashable, a Workload too);
* the micro-batch: a step's records at micro-batch m are, op for op and storage
  for storage, those at any other micro-batch with sizes affine in m (the batch
  dimension scales activations, nothing else). Once three micro-batches (2 or
  more) of the same step have been traced, and the third is predicted from the
  first two byte for byte, every other micro-batch of it but 1 is derived from the
  line without tracing (:class:`BatchLine`): the planner's searches over
  micro-batches trace three of them. Micro-batch 1 is always traced: PyTorch
  treats a dimension of size 1 apart (broadcasting, a ``contiguous()`` that copies
  nothing), and GPT-2's step at 1 is not on the line of its others.

Sizes are kept as the tensors' own bytes; :func:`rounded` applies the CUDA caching
allocator's 512-byte blocks afterwards, as the tracker would have (rounding is not
affine, the bytes are).

Known limitations: the cache keys on the workload object (and, for a model
instance, its modules' parameter and buffer shapes and dtypes), so a workload
rebuilt with new factories (a lambda made again) is traced again, and a factory
whose behaviour changes between calls (it reads a global the caller changed)
needs :func:`clear`; a step whose ops
depend on the micro-batch (a branch on ``batch_size == 1``) gets no line (the
third trace disagrees) and is traced every time.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from memfit.config import Config
from memfit.extrapolation import with_peak
from memfit.report import History

__all__ = ["history", "rounded", "built", "BatchLine", "CACHE_SIZE", "clear"]

CACHE_SIZE = 8
"""Histories kept, most recently used first (a 70B Llama's two steps are about 30 MB of records)."""

Traced = tuple[History, tuple[str, ...], tuple[str, ...]]
"""A step's history (tensor bytes, unrounded), its checkpointed module paths, and notes on how it was made."""

_CACHE: OrderedDict[tuple, Traced] = OrderedDict()
_LINES: OrderedDict[tuple, BatchLine] = OrderedDict()  # the last 16 steps' lines
_SEEN: OrderedDict[tuple, dict[int, Traced]] = OrderedDict()  # the last 4 steps' traced micro-batches
_MODELS: OrderedDict[object, nn.Module] = OrderedDict()


@dataclasses.dataclass(frozen=True, slots=True)
class BatchLine:
    """A step's records as a function of the micro-batch: each event's bytes ``a + slope * (m - at)``."""

    at: int
    base: Traced
    slopes: tuple[int, ...]
    traced: tuple[int, ...]
    """The micro-batches traced to find and check the line."""

    @classmethod
    def fit(cls, low: tuple[int, Traced], high: tuple[int, Traced]) -> BatchLine | None:
        """The line through two traced micro-batches; None where their records differ in more than bytes."""
        (m1, one), (m2, two) = sorted((low, high), key=lambda x: x[0])
        a, b = one[0], two[0]
        if (m1 == m2 or len(a.events) != len(b.events) or a.ops != b.ops or a.sid_cat != b.sid_cat
                or a.sid_module != b.sid_module or a.steps != b.steps or one[1] != two[1]):
            return None
        slopes = []
        for (op_a, sid_a, da), (op_b, sid_b, db) in zip(a.events, b.events):
            slope, rest = divmod(db - da, m2 - m1)
            if op_a != op_b or sid_a != sid_b or rest:
                return None
            slopes.append(slope)
        return cls(m1, one, tuple(slopes), (m1, m2))

    def history(self, m: int) -> History | None:
        """The step's history at micro-batch ``m``; None where a storage's size would come out negative."""
        base = self.base[0]
        shift = m - self.at
        events = [(op, sid, delta + slope * shift) for (op, sid, delta), slope in zip(base.events, self.slopes)]
        size: dict[int, int] = {}
        for _, sid, delta in events:
            size[sid] = size.get(sid, 0) + delta
            if size[sid] < 0:
                return None
        return with_peak(base, base.paths, base.ops, events, base.sid_cat, base.sid_module)


def history(key: tuple, config: Config, trace: Callable[[Config], Traced], *, reuse: bool = True) -> Traced:
    """The step's history for ``config``: cached, derived from its micro-batch line, or ``trace(config)``.

    ``key`` names everything but the Config the step depends on (the workload, target,
    steps). ``reuse=False`` traces, and keeps nothing.
    """
    if not reuse:
        return trace(config)
    exact = (key, config)
    if exact in _CACHE:
        _CACHE.move_to_end(exact)
        return _CACHE[exact]
    family = (key, dataclasses.replace(config, micro_batch=1))
    line = _LINES.get(family)
    if line is not None:
        _LINES.move_to_end(family)
    # Micro-batch 1 is traced: a dimension of size 1 is special to PyTorch (broadcast, a free
    # .contiguous()), so its bytes need not lie on the line of the others.
    derived = line.history(config.micro_batch) if line is not None and config.micro_batch > 1 else None
    if derived is not None:
        note = (f"derived from the step traced at micro-batches {line.traced[0]} and {line.traced[1]} (exact: a "
                "third was predicted byte for byte)")
        result = (derived, line.base[1], line.base[2] + (note,))
    else:
        result = trace(config)
        if line is None and config.micro_batch > 1:
            _learn(family, config.micro_batch, result)
    _CACHE[exact] = result
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _learn(family: tuple, m: int, traced: Traced) -> None:
    """Keep the last micro-batches traced of a step; at three, fit a line through two and check the third."""
    seen = _SEEN.setdefault(family, {})
    _SEEN.move_to_end(family)
    while len(_SEEN) > 4:
        _SEEN.popitem(last=False)
    seen[m] = traced
    if len(seen) < 3:
        return
    (m1, a), (m2, b), (m3, c) = list(seen.items())[-3:]
    line = BatchLine.fit((m1, a), (m2, b))
    predicted = line.history(m3) if line is not None else None
    if predicted is not None and (predicted.events, predicted.ops) == (c[0].events, c[0].ops):
        _LINES[family] = line
        while len(_LINES) > 16:
            _LINES.popitem(last=False)
        del _SEEN[family]
    else:
        del seen[m1]


def rounded(history: History, block: int) -> History:
    """The history with every storage's bytes rounded up to ``block`` (the tracker's ``round_to``), as if traced so.

    A resize that leaves the rounded size as it was is no event, as the tracker records none.
    """
    raw: dict[int, int] = {}
    events = []
    for op, sid, delta in history.events:
        old = raw.get(sid)
        new = (old or 0) + delta
        raw[sid] = new
        step = -(-new // block) * block - (-(-(old or 0) // block) * block)
        if old is None or step or not delta:  # an allocation, a change of blocks, or an empty storage's free
            events.append((op, sid, step))
    return with_peak(history, history.paths, history.ops, events, history.sid_cat, history.sid_module)


def built(workload, build: Callable[[], nn.Module]) -> nn.Module:
    """The workload's model as ``build()`` makes it (on the meta device), built once per workload (the last 4)."""
    if workload not in _MODELS:
        _MODELS[workload] = build()
        while len(_MODELS) > 4:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(workload)
    return _MODELS[workload]


def clear() -> None:
    """Forget every cached history, line and built model (a workload whose factories changed behind its back)."""
    _MODELS.clear()
    _CACHE.clear()
    _LINES.clear()
    _SEEN.clear()
