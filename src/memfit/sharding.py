"""Sharding: the model wrapped for the config's strategy, on PyTorch's own engines (DDP, FSDP2).

``Sharding(config, device).apply(model)`` returns the module to train:

* ``single``: the model itself.
* ``ddp``: ``DistributedDataParallel(model, gradient_as_bucket_view=True)`` with its
  reduction deferred (below).
* ``fsdp``: FSDP2's ``fully_shard`` on each repeated block (:func:`memfit.checkpointing.blocks`)
  and on the root, as torchtitan applies it; ``reshard_after_forward`` from the config; for
  ``*-mixed`` precisions a ``MixedPrecisionPolicy`` that gathers parameters in the low
  precision and reduces gradients in float32 (the step's autocast runs as on one device).

Why DDP's reduction is deferred: DDP all-reduces gradient buckets while backward runs, so
a rank that runs out of memory halfway through backward leaves its peers waiting in a
bucket's all-reduce it will never join, and the reducer itself cannot start another
iteration ("Expected to have finished reduction in the prior iteration",
torch/csrc/distributed/c10d/reducer.cpp). The wrapper gets a communication hook (DDP's
public ``register_comm_hook``) that leaves each bucket as it is and records it; once every
rank has said it got through backward (:mod:`memfit.engine.comm`), :meth:`DeferredReduce.reduce`
all-reduces the recorded buckets, which the gradients are views of, and divides them by the
world size, as DDP's default hook does (or by the batch's total: :meth:`DeferredReduce.reduce`). DDP's bucketing, parameter broadcast and buffer
broadcast are unchanged. The price is the overlap of the all-reduce with backward; after a
failed attempt the wrapper is rebuilt (:meth:`Sharding.rebuilt`), which resets the reducer.

Known limitations: FSDP needs repeated blocks to shard one at a time (a model without
them is refused: the root alone would gather every parameter at once); FSDP with the
16-mixed GradScaler is refused by :class:`memfit.Config` (each rank would check only its
shard for inf).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memfit import _torch_private
from memfit.checkpointing import blocks
from memfit.config import Config
from memfit.errors import MemfitError, UsageError
from memfit.strategies import Precision

__all__ = ["Sharding", "DeferredReduce", "inner_module", "shard_units", "full_state_dict", "no_sync",
           "issues_collectives", "is_fsdp"]


def inner_module(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 wraps in place: the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, FSDP's shards gathered (every rank takes part; every rank gets it)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return {k: v.detach().cpu() for k, v in inner_module(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload=True would give the state to rank 0 only: gathered on the device, then copied.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in state.items()}


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Backward passes accumulate gradients without reducing them: DDP's ``no_sync``, FSDP2's gradient sync off.

    Under DDP with its reduction deferred (:class:`DeferredReduce`) nothing is needed: backward reduces
    nothing, and the gradients accumulate in the buckets they are views of, reduced once after the
    agreement; ``no_sync`` would keep them apart from the buckets instead (twice the gradients' memory).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if getattr(model, "_memfit_deferred", None) is not None:
            yield
            return
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def issues_collectives(model: nn.Module, phase: str) -> bool:
    """Whether ``model`` (as :meth:`Sharding.apply` returned it) issues collectives in a micro-step's ``phase``
    (``"forward"`` or ``"backward"``) that no agreement of their own precedes: FSDP's gathers and
    reduce-scatters each agree first (:meth:`Sharding._agree_before_collectives`); DDP with its reduction
    deferred (:class:`DeferredReduce`) issues none in backward, and in forward the broadcast of its buffers
    and, once per wrapper, the rebuild of its buckets."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if phase == "backward":
            return getattr(model, "_memfit_deferred", None) is None
        # The forward after a new wrapper's first backward rebuilds its buckets, in a collective.
        return (bool(model.broadcast_buffers) and any(True for _ in model.module.buffers())) or \
            _torch_private.ddp_rebuilds_buckets(model)
    return False


def is_fsdp(model: nn.Module) -> bool:
    """``model`` was sharded by FSDP2 (its ranks run the same collectives in every micro-step)."""
    return _torch_private.is_fsdp_module(model)


def shard_units(model: nn.Module) -> list[str]:
    """The submodules FSDP shards one at a time (each gathered for its own forward and backward), in forward order.

    Raises:
        UsageError: the model has no repeated blocks.
    """
    units = [p for p in blocks(model) if "[" not in p]  # a Sequential's segment is not a module of its own
    if not units:
        params = sum(p.numel() for p in model.parameters())
        raise UsageError(f"strategy 'fsdp' shards a model one repeated block at a time, and "
                         f"{type(model).__name__} has none (no ModuleList or Sequential of blocks): only the root "
                         f"would be sharded, all {params:,} parameters gathered at once for every forward and "
                         "backward; use strategy 'ddp', or group the layers in an nn.ModuleList")
    return units


class DeferredReduce:
    """DDP's communication hook that reduces nothing during backward and all-reduces the buckets on :meth:`reduce`."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.buckets: dict[int, torch.Tensor] = {}  # by address: each micro-step's backward hands the same ones

    def hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        buffer = bucket.buffer()  # with gradient_as_bucket_view the gradients are views of it
        self.buckets[buffer.data_ptr()] = buffer
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future

    def reduce(self, scale: float) -> None:
        """The recorded buckets summed over the ranks, then multiplied by ``scale`` (in place: the gradients
        follow), then forgotten. ``scale`` is ``1 / world_size`` for DDP's own average, or the inverse of the
        batch's total where each rank backpropagated sums (the product replaces the average's division).

        Nothing that allocates runs between the update's agreement and these all-reduces: a rank cannot
        fail there and leave the others inside one.
        """
        buckets = list(self.buckets.values())
        works = [dist.all_reduce(b, async_op=True) for b in buckets]
        for work, bucket in zip(works, buckets):
            work.wait()
            bucket.mul_(scale)
        self.buckets.clear()


class Sharding:
    """The strategy of ``config`` for a model on ``device``; see the module docstring.

    Args:
        agree: called with where it is (``"the all-gather of blocks.1"``) right before each collective
            FSDP issues; None: no agreement (estimates on a fake process group).
        mesh: the device mesh FSDP shards over (default: all ranks of the default group).
    """

    def __init__(self, config: Config, device: torch.device, *, agree: Callable[[str], None] | None = None,
                 mesh: Any = None) -> None:
        self.config = config
        self.device = device
        self.agree = agree
        self.mesh = mesh

    def apply(self, model: nn.Module) -> nn.Module:
        strategy = self.config.strategy
        if strategy == "single":
            return model
        if strategy == "ddp":
            return self._ddp(model)
        return self._fsdp(model)

    def rebuilt(self, model: nn.Module) -> nn.Module:
        """After a failed attempt: DDP rebuilt around the same module (a fresh reducer); FSDP's state reset."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return self._ddp(model.module)
        if self.config.strategy == "fsdp":
            _reset_fsdp(model)
        return model

    def _ddp(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        deferred = DeferredReduce(dist.get_world_size())
        wrapped.register_comm_hook(None, deferred.hook)
        wrapped._memfit_deferred = deferred  # what DistComm.reduce calls after the agreement
        return wrapped

    def _fsdp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        units = shard_units(model)
        mesh = self.mesh if self.mesh is not None else init_device_mesh(self.device.type, (dist.get_world_size(),))
        precision = Precision(self.config.precision)
        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32) \
            if precision.mixed else MixedPrecisionPolicy()
        reshard = self.config.reshard_after_forward
        for path in units:
            block = model.get_submodule(path)
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            self._agree_before_collectives(block, path)
        # The root holds what no block does (embeddings, the head).
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        self._agree_before_collectives(model, "the model")
        return model

    def _agree_before_collectives(self, module: nn.Module, path: str) -> None:
        """The ranks agree right before every all-gather and reduce-scatter FSDP issues for ``module``, its
        prefetches included (FSDP2's custom comms, :func:`memfit._torch_private.fsdp_agreed_comms`).

        A rank that fails anywhere before a collective (its computation, or the collective's own
        buffer: the all-gather's unsharded parameters, the reduce-scatter's copy-in) is met by its
        peers at that collective's agreement instead of leaving them inside it (STYLE rule 17).
        """
        if self.agree is None:
            return
        comms = _torch_private.fsdp_agreed_comms(self.agree, path)
        if comms is None:
            raise MemfitError(f"this torch release ({torch.__version__}) has no FSDP2 custom comms "
                              "(set_custom_all_gather), which memfit needs to agree before FSDP's collectives; "
                              "use torch >= 2.8 or strategy 'ddp'")
        module.set_custom_all_gather(comms[0])
        module.set_custom_reduce_scatter(comms[1])


def _reset_fsdp(model: nn.Module) -> None:
    """Free what a failed attempt left gathered and reset FSDP's iteration state; gradient sync back on."""
    from torch.distributed.fsdp import FSDPModule

    if not _torch_private.reset_fsdp_iteration(model):
        raise MemfitError("a step failed under FSDP and this torch release's FSDP state cannot be reset; "
                          "the run cannot retry it safely: restart from the last checkpoint")
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
