"""Depth extrapolation: the step of a model with L identical blocks, from the step cut to 1, 2 and 3 of them.

Most models repeat one block (transformer layers, the later blocks of a ResNet
stage), and tracing a step on fake tensors costs time in proportion to the ops
it runs, so a 70B Llama's 80 layers cost 40 times a 2-layer cut of it. This module:

* finds the run of identical blocks (:func:`repeated_run`: the longest tail of
  an ``nn.ModuleList`` or ``nn.Sequential`` whose children have the same module
  tree, parameter and buffer shapes) and cuts a model to n of them (:func:`truncated`);
* traces the step cut to 1 and 2 blocks, predicts the step with 3 from them
  and checks the prediction against its trace, record for record
  (:func:`memfit.extrapolation.extrapolate`), and only then expands it to the
  full depth. Where the first or last block differs from the middle ones
  (GPT-2's last block frees the final norm's gradient, not the next block's),
  2, 3 and 4 blocks do the same. A step that passed the check is remembered,
  by everything but the micro-batch: the planner's later micro-batches of it
  trace the two smaller cuts only.

What the estimate reports (peak, categories, phases, modules, timeline, the
caching allocator's replay) is built from the extrapolated history exactly as
from a full trace, so where the check holds the result is the full trace's,
byte for byte (the tests compare them on the presets and on models whose
blocks differ).

Known limitations: one run per model (the one covering most modules; an
encoder-decoder's other stack is traced in full); the run must end its
container; blocks that differ in behaviour but not in memory (alternating
sliding-window attention) are extrapolated, which is exact for memory; the
check is at one more block, so a pattern with a longer period would not be
seen; a checkpoint set that covers some blocks of the run and not others is
traced in full; later micro-batches of a checked step are not checked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator

from torch import nn

from memfit.checkpointing import Checkpointing
from memfit.config import Config
from memfit.extrapolation import Run, extrapolate
from memfit.report import History

__all__ = ["Run", "repeated_run", "truncated", "extrapolated"]

# Below this many identical blocks, tracing a few of them saves too little.
_WORTH_IT = 8
# Steps whose extrapolation was checked, by everything but the micro-batch: the blocks per segment
# of the cut that worked. Later micro-batches of the same step (the planner's searches) skip the check.
_CHECKED: dict[tuple, int] = {}


def _signature(block: nn.Module) -> tuple:
    return (
        tuple((name, type(m).__name__) for name, m in block.named_modules()),
        tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in block.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in block.named_buffers()),
    )


def repeated_run(model: nn.Module, minimum: int = 5) -> Run | None:
    """The longest tail of identical blocks in any ``nn.ModuleList``/``nn.Sequential``, if it has ``minimum`` or more.

    Among several containers, the run covering most modules wins (a stack of layers
    over the list of experts inside one of them).
    """
    best: Run | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < minimum:
            continue
        names = list(module._modules)
        if names != [str(i) for i in range(len(names))]:
            continue
        children = list(module._modules.values())
        if any(c is None for c in children):
            continue
        last = _signature(children[-1])
        start = len(children) - 1
        while start > 0 and children[start - 1] is not children[start] and _signature(children[start - 1]) == last:
            start -= 1
        count = len(children) - start
        if count < minimum or len({id(c) for c in children[start:]}) < count:
            continue  # a block shared by several positions is one module: no run
        run = Run(path, start, count, modules=count * sum(1 for _ in children[-1].modules()))
        if best is None or run.modules > best.modules:
            best = run
    return best


@contextlib.contextmanager
def truncated(model: nn.Module, run: Run, blocks: int) -> Iterator[nn.Module]:
    """The model with only the run's first ``blocks`` blocks in its container, restored on exit."""
    container = model.get_submodule(run.container)
    kept = container._modules
    container._modules = OrderedDict(list(kept.items())[:run.start + blocks])
    try:
        yield model
    finally:
        container._modules = kept


def extrapolated(source: nn.Module, config: Config, key: tuple, trace: Callable[[nn.Module, Config], History],
                 *, always: bool = False) -> tuple[History | None, str]:
    """The step's history for ``source`` at full depth from ``trace`` of cuts of it, or (None, why not).

    ``trace(model, config)`` runs the step on a model and returns its history; ``key`` names
    everything else the step depends on (the workload, the target), for remembering which
    cuts were checked. The reason is "" where the model has no run of identical blocks
    worth it (8 or more; 5 with ``always``).

    The run's blocks fall in segments checkpointed alike (all, none, or the first k of
    them): each segment is cut to 1 block (else 2), grown by one in a second trace, and
    the cut with 2 more in each is the check.
    """
    run = repeated_run(source)
    if run is None or (run.count < _WORTH_IT and not always):
        return None, ""
    pattern = _pattern(source, config, run)
    if isinstance(pattern, str):
        return None, f"traced in full: {pattern}"
    outside, segments = pattern
    lengths = [length for _, length in segments]
    key = (key, dataclasses.replace(config, micro_batch=1))
    traces: dict[tuple[int, ...], History] = {}

    def at(cut: list[int]) -> History:
        if tuple(cut) not in traces:
            kinds = [kind for (kind, _), n in zip(segments, cut) for _ in range(n)]
            checkpoint = list(outside) + [run.block(j) + ("." + rel if rel else "")
                                          for j, kind in enumerate(kinds) for rel in sorted(kind)]
            with truncated(source, run, len(kinds)) as model:
                traces[tuple(cut)] = trace(model, dataclasses.replace(config, checkpoint=tuple(checkpoint)))
        return traces[tuple(cut)]

    paths = [p for p, _ in source.named_modules()]
    checked = _CHECKED.get(key)
    why = "the model has too few blocks for the cuts"
    # Under FSDP the first block differs from the others (none prefetches its all-gather in backward):
    # a cut to 1 block never predicts, so the cuts start at 2.
    for size in (checked,) if checked is not None else (2,) if config.strategy == "fsdp" else (1, 2):
        base = [min(n, size) for n in lengths]
        grow = [s for s, n in enumerate(lengths) if n > base[s]]
        more = lambda extra: [b + extra * (s in grow) for s, b in enumerate(base)]  # noqa: E731
        if sum(more(2)) > run.count:
            continue
        longer = [(at([b + (t == s) for t, b in enumerate(base)]), lengths[s] - base[s]) for s in grow]
        check = None if checked is not None else (at(more(2)), [2] * len(grow))
        history, why = extrapolate(at(base), longer, run, paths, check)
        if history is not None:
            _CHECKED[key] = size
            cuts = " and ".join(str(sum(c)) for c in [base] + [more(1)] * bool(grow))
            return history, (f"extrapolated from the step with {cuts} of the {run.count} identical blocks of "
                             f"{run.container or 'the model'} (exact: the step with {sum(more(2))} was predicted "
                             "record for record from the smaller ones)")
    return None, f"traced in full: {why}"


def _pattern(source: nn.Module, config: Config, run: Run) -> tuple[list[str], list[tuple[frozenset, int]]] | str:
    """The checkpointed paths outside the run, and the run as segments of blocks checkpointed alike.

    A segment is (the paths inside each of its blocks that are checkpointed, ``""`` for the
    block itself; its length). Returns why not where the set cannot be cut this way.
    """
    chosen = Checkpointing(config.checkpoint).select(source) if config.checkpoint else []
    inside: list[set[str]] = [set() for _ in range(run.count)]
    outside = []
    for path in chosen:
        if run.container and path.startswith(run.container + "["):
            return f"the checkpoint segment {path} cuts the run of blocks"
        where = run.locate(path)
        if where is None:
            outside.append(path)
        else:
            inside[where[0]].add(where[1])
    segments: list[tuple[frozenset, int]] = []
    for kind in map(frozenset, inside):
        if segments and segments[-1][0] == kind:
            segments[-1] = (kind, segments[-1][1] + 1)
        else:
            segments.append((kind, 1))
    if len(segments) > 2:
        return (f"the checkpoint set alternates over the {run.count} blocks of {run.container or 'the model'} "
                f"({len(segments)} segments; at most 2, such as the first k blocks, are extrapolated)")
    return outside, segments
