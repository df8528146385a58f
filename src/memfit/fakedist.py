"""One process standing for any rank of N: what ``estimate(..., world_size=N)`` traces.

PyTorch's fake process group (the ``"fake"`` backend, on which ``FSDPMemTracker`` is tested)
answers every collective at once and moves nothing, so one process runs a rank's step with
the real wrapping:

* ``fsdp``: FSDP2's own ``fully_shard`` (:class:`memfit.sharding.Sharding`) on the fake model,
  over a device mesh of N fake ranks: each parameter's local shard, the all-gathered blocks, the
  all-gather and reduce-scatter buffers, the unsharded gradients kept while accumulating without
  sync, are the ones FSDP allocates, byte for byte (the tests check a real run of 2 gloo ranks);
* ``ddp``: ``DistributedDataParallel``'s constructor checks the parameters' shapes across ranks
  with a collective that reads values (``_verify_param_shape_across_processes``), which fake
  tensors do not have, so DDP's memory is modelled by :class:`BucketViews` from its reducer's
  rules (torch/csrc/distributed/c10d/reducer.cpp), the only part of DDP that holds memory.

Why not the composable ``replicate``: in torch 2.13 it is FSDP2's code with a replicated mesh,
not DDP's reducer, so it would model a different engine from the one the Trainer runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memfit import _torch_private
from memfit.config import Config
from memfit.errors import UsageError
from memfit.sharding import Sharding, no_sync

__all__ = ["fake_world", "rank_world", "as_rank", "BucketViews", "DDP_BUCKET_BYTES"]

DDP_BUCKET_BYTES = 25 * 1024 * 1024
"""DDP's default ``bucket_cap_mb`` (25), in bytes."""


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[Any]:
    """A fake default process group of ``world_size`` ranks (this process is rank 0); yields its device mesh.

    Raises:
        UsageError: a process group is initialised already (a real run's): the fake one cannot
            stand beside it.
    """
    if dist.is_initialized():
        raise UsageError("a per-rank estimate runs under PyTorch's fake process group, and this process has one "
                         "initialised already; estimate before init_process_group (or in another process), "
                         "or estimate strategy='single'")
    from torch.distributed.device_mesh import init_device_mesh

    hook = sys.excepthook  # init_process_group wraps it to prefix "[rank0]" and destroy does not undo it
    dist.init_process_group("fake", store=_torch_private.fake_store(), rank=0, world_size=world_size)
    try:
        # Made outside FakeTensorMode: the mesh's own tensors are real (and tiny).
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def rank_world(config: Config, world_size: int) -> contextlib.AbstractContextManager:
    """What a rank of ``config``'s strategy needs around its trace: FSDP's fake world and mesh (None otherwise)."""
    return fake_world(world_size) if config.strategy == "fsdp" else contextlib.nullcontext()


def as_rank(model: nn.Module, config: Config, mesh: Any
            ) -> tuple[nn.Module, BucketViews | None, Callable[[], Any] | None]:
    """A fake model as one rank of ``config``'s strategy holds it: the module to run, DDP's buckets (to count
    in the tracker), and the context that turns gradient sync off for accumulation (None: one process)."""
    if config.strategy == "fsdp":
        with _torch_private.lazy_fsdp_chunks():  # FSDP's chunks of rank 0 only: the same views, made at once
            model = Sharding(config, torch.device("cpu"), mesh=mesh).apply(model)
        return model, None, None if config.sync_every_micro_step else (lambda: no_sync(model))
    if config.strategy == "ddp":  # memfit's DDP accumulates in its buckets (sharding.no_sync): no sync to turn off
        return model, BucketViews(model), None
    return model, None, None


class BucketViews:
    """DDP's gradient buckets on a model, as ``DistributedDataParallel(gradient_as_bucket_view=True)`` holds them.

    What DDP's reducer does with memory, and what this does on the same tensors:

    * the buckets exist from construction to the end of the run: one flat tensor per bucket,
      filled by DDP's own assignment (:func:`memfit._torch_private.ddp_bucket_assignment`) in the
      order gradients become ready (the parameters reversed), 1 MiB for the first bucket and
      25 MiB for each other (the layout DDP rebuilds after its first iteration; the first
      iteration's one bucket per dtype holds the same bytes);
    * when a parameter's gradient is ready in a synced backward, it is copied into its view of the
      bucket and ``p.grad`` becomes that view (``mark_variable_ready_dense``): the gradient autograd
      made is freed, and with ``zero_grad(set_to_none=True)`` the next backward makes one again;
    * under accumulation the gradients keep adding into their views of the buckets, as in memfit's
      Trainer, which defers DDP's reduction rather than using ``no_sync`` (a loop under ``no_sync``
      keeps gradients beside the buckets until its last micro-step: twice the gradients' memory);
    * with buffers, each forward broadcasts them from rank 0 through one flat copy per dtype
      (``_sync_buffers``, ``broadcast_buffers=True``).

    The all-reduce itself works in place on the buckets. Parameters are broadcast once at
    construction, before any step.
    """

    CATEGORY = "ddp_buckets"
    STRENGTH = 35  # above gradients (30): a bucket that holds gradients is counted as the bucket

    def __init__(self, model: nn.Module, *, bucket_bytes: int = DDP_BUCKET_BYTES) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        ready_order = params[::-1]
        limits = [_torch_private.ddp_first_bucket_bytes(), bucket_bytes]
        self.buckets: list[torch.Tensor] = []
        self._views: dict[int, torch.Tensor] = {}
        for indices in _torch_private.ddp_bucket_assignment(ready_order, limits):
            members = [ready_order[i] for i in indices]
            flat = torch.empty(sum(p.numel() for p in members), dtype=members[0].dtype, device=members[0].device)
            offset = 0
            for p in members:
                self._views[id(p)] = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self.buckets.append(flat)
        self._buffers = [b for b in model.buffers()]
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._handles.append(model.register_forward_pre_hook(self._broadcast_buffers))

    def mark(self, tracker: Any) -> None:
        """Count the buckets in ``tracker`` under :attr:`CATEGORY` (they were made before it started)."""
        if self.CATEGORY not in tracker.categories:
            tracker.add_category(self.CATEGORY, strength=self.STRENGTH)
        tracker.mark(self.buckets, self.CATEGORY)

    def _ready(self, p: torch.Tensor) -> None:
        view = self._views[id(p)]
        if p.grad is not view:
            view.copy_(p.grad)
            p.grad = view

    def _broadcast_buffers(self, module: nn.Module, args: Any) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self._buffers:
            by_dtype.setdefault(b.dtype, []).append(b.reshape(-1))
        for flat in by_dtype.values():
            torch.cat(flat)  # the flat copy broadcast and copied back; freed at once

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
