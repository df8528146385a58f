"""Checkpointing: recompute chosen modules' forward in backward, and the modules worth choosing.

``Checkpointing(globs).apply(model)`` wraps each matched module's forward in
``torch.utils.checkpoint`` (``use_reentrant=False``: RNG state is preserved, so
dropout recomputes the same mask; BatchNorm statistics are updated once per
batch, not again in the recompute); ``state_dict()`` keys do not change.
:func:`blocks` finds a model's repeated blocks (the children of an ``nn.ModuleList``,
or segments of an ``nn.Sequential`` of blocks: transformer layers, ResNet stages,
VGG features), which is what ``checkpoint="all"`` means.

A transformers model's KV cache is turned off when it is checkpointed, as
Hugging Face's own ``gradient_checkpointing_enable`` does.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from memfit import _torch_private
from memfit.errors import UsageError

__all__ = ["Checkpointing", "blocks", "segment_layers"]

log = logging.getLogger("memfit")


def _glob_regex(glob: str) -> re.Pattern:
    # '*' stays within one path component, '**' crosses them: "transformer.h.*"
    # names each block, not every module inside them.
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^.]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def blocks(model: nn.Module) -> list[str]:
    """The model's repeated blocks, the units worth checkpointing, in forward order.

    A block is a child of a container of repeated modules: an ``nn.ModuleList``
    (transformer layers), or an ``nn.Sequential`` whose children are themselves
    modules with children (ResNet's stages, each a Sequential of residual blocks).
    The containers' blocks are taken together, outermost first (a container
    inside a block adds nothing). A model with neither, whose layers sit in an
    ``nn.Sequential`` of plain layers (VGG's ``features``), gets that Sequential's
    segments, each a layer with parameters and the plain layers after it
    (``"features[0:2]"``: a convolution and its ReLU); checkpointing a lone
    convolution followed by an in-place ReLU would save nothing.
    """
    containers = []
    for path, module in model.named_modules():
        children = list(module.children())
        if isinstance(module, nn.ModuleList) and children:
            containers.append(path)
        elif isinstance(module, nn.Sequential) and len(children) > 1 and all(_has_children(c) for c in children):
            containers.append(path)
    found: list[str] = []
    for path in containers:
        if any(path == b or path.startswith(b + ".") for b in found):
            continue  # inside a block already chosen
        prefix = path + "." if path else ""
        found += [prefix + name for name, _ in model.get_submodule(path).named_children()]
    if found:
        return found
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) > 1 and not any(_has_children(c) for c in module):
            found += [f"{path}[{start}:{stop}]" for start, stop in _segments(module)]
    return found


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _segments(seq: nn.Sequential) -> list[tuple[int, int]]:
    """A Sequential's layers cut before each layer with parameters (leading plain layers join the first)."""
    starts = [i for i, m in enumerate(seq) if any(True for _ in m.parameters())]
    if not starts:
        return []
    starts[0] = 0
    return list(zip(starts, starts[1:] + [len(seq)]))


# A segment of an nn.Sequential: "features[0:2]" is its children 0 and 1.
_SEGMENT = re.compile(r"^(?P<path>[^\[\]]*)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def segment_layers(name: str) -> list[str] | None:
    """The module paths of a Sequential segment's layers (``"f[2:4]"``: ``f.2``, ``f.3``); None for a plain path."""
    segment = _SEGMENT.match(name)
    if segment is None:
        return None
    prefix = segment["path"] + "." if segment["path"] else ""
    return [prefix + str(i) for i in range(int(segment["start"]), int(segment["stop"]))]


class Checkpointing:
    """Recompute the forward of the modules matching ``globs`` during backward.

    A glob names modules by path (``"transformer.h.*"``); ``"seq[2:5]"`` names the
    children 2 to 4 of the ``nn.Sequential`` at ``seq``, recomputed as one segment.
    """

    def __init__(self, globs: tuple[str, ...]) -> None:
        self.globs = tuple(globs)

    def select(self, model: nn.Module) -> list[str]:
        """The paths to checkpoint: outermost matches only. A glob that matches nothing is an error."""
        if not self.globs:
            return []
        if self.globs == ("all",):
            found = blocks(model)
            if not found:
                raise UsageError(
                    "checkpoint 'all' means every repeated block of the model (the children of an nn.ModuleList, "
                    "or of an nn.Sequential of blocks), and this model has none; name the modules with globs "
                    "instead, e.g. checkpoint=('encoder.*',)"
                )
            return found
        paths = [p for p, _ in model.named_modules() if p]
        chosen: set[str] = set()
        for glob in self.globs:
            segment = _SEGMENT.match(glob)
            if segment is not None:
                _check_segment(model, glob, segment)
                chosen.add(glob)
                continue
            regex = _glob_regex(glob)
            hits = [p for p in paths if regex.match(p)]
            if not hits:
                hint = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
                raise UsageError(
                    f"checkpoint glob {glob!r} matches no module; module paths look like: {hint} "
                    "('*' matches one path component, '**' several; 'seq[2:5]' a segment of an nn.Sequential)"
                )
            chosen.update(hits)
        # A module inside a checkpointed one (or segment) is recomputed already.
        covered = {name: segment_layers(name) or [name] for name in chosen}

        def inside(name: str) -> bool:
            own = covered[name]
            home = _SEGMENT.match(name)["path"] if _SEGMENT.match(name) else name
            for other, its in covered.items():
                if other == name:
                    continue
                if any(home == q or home.startswith(q + ".") for q in its) or any(
                        p.startswith(q + ".") for p in own for q in its):
                    return True
            return False
        order = {p: i for i, p in enumerate(paths)}
        kept = [name for name in chosen if not inside(name)]
        return sorted(kept, key=lambda name: order.get(covered[name][0], -1))

    def apply(self, model: nn.Module) -> list[str]:
        """Wrap each selected module's forward in a checkpoint; returns the paths.

        A transformers model's KV cache is turned off (``config.use_cache = False``), as
        transformers' own ``gradient_checkpointing_enable`` does: with the cache on, the
        recomputation in backward appends the keys and values a second time, and
        attention with a padding mask fails ("size of tensor a (48) must match ... (24)").
        """
        paths = self.select(model)
        segments: dict[str, list[tuple[int, int]]] = {}
        for path in paths:
            segment = _SEGMENT.match(path)
            if segment is None:
                _wrap(model.get_submodule(path))
            else:
                segments.setdefault(segment["path"], []).append((int(segment["start"]), int(segment["stop"])))
        for path, ranges in segments.items():
            _wrap_segments(model.get_submodule(path), ranges)
        if paths:
            _disable_kv_cache(model)
        return paths

    @staticmethod
    def remove(model: nn.Module, paths: list[str]) -> None:
        """Undo :meth:`apply` for ``paths``: their forward runs plainly again (the Trainer re-plans this way)."""
        for path in paths:
            segment = _SEGMENT.match(path)
            module = model.get_submodule(segment["path"] if segment is not None else path)
            if getattr(module.__dict__.get("forward"), "_memfit_checkpoint", False):
                del module.forward


def _check_segment(model: nn.Module, glob: str, segment: re.Match) -> None:
    try:
        seq = model.get_submodule(segment["path"])
    except AttributeError:
        seq = None
    if not isinstance(seq, nn.Sequential):
        raise UsageError(f"checkpoint segment {glob!r}: {segment['path']!r} is not an nn.Sequential of this model")
    start, stop = int(segment["start"]), int(segment["stop"])
    if not 0 <= start < stop <= len(seq):
        raise UsageError(f"checkpoint segment {glob!r}: {segment['path']!r} has {len(seq)} layers; "
                         f"give [start:stop] with 0 <= start < stop <= {len(seq)}")


def _wrap_segments(seq: nn.Sequential, ranges: list[tuple[int, int]]) -> None:
    """Run ``seq`` with the layers of each range recomputed in backward as one checkpointed segment."""
    ranges = sorted(ranges)
    layers = list(seq)

    def plain(x, start: int, stop: int):
        for layer in layers[start:stop]:
            x = layer(x)
        return x

    run = _once_per_batch(plain, [m for layer in layers for m in layer.modules()])

    def forward(x):
        done = 0
        for start, stop in ranges:
            x = run(x, done, start)
            if torch.is_grad_enabled():
                x = _checkpoint(run, x, start, stop, use_reentrant=False)
            else:
                x = run(x, start, stop)
            done = stop
        return run(x, done, len(layers))

    forward._memfit_checkpoint = True
    seq.forward = forward  # an instance attribute: hooks still run, state_dict() keys do not change


def _disable_kv_cache(model: nn.Module) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True:
            config.use_cache = False
            log.info("memfit: turned off the KV cache of %s (config.use_cache = False), which checkpointing needs; "
                     "set it back to True before generating", type(module).__name__)


def _once_per_batch(fn, modules: list[nn.Module]):
    """``fn``, which leaves BatchNorm's running statistics alone when checkpointing recomputes it in backward.

    In training, BatchNorm normalizes with the batch's statistics and folds them
    into its running mean and variance. Recomputing its forward would fold the same
    batch in a second time (torch.utils.checkpoint does not prevent it). The
    recomputation must save the same tensors as the forward did, so BatchNorm runs
    as it did, and its running statistics are put back afterwards (also when the
    recomputation stops early, which non-reentrant checkpointing does).
    """
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not norms:
        return fn

    def run(*args, **kwargs):
        if not _torch_private.in_backward():
            return fn(*args, **kwargs)
        saved = [(b, b.clone()) for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if b is not None]
        try:
            return fn(*args, **kwargs)
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)

    return run


def _wrap(module: nn.Module) -> None:
    if "forward" in module.__dict__ and getattr(module.forward, "_memfit_checkpoint", False):
        return  # already wrapped
    inner = _once_per_batch(module.forward, list(module.modules()))

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return _checkpoint(inner, *args, use_reentrant=False, **kwargs)

    forward._memfit_checkpoint = True
    # An instance attribute: module hooks still run, state_dict() keys do not change.
    module.forward = forward
