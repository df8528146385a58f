"""The few private torch APIs memfit needs, in one place.

Checked on torch 2.13, the release CI runs (``pyproject.toml``'s floor); written
from PyTorch's source of 2.6 onward. Each function has a fallback so that a torch
release that renames what it calls degrades a feature instead of breaking memfit.
The two classes memfit builds on are private modules' public classes, stable
since torch 2.0: ``FakeTensorMode`` (tensors with shapes and no memory: the
estimator) and ``TorchDispatchMode`` (every aten op below autograd: the tracker).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FakeTensorMode", "TorchDispatchMode", "in_backward", "is_fake", "fake_friendly_grad_scaler",
           "grad_scaler_state", "reset_grad_scaler_step", "data_dependent_errors", "quiet_fake_tensor_errors",
           "cpu_flash_attention", "cpu_flash_attention_backward", "has_cpu_flash_attention",
           "autocast_cpu_excluded", "autocast_cpu_ops", "drop_library",
           "softmax_half_to_float", "fake_item_values", "reset_fsdp_iteration", "fsdp_agreed_comms", "ddp_rebuilds_buckets", "record_memory_history",
           "dump_memory_snapshot"]

# Which autograd graph task runs on this thread, -1 outside backward. There is
# no public equivalent; FSDP and torch.utils.checkpoint use the same call.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread."""
    if _graph_task_id is None:  # pragma: no cover - future torch
        return False
    return _graph_task_id() != -1


def is_fake(t: torch.Tensor) -> bool:
    """True for a FakeTensor (torch._subclasses is private; checked on 2.6-2.13)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - future torch
        return False
    return isinstance(t, FakeTensor)


def fake_friendly_grad_scaler(device_type: str):
    """A GradScaler whose step works on FakeTensors.

    ``GradScaler._maybe_opt_step`` (private) reads ``found_inf.item()``, which a
    FakeTensor cannot answer; on fake tensors we assume no inf was found, which is
    the memory path of every step that is not skipped. Checked on torch 2.6-2.13.
    """

    class _FakeFriendlyGradScaler(torch.amp.GradScaler):
        def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
            found = list(optimizer_state["found_inf_per_device"].values())
            if found and all(is_fake(t) for t in found):
                return optimizer.step(*args, **kwargs)
            return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)

    return _FakeFriendlyGradScaler(device_type)


def grad_scaler_state(scaler) -> list[torch.Tensor]:
    """The tensors a GradScaler keeps across steps (its private ``_scale`` and ``_growth_tracker``)."""
    return [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)) if t is not None]



def reset_grad_scaler_step(scaler) -> None:
    """Forget a GradScaler's half-done step (``unscale_`` called, ``update`` not), as after an OOM.

    ``GradScaler`` keeps per-optimizer flags in the private ``_per_optimizer_states``
    until ``update()``; a step that failed in between would make the retry's
    ``unscale_`` raise "already been called". Checked on torch 2.6-2.13.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.clear()  # a defaultdict: the next step starts fresh


def data_dependent_errors() -> tuple[type[Exception], tuple[type[Exception], ...]]:
    """FakeTensorMode's errors for ops that need tensor values: (output shape depends on values, value read).

    ``DynamicOutputShapeException`` (nonzero, boolean-mask indexing, unique) and
    ``DataDependentOutputException`` (``.item()``, ``float(t)``, ``if t:``), both
    with the op in ``.func``; in torch._subclasses.fake_tensor since 2.0.
    """
    try:
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    except ImportError:  # pragma: no cover - future torch
        return (_Never, (_Never,))
    return DynamicOutputShapeException, (DataDependentOutputException,)


class _Never(Exception):
    """Stands for an exception class a torch release no longer has: never raised."""


@contextlib.contextmanager
def quiet_fake_tensor_errors():
    """Silence FakeTensorMode's own log of an op that failed (a traceback at ERROR level on stderr).

    The exception still propagates and memfit reports it in one line; the logger's
    name is torch._subclasses.fake_tensor (torch 2.6 to 2.13).
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def cpu_flash_attention(query, key, value, dropout_p: float, is_causal: bool, attn_mask, scale):
    """The output of the CPU flash-attention kernel's op (``aten._scaled_dot_product_flash_attention_for_cpu``),
    whose saved tensors (output and log-sum-exp) have the shapes of CUDA's fused kernels; None if this torch
    has no such op, and the caller runs attention unchanged."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    return op(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def cpu_flash_attention_backward(grad, query, key, value, out, logsumexp, dropout_p: float, is_causal: bool,
                                 attn_mask, scale):
    """Gradients of q, k, v from the CPU flash-attention kernel's backward op; None if this torch has none."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if op is None:
        return None
    return op(grad, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)


def has_cpu_flash_attention() -> bool:
    """Whether this torch has the CPU flash-attention kernel's forward and backward ops."""
    return all(hasattr(torch.ops.aten, name) for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"))


def autocast_cpu_excluded():
    """A context in which CPU autocast's kernels are skipped, as the C++ autocast wrappers do before they
    redispatch (``ExcludeDispatchKeyGuard`` on ``AutocastCPU``; torch._C, torch 2.6-2.13)."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def autocast_cpu_ops() -> frozenset[str]:
    """The aten ops (``"softmax.int"``, ``"mm"``) with a kernel on the ``AutocastCPU`` dispatch key in this torch."""
    get = getattr(torch._C, "_dispatch_get_registrations_for_dispatch_key", None)
    if get is None:  # pragma: no cover - future torch
        return frozenset()
    return frozenset(name.removeprefix("aten::") for name in get("AutocastCPU") if name.startswith("aten::"))


def drop_library(lib) -> None:
    """Remove a ``torch.library.Library``'s registrations now (the kernels they replaced are back).

    ``Library._destroy`` is what its finalizer calls (torch 2.6-2.13); without it the
    registrations go when the object is garbage-collected.
    """
    destroy = getattr(lib, "_destroy", None)
    if destroy is not None:
        destroy()


def softmax_half_to_float(name: str):
    """The kernel op that ``softmax.int``/``log_softmax.int`` (``name``) call on CUDA for a half input with
    ``dtype=float``: ``aten._softmax``/``aten._log_softmax`` with ``half_to_float=True`` (SoftMax.cpp; the ops are
    underscore-named, in torch 2.6-2.13 with this schema). None for another op or if this torch lacks it."""
    kernel = {"softmax.int": "_softmax", "log_softmax.int": "_log_softmax"}.get(name)
    packet = getattr(torch.ops.aten, kernel, None) if kernel is not None else None
    return packet.default if packet is not None else None


class _FakeItemValues(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and is_fake(args[0]):
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point or dtype.is_complex else 1)
        return func(*args, **(kwargs or {}))


def fake_item_values():
    """A context in which ``.item()`` of a FakeTensor gives 1 (1.0, True) instead of raising.

    For optimizers on fake tensors only: Adafactor reads its step and the norms of the
    parameter and the update with ``.item()`` (torch/optim/_adafactor.py) to scale the update,
    and bitsandbytes builds its 8-bit quantization map with ``.tolist()`` when the optimizer is
    made; the values change the numbers, not the tensors allocated. ``aten._local_scalar_dense`` is
    the op ``.item()`` dispatches (torch 2.6-2.13).
    """
    return _FakeItemValues()



def reset_fsdp_iteration(model: torch.nn.Module) -> bool:
    """FSDP2's per-iteration state as after a completed backward, after one that raised; False if it cannot.

    A backward that raises never runs FSDP2's root post-backward callback, which resets every
    state and parameter group (``_root_post_backward_final_callback``, torch/distributed/fsdp/
    _fully_shard/_fsdp_state.py), and leaves the flag saying the callback is queued set, so no
    later step would be finalized. torch 2.13's public ``FSDPModule.reset_iter_state()`` (the
    floor) undoes that: waits for in-flight collectives, reshards, clears the trackers. It does
    not drop the gradients ``no_sync`` micro-steps accumulated on the *unsharded* parameters
    (``FSDPParam._unsharded_param.grad``, or ``unsharded_accumulated_grad`` under a reduce
    dtype): the next reduce-scatter would add the failed attempt's gradients to the retry's
    (issue 25: biases off by 2e-3 after a retry at micro-batch 2). They are dropped here.
    """
    try:
        model.reset_iter_state()
        for state in model._get_fsdp_state()._state_ctx.all_states:
            for group in state._fsdp_param_groups:
                for param in group.fsdp_params:
                    unsharded = getattr(param, "_unsharded_param", None)
                    if unsharded is not None:
                        unsharded.grad = None
                    param.unsharded_accumulated_grad = None
    except AttributeError as exc:  # a torch release that moved these: say so, do not guess
        logging.getLogger("memfit").warning("memfit: cannot reset FSDP's state after a failed step on torch %s (%s)", torch.__version__, exc)
        return False
    return True


def ddp_rebuilds_buckets(model: torch.nn.Module) -> bool:
    """True until a DDP wrapper's reducer has rebuilt its buckets: the first forward after its first backward
    does, a collective (the ranks sync the bucket order: ``_pre_forward`` in torch/nn/parallel/distributed.py,
    which sets ``_has_rebuilt_buckets``). Checked on torch 2.13; True (the safe answer) if the name moved."""
    return not getattr(model, "_has_rebuilt_buckets", False)


def fsdp_agreed_comms(agree, path: str) -> tuple[object, object] | None:
    """FSDP2 all-gather and reduce-scatter comms that call ``agree(where)`` right before their collective.

    FSDP2 lets a module's collectives be replaced (``FSDPModule.set_custom_all_gather`` and
    ``set_custom_reduce_scatter``, public since torch 2.8) by objects with ``allocate`` (the
    buffer) and ``__call__`` (the collective); ``foreach_all_gather`` and ``foreach_reduce``
    (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py) allocate, copy in, then call.
    These allocate as FSDP's defaults do (``torch.empty``) and agree before the collective, so a
    rank whose allocation or copy-in ran out of memory is met at the agreement, never inside the
    collective. The interfaces' module is private (``_fsdp_api``). None where this torch lacks it.
    """
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
    except ImportError:
        return None

    class _Alloc:
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

    class AgreedAllGather(_Alloc, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            agree(f"the all-gather of {path}")
            return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    class AgreedReduceScatter(_Alloc, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            agree(f"the reduce-scatter of {path}'s gradients")
            return dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op,
                                              async_op=async_op)

    return AgreedAllGather(), AgreedReduceScatter()


_DTENSOR: type | None = None  # DTensor's class, once torch.distributed.tensor is imported (it takes 1 s to)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``t``'s memory on this rank: a DTensor's local shard, else ``t``.

    A DTensor (FSDP2's sharded parameters, their gradients and optimizer state) is a wrapper
    with the global shape and no storage of its own; ``_local_tensor`` is the rank's part
    (``to_local()`` would be an autograd op, seen as one by a dispatch mode).
    """
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        if module is None:  # never imported: no tensor can be a DTensor
            return t
        _DTENSOR = module.DTensor
    return t._local_tensor if type(t) is _DTENSOR else t


def is_fsdp_module(module: torch.nn.Module) -> bool:
    """True for a module ``fully_shard`` was applied to (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def fake_store():
    """The store of PyTorch's fake process group (importing it registers the ``"fake"`` backend).

    ``torch.testing._internal.distributed.fake_pg`` (torch 2.6-2.13): collectives that return at
    once and move nothing, on one process standing for any rank; what ``FSDPMemTracker``'s tests use.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def ddp_bucket_assignment(params: list[torch.Tensor], limits: list[int]) -> list[list[int]]:
    """The indices of ``params`` in each of DDP's gradient buckets, by DDP's own C++ assignment.

    ``torch.distributed._compute_bucket_assignment_by_size`` (torch/csrc/distributed/c10d/reducer.cpp,
    ``compute_bucket_assignment_by_size``): parameters fill a bucket until it reaches its limit, one
    bucket per dtype; the limits are DDP's (``first_bucket_bytes``, then ``bucket_bytes`` for the rest).
    It reads shapes and dtypes only, so fake tensors serve.
    """
    import torch.distributed as dist

    indices, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
    return [list(bucket) for bucket in indices]


def ddp_first_bucket_bytes() -> int:
    """DDP's cap on the first bucket it rebuilds after the first iteration (1 MiB on torch 2.6-2.13)."""
    import torch.distributed as dist

    return getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1024 * 1024)


def fsdp_all_gather_copy_in():
    """FSDP2's op that copies a group's shards into the all-gather buffer (``torch.ops.fsdp``, torch 2.6-2.13), or None."""
    try:
        return torch.ops.fsdp.all_gather_copy_in.default
    except (AttributeError, RuntimeError):  # not registered until torch.distributed.fsdp is imported
        return None


class _LazyChunks:
    """``torch.chunk(tensor, n, dim)`` padded with empty tensors to ``n`` (FSDP2's ``_chunk_with_empty``), each
    chunk made when it is asked for: the same views (``narrow`` at the same offsets), without the n - 1 others."""

    def __init__(self, tensor: torch.Tensor, n: int, dim: int) -> None:
        self.tensor, self.n, self.dim = tensor, n, dim
        size = tensor.size(dim)
        self.step = -(-size // n)  # torch.chunk's chunk size: the ceiling

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        size = self.tensor.size(self.dim)
        start = i * self.step
        if size == 0:  # torch.chunk gives n empty chunks of an empty dimension
            return self.tensor.narrow(self.dim, 0, 0)
        if start < size:
            return self.tensor.narrow(self.dim, start, min(self.step, size - start))
        return self[0].new_empty(0)  # past the last chunk torch.chunk makes

    def __iter__(self):
        return (self[i] for i in range(self.n))


@contextlib.contextmanager
def lazy_fsdp_chunks():
    """While ``fully_shard`` runs, FSDP2 cuts each parameter in ``world_size`` chunks to keep one
    (``_chunk_with_empty`` in torch/distributed/fsdp/_fully_shard/_fsdp_common.py, used by ``FSDPParam``,
    which reads ``chunks[rank]`` and ``chunks[0]``). On fake tensors each chunk costs a FakeTensor: 1024
    ranks x 700 parameters is most of a 70B estimate. This hands ``FSDPParam`` :class:`_LazyChunks`
    instead. Checked on torch 2.13; where the name moved, FSDP's own runs unchanged."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
        original = _fsdp_param._chunk_with_empty
    except (ImportError, AttributeError):
        yield
        return
    _fsdp_param._chunk_with_empty = _LazyChunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def record_memory_history(enabled: bool, max_entries: int = 100_000) -> bool:
    """Start or stop the CUDA caching allocator's record of allocations with their stacks
    (``torch.cuda.memory._record_memory_history``, the source of memory_viz snapshots); False where it is
    not available (no CUDA, a torch without it)."""
    record = getattr(torch.cuda.memory, "_record_memory_history", None)
    if record is None or not torch.cuda.is_available():
        return False
    try:
        record("all" if enabled else None, max_entries=max_entries)
    except (RuntimeError, TypeError) as exc:
        logging.getLogger("memfit").debug("memfit: no CUDA memory history: %s", exc)
        return False
    return True


def dump_memory_snapshot(path: str) -> bool:
    """Write the CUDA allocator's snapshot with its recorded history to ``path``
    (``torch.cuda.memory._dump_snapshot``: a pickle for pytorch.org/memory_viz); False where it cannot."""
    dump = getattr(torch.cuda.memory, "_dump_snapshot", None)
    if dump is None or not torch.cuda.is_available():
        return False
    try:
        dump(path)
    except (RuntimeError, OSError) as exc:
        logging.getLogger("memfit").debug("memfit: no CUDA memory snapshot: %s", exc)
        return False
    return True
