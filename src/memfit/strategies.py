"""The memory strategies of a Config, each one small object with one ``apply``.

* :class:`Precision`: ``*-true`` casts the model; ``*-mixed`` runs autocast over
  fp32 weights (and a GradScaler for ``16-mixed``).
* :class:`Checkpointing`: recomputes the forward of chosen modules in backward
  (``torch.utils.checkpoint``, ``use_reentrant=False``, RNG state preserved so
  dropout recomputes the same mask); ``state_dict()`` keys do not change.
* :class:`OffloadActivations`: keeps tensors saved for backward in CPU memory.

:class:`Recipe` puts them together for one device, real or emulated under
fake tensors (memfit always fakes on CPU tensors: some ops abort the process
when fake tensors sit on "cuda" in a CPU-only torch build).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from memfit import _torch_private
from memfit._tree import map_tensors
from memfit.config import Config
from memfit.errors import UsageError

__all__ = ["Precision", "Checkpointing", "OffloadActivations", "fused_attention_emulation", "Recipe", "cast_module",
           "blocks", "segment_layers"]

log = logging.getLogger("memfit")

_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16, "32": torch.float32}


def cast_module(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters and buffers to ``dtype`` in place, keeping tied weights tied.

    Does what ``model.to(dtype)`` does, by replacing each parameter with a new
    one: ``Module.to`` swaps tensors, which fails on FakeTensors (the fake mode
    holds weak references to them), and this way real and fake runs take the same path.
    """
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in new:
                with torch.no_grad():
                    new[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = new[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)
    return model


class Precision:
    """Lightning's precision names applied to a model and a step."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or "-" not in name or name.split("-")[0] not in _DTYPES:
            raise UsageError(f"unknown precision {name!r}")
        self.name = name
        bits, mode = name.split("-", 1)
        self.dtype = _DTYPES[bits]
        self.mixed = mode == "mixed"

    def apply(self, model: nn.Module) -> nn.Module:
        """Cast the model for ``*-true``; leave fp32 weights for ``*-mixed``."""
        if not self.mixed and self.dtype != torch.float32:
            cast_module(model, self.dtype)
        return model

    def convert_input(self, batch):
        """For ``*-true``, the batch's floating-point tensors in the model's dtype (as Lightning does)."""
        if self.mixed or self.dtype == torch.float32:
            return batch
        return map_tensors(batch, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    def autocast(self, device_type: str):
        """The autocast context of the forward pass (a no-op outside ``*-mixed``)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def scaler(self, device_type: str, *, fake: bool = False):
        """A GradScaler for ``16-mixed`` (fp16 gradients underflow without one), else None."""
        if self.name != "16-mixed":
            return None
        if fake:
            return _torch_private.fake_friendly_grad_scaler(device_type)
        return torch.amp.GradScaler(device_type)


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


class OffloadActivations:
    """Keep tensors saved for backward off the device until backward needs them."""

    def context(self, device_type: str, *, fake: bool):
        if device_type == "cpu":
            raise UsageError(
                "offload_activations moves saved tensors from an accelerator to CPU memory; "
                "it means nothing on device='cpu' (estimate for device='cuda' instead)"
            )
        if fake:
            # Fake tensors stand for the device on CPU: park saved tensors on "meta", which
            # the tracker does not count, and bring them back in backward as save_on_cpu does.
            return torch.autograd.graph.saved_tensors_hooks(_park, _unpark)
        return torch.autograd.graph.save_on_cpu(pin_memory=True)


def _park(t: torch.Tensor):
    return t.device, t.to("meta")


def _unpark(packed) -> torch.Tensor:
    device, t = packed
    return t.to(device)


@contextlib.contextmanager
def fused_attention_emulation() -> Iterator[None]:
    """On fake CPU tensors standing for CUDA, run attention with dropout as CUDA would.

    With ``dropout_p > 0`` PyTorch's CPU ``scaled_dot_product_attention`` falls back
    to the math kernel, which keeps the seq x seq scores and probabilities for
    backward; on CUDA the flash and memory-efficient kernels support dropout and
    keep only the output and a log-sum-exp. Within this context such a call goes
    to the CPU flash kernel's op, whose fake outputs (and saved tensors) have the
    shapes of CUDA's fused kernels. Calls it cannot map (grouped-query attention
    with unequal heads) run unchanged.

    It swaps ``torch.nn.functional.scaled_dot_product_attention`` for the
    context's duration (models look it up at call time), over the whole step:
    a TorchFunctionMode would be off during backward, where
    ``torch.utils.checkpoint`` recomputes the forward and must take the same path.
    Only ``memfit.estimate`` uses it, on fake tensors.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        mapped = _fused_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if mapped is not None:
            return mapped
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if not dropout_p or query.shape[-3] != key.shape[-3] or query.dim() != 4:
        return None  # the CPU kernel choice already matches CUDA's, or the call is unusual
    return _torch_private.cpu_flash_attention(query, key, value, dropout_p, is_causal, attn_mask, scale)


class Recipe:
    """A Config's strategies for one device type (``"cpu"`` or ``"cuda"``), real or fake."""

    def __init__(self, config: Config, device_type: str, *, fake: bool = False) -> None:
        self.config = config
        self.device_type = device_type
        self.fake = fake
        self.precision = Precision(config.precision)
        self.checkpointing = Checkpointing(config.checkpoint)
        self.offload = OffloadActivations() if config.offload_activations else None
        if self.offload is not None:
            self.offload.context(device_type, fake=fake)  # fail early on a CPU target
        self.checkpointed: list[str] = []
        self._scaler = None

    def apply(self, model: nn.Module) -> nn.Module:
        """Cast and wrap the model (before the optimizer is built)."""
        self.precision.apply(model)
        self.checkpointed = self.checkpointing.apply(model)
        return model

    def tune_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """On fake CPU tensors standing for CUDA, pick the implementation CUDA would pick.

        PyTorch's optimizers default to the foreach implementation on CUDA and to
        the per-tensor loop on CPU; their temporaries differ, so an emulated CUDA
        step must run the foreach one unless the user chose.
        """
        if self.fake and self.device_type == "cuda":
            for group in optimizer.param_groups:
                if group.get("foreach", False) is None and not group.get("fused") and not group.get("differentiable"):
                    group["foreach"] = True

    def emulation(self):
        """A context around the whole run that makes fake CPU kernels choose as CUDA's would."""
        if self.fake and self.device_type == "cuda":
            return fused_attention_emulation()
        return contextlib.nullcontext()

    def scaler(self):
        """The GradScaler of the run (``16-mixed`` only): one for all steps, as its scale is state."""
        if self._scaler is None:
            self._scaler = self.precision.scaler(self.device_type if not self.fake else "cpu", fake=self.fake)
        return self._scaler

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Autocast and activation offload around forward and loss."""
        autocast_device = "cpu" if self.fake else self.device_type
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.precision.autocast(autocast_device))
            if self.offload is not None:
                stack.enter_context(self.offload.context(self.device_type, fake=self.fake))
            yield
