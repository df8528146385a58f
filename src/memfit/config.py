"""Config: the memory-relevant settings of a training step (micro-batch, precision, checkpointing, offload)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memfit.checks import positive_int
from memfit.errors import UsageError

__all__ = ["Config", "PRECISIONS", "OPTIMIZER_IMPLS", "ZERO_GRADS", "STRATEGIES", "MAX_STEPS", "MAX_WORLD_SIZE", "check_world_size", "check_precision",
           "check_strategy", "accumulation_steps", "balanced_micro_batch", "rank_micro_batches"]

MAX_STEPS = 1000
"""The most training steps measure() and estimate() run: the second shows the steady state, later ones repeat it."""


MAX_WORLD_SIZE = 1 << 20
"""The most ranks a world may have: past any job's size (torch's process group takes a C int; 2**63 was a
TypeError from deep inside torch)."""


def check_world_size(world_size: Any, what: str = "world_size") -> int:
    """``world_size`` if it is a whole number of ranks from 1 to :data:`MAX_WORLD_SIZE`; else a UsageError."""
    positive_int(world_size, what, hint="the ranks (GPUs) trained on")
    if world_size > MAX_WORLD_SIZE:
        raise UsageError(f"{what} takes 1 to {MAX_WORLD_SIZE:,} ranks (GPUs), got {world_size:,}")
    return world_size

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
"""Precision names, as Lightning spells them: ``*-mixed`` keeps fp32 weights and runs
autocast (``16-mixed`` adds a GradScaler); ``*-true`` casts the model itself."""

OPTIMIZER_IMPLS = ("default", "for-loop", "foreach", "fused")
"""How torch.optim runs the update: PyTorch's default (foreach on CUDA, the per-tensor loop on CPU), or one forced."""

ZERO_GRADS = ("set-to-none", "after-forward", "zeros")
"""When a step's gradients are released: see :attr:`Config.zero_grad`."""


STRATEGIES = ("single", "ddp", "fsdp")
"""How the step is spread over the ranks of a ``torch.distributed`` run: ``single`` (one process),
``ddp`` (DistributedDataParallel: every rank holds the whole model, gradients are averaged), ``fsdp``
(FSDP2's ``fully_shard`` on each repeated block and on the root: parameters, gradients and optimizer
state sharded 1/N, parameters gathered per block for its forward and backward)."""


def check_strategy(name: object, what: str = "strategy") -> str:
    """``name`` if it is one of :data:`STRATEGIES`; else a UsageError naming ``what`` and the valid names."""
    if name not in STRATEGIES:
        raise UsageError(f"{what} {name!r} is not one of {', '.join(STRATEGIES)} (single: one process; ddp: "
                         "DistributedDataParallel; fsdp: FSDP2 fully_shard per block)")
    return name


def check_precision(name: object, what: str = "precision") -> str:
    """``name`` if it is one of :data:`PRECISIONS`; else a UsageError naming ``what`` and the valid names."""
    if name not in PRECISIONS:
        raise UsageError(f"{what} {name!r} is not one of {', '.join(PRECISIONS)} "
                         "(Lightning's names: *-mixed keeps fp32 weights under autocast, *-true casts the model)")
    return name


@dataclass(kw_only=True, slots=True, frozen=True)
class Config:
    """How one training step is run, as far as memory is concerned.

    Frozen and hashable: validated once, when made; a changed setting is a new Config
    (``dataclasses.replace(config, micro_batch=4)``), and configs can key a cache.

    Example:
        >>> Config(micro_batch=8, precision="bf16-mixed", checkpoint=("transformer.h.*",))
    """

    micro_batch: int
    """Samples per forward/backward pass (the micro-batch, not the effective batch)."""
    precision: str = "32-true"
    """One of :data:`PRECISIONS`."""
    checkpoint: tuple[str, ...] = ()
    """Module-path globs whose forward is recomputed in backward (torch.utils.checkpoint,
    ``use_reentrant=False``). ``*`` matches within one path component, ``**`` across
    components, ``"seq[2:5]"`` names a segment of an ``nn.Sequential`` (its layers 2 to 4);
    ``"all"`` means every repeated block of the model (:func:`memfit.strategies.blocks`:
    transformer layers, ResNet's residual blocks, VGG's segments).
    A module inside another matched module is not checkpointed twice."""
    offload_activations: bool = False
    """Keep tensors saved for backward in CPU memory (``torch.autograd.graph.save_on_cpu``)."""
    optimizer_impl: str = "default"
    """One of :data:`OPTIMIZER_IMPLS`. Their temporaries differ: AdamW's per-tensor loop holds two
    parameter-sized temporaries of one tensor at a time, ``foreach`` a copy of every ``exp_avg_sq``
    at once (``_foreach_sqrt``), ``fused`` none (one kernel; torch.optim's Adam, AdamW, SGD, Adagrad)."""
    zero_grad: str = "set-to-none"
    """When gradients are released, one of :data:`ZERO_GRADS`: ``"set-to-none"`` right after the
    optimizer step (none alive in the next forward; memfit's own loop), ``"after-forward"`` set to
    None between the forward and the backward (a loop that calls ``zero_grad()`` there: the last
    step's gradients live through the forward), ``"zeros"`` (``zero_grad(set_to_none=False)``:
    gradient memory is never released)."""
    optimizer_in_backward: bool = False
    """Step each parameter in its post-accumulate-grad hook and free its gradient at once
    (PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward
    pass"): the gradients of a few parameters alive instead of all. One optimizer per
    parameter; needs one micro-batch per step (no accumulation) and no GradScaler."""
    strategy: str = "single"
    """One of :data:`STRATEGIES`. The number of ranks is not part of the config: it is the
    run's (``world_size=`` of :func:`memfit.estimate` and :func:`memfit.plan`, ``--gpus`` on the
    command line, the process group's in :class:`memfit.Trainer`)."""
    reshard_after_forward: bool = True
    """FSDP only: free each block's gathered parameters after its forward and gather them again
    for its backward (FSDP2's default; less memory, one more all-gather per block), or keep them
    gathered from the forward to the backward."""
    sync_every_micro_step: bool = False
    """FSDP only, under accumulation: reduce-scatter each micro-step's gradients (only the sharded
    gradients are kept: less memory, one reduce-scatter per micro-step), or only the last one's
    (FSDP2 then keeps unsharded gradients between micro-steps). DDP needs no choice: memfit defers
    its all-reduce and accumulates in its buckets (:mod:`memfit.sharding`)."""

    def __post_init__(self) -> None:
        positive_int(self.micro_batch, "Config.micro_batch")
        check_precision(self.precision, "Config.precision")
        checkpoint = self.checkpoint
        if isinstance(checkpoint, str):
            checkpoint = (checkpoint,)
        if checkpoint is None or checkpoint == ("none",):
            checkpoint = ()
        if not isinstance(checkpoint, (tuple, list)) or not all(isinstance(g, str) and g.strip() for g in checkpoint):
            raise UsageError(
                f"Config.checkpoint must be module-path globs such as ('transformer.h.*',) or 'all', got {self.checkpoint!r}"
            )
        if "all" in checkpoint and len(checkpoint) > 1:
            raise UsageError(f"Config.checkpoint: 'all' cannot be combined with other globs, got {tuple(checkpoint)!r}")
        object.__setattr__(self, "checkpoint", tuple(checkpoint))  # frozen: the one normalisation, at creation
        if not isinstance(self.offload_activations, bool):
            raise UsageError(f"Config.offload_activations must be True or False, got {self.offload_activations!r}")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise UsageError(f"Config.optimizer_impl {self.optimizer_impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
        if self.zero_grad not in ZERO_GRADS:
            raise UsageError(f"Config.zero_grad {self.zero_grad!r} is not one of {', '.join(ZERO_GRADS)}")
        if not isinstance(self.optimizer_in_backward, bool):
            raise UsageError(f"Config.optimizer_in_backward must be True or False, got {self.optimizer_in_backward!r}")
        if self.optimizer_in_backward and self.zero_grad != "set-to-none":
            raise UsageError(f"Config.optimizer_in_backward frees each gradient in its hook; zero_grad={self.zero_grad!r} "
                             "cannot keep them: use zero_grad='set-to-none'")
        check_strategy(self.strategy, "Config.strategy")
        if not isinstance(self.reshard_after_forward, bool):
            raise UsageError(f"Config.reshard_after_forward must be True or False, got {self.reshard_after_forward!r}")
        if not self.reshard_after_forward and self.strategy != "fsdp":
            raise UsageError(f"Config.reshard_after_forward=False applies to strategy='fsdp' only (FSDP2 gathers "
                             f"parameters per block), not to strategy={self.strategy!r}")
        if not isinstance(self.sync_every_micro_step, bool):
            raise UsageError(f"Config.sync_every_micro_step must be True or False, got {self.sync_every_micro_step!r}")
        if self.sync_every_micro_step and self.strategy != "fsdp":
            raise UsageError(f"Config.sync_every_micro_step applies to strategy='fsdp' only (its reduce-scatter "
                             f"per micro-step), not to strategy={self.strategy!r}: DDP accumulates in its buckets "
                             "and reduces once, one process has nothing to sync")
        if self.strategy != "single" and self.optimizer_in_backward:
            raise UsageError(f"Config.optimizer_in_backward runs on one process only; strategy={self.strategy!r} "
                             "reduces gradients across ranks before the update: use optimizer_in_backward=False")
        if self.strategy == "fsdp" and self.precision == "16-mixed":
            raise UsageError("Config.strategy='fsdp' with precision '16-mixed': the GradScaler's inf check sees "
                             "only this rank's shard of the gradients, so ranks could skip different steps; "
                             "use bf16-mixed")
        if self.optimizer_in_backward and self.precision == "16-mixed":
            raise UsageError("Config.optimizer_in_backward cannot run with 16-mixed: the GradScaler checks every "
                             "gradient for inf before any step; use bf16-mixed")

    @property
    def mixed(self) -> bool:
        """True for ``*-mixed`` precisions (fp32 weights, autocast)."""
        return self.precision.endswith("-mixed")

    def describe(self) -> str:
        """One line for tables and messages."""
        parts = [f"micro-batch {self.micro_batch}", self.precision]
        if self.checkpoint:
            parts.append("checkpoint " + ",".join(self.checkpoint))
        if self.offload_activations:
            parts.append("activations offloaded")
        if self.optimizer_impl != "default":
            parts.append(f"{self.optimizer_impl} optimizer")
        if self.zero_grad != "set-to-none":
            parts.append(f"zero_grad {self.zero_grad}")
        if self.optimizer_in_backward:
            parts.append("optimizer step in backward")
        if self.strategy != "single":
            parts.append(self.strategy + ("" if self.reshard_after_forward else " (no reshard after forward)")
                         + (" (sync every micro-step)" if self.sync_every_micro_step else ""))
        return ", ".join(parts)


def accumulation_steps(batch_size: int, micro_batch: int) -> tuple[int, ...]:
    """Micro-batch sizes for ``batch_size`` samples at most ``micro_batch`` each: ``(7,)*14 + (2,)`` for 100, 7."""
    if micro_batch < 1 or batch_size < 1:
        raise UsageError(f"batch_size and micro_batch must be positive, got {batch_size} and {micro_batch}")
    full, rest = divmod(batch_size, micro_batch)
    return (micro_batch,) * full + ((rest,) if rest else ())


def balanced_micro_batch(batch_size: int, largest: int) -> int:
    """The smallest micro-batch that splits ``batch_size`` into as few micro-steps as ``largest`` does.

    ``balanced_micro_batch(256, 50) == 43``: six micro-steps either way (5 x 50 + 6, or 5 x 43 + 41),
    the same work, and each micro-step needs less memory.
    """
    steps = -(-batch_size // largest)
    return -(-batch_size // steps)


def rank_micro_batches(n: int, micro_batch: int, steps: int) -> tuple[int, ...]:
    """This rank's micro-batch sizes when every rank must run ``steps`` micro-steps (their collectives pair up).

    ``steps`` is the most any rank needs (``ceil(n_max / micro_batch)``). A rank whose own split has as
    many gets it (:func:`accumulation_steps`); one with fewer samples spreads them evenly over ``steps``:
    ``rank_micro_batches(10, 4, 4) == (3, 3, 2, 2)``.
    """
    own = accumulation_steps(n, micro_batch)
    if len(own) == steps:
        return own
    if n < steps:
        raise UsageError(f"this rank has {n} samples but every rank runs {steps} micro-steps (another rank has "
                         f"more samples); give every rank the same number of samples per batch, as "
                         "torch.utils.data.DistributedSampler does")
    base, extra = divmod(n, steps)
    return (base + 1,) * extra + (base,) * (steps - extra)
