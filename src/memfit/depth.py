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

# Blocks of the run kept in the traces: the first two give one block's records, the third checks
# them. Most models' blocks repeat from the first (Llama's); where the first or last block differs
# from the middle ones (GPT-2's last block frees the final norm's gradient, not the next block's),
# 2, 3 and 4 do, reusing the traces at 2 and 3.
_DEPTHS = ((1, 2, 3), (2, 3, 4))
# Below this many identical blocks, tracing a few of them saves too little.
_WORTH_IT = 8
# Steps whose extrapolation was checked, by everything but the micro-batch: the depths that
# worked. Later micro-batches of the same step (the planner's searches) trace those two only.
_CHECKED: dict[tuple, tuple[int, int]] = {}


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


def extrapolated(source: nn.Module, config: Config, key: tuple, trace: Callable[[nn.Module], History],
                 *, always: bool = False) -> tuple[History | None, str]:
    """The step's history for ``source`` at full depth from ``trace`` of cuts of it, or (None, why not).

    ``trace(model)`` runs the step under ``config`` on a model and returns its history;
    ``key`` names everything else the step depends on (the workload, the target), for
    remembering which depths were checked. The reason is "" where the model has no run of
    identical blocks worth it (8 or more; 5 with ``always``).
    """
    run = repeated_run(source)
    if run is None or (run.count < _WORTH_IT and not always):
        return None, ""
    uneven = _uneven_checkpointing(source, config, run)
    if uneven:
        return None, f"traced in full: {uneven}"
    key = (key, dataclasses.replace(config, micro_batch=1))
    traces: dict[int, History] = {}

    def at(depths: tuple[int, ...]) -> dict[int, History]:
        for n in depths:
            if n not in traces:
                with truncated(source, run, n) as cut:
                    traces[n] = trace(cut)
        return {n: traces[n] for n in depths}

    paths = [p for p, _ in source.named_modules()]
    checked = _CHECKED.get(key)
    if checked is not None:
        history, why = extrapolate(at(checked), run, paths)
        if history is not None:
            return history, _note(run, checked)
    for depths in _DEPTHS:
        history, why = extrapolate(at(depths), run, paths)
        if history is not None:
            _CHECKED[key] = depths[:2]
            return history, _note(run, depths)
    return None, f"traced in full: {why}"


def _note(run: Run, depths: tuple[int, ...]) -> str:
    return (f"extrapolated from the step with {' and '.join(map(str, depths[:2]))} of the {run.count} identical "
            f"blocks of {run.container or 'the model'} (exact: the step with {depths[1] + 1} was predicted token "
            "for token from those two)")


def _uneven_checkpointing(source: nn.Module, config: Config, run: Run) -> str:
    """Why the config's checkpoint set treats the run's blocks differently ("" if it does not)."""
    if not config.checkpoint:
        return ""
    chosen = Checkpointing(config.checkpoint).select(source)
    inside: list[set[str]] = [set() for _ in range(run.count)]
    for path in chosen:
        if run.container and path.startswith(run.container + "["):
            return f"the checkpoint segment {path} cuts the run of blocks"
        where = run.locate(path)
        if where is not None:
            inside[where[0]].add(where[1])
    if any(s != inside[0] for s in inside):
        return (f"the checkpoint set covers some of the {run.count} blocks of {run.container or 'the model'} and "
                "not others")
    return ""
