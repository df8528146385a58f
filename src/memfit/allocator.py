"""A model of PyTorch's CUDA caching allocator: from a trace of tensor allocations to reserved bytes.

``torch.cuda.max_memory_allocated`` counts the blocks handed to tensors;
``torch.cuda.max_memory_reserved`` counts the segments the allocator took from
the driver, which is what must fit on the card. This module replays memfit's
allocation trace through the allocator's rules to predict the second figure.

The constants, from ``c10/cuda/CUDACachingAllocator.cpp`` (unchanged from torch
2.0 to 2.13) unless said otherwise:

* every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
* requests up to 1 MiB (``kSmallSize``) are served from a small pool whose
  segments are 2 MiB (``kSmallBuffer``); larger ones from a large pool whose
  segments are 20 MiB (``kLargeBuffer``) for requests under 10 MiB
  (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
* a free block is found best-fit (smallest that fits, same pool); the block is
  split when the remainder is at least 512 bytes (small pool) or more than
  1 MiB (large pool), otherwise the whole block is handed out; freed blocks
  merge with free neighbours in their segment; segments are kept (no
  ``empty_cache``), so reserved memory only grows;
* cuBLAS takes a workspace through the allocator, one per (handle, stream),
  kept for the life of the process: 32 MiB on compute capability 9.0 and up,
  4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB before
  (``aten/src/ATen/cuda/CublasHandlePool.cpp``). Training uses two handles: the
  forward pass and optimizer on the main thread, backward on autograd's device thread;
* the CUDA context (kernels, driver state) is device memory outside the
  allocator: :data:`CUDA_CONTEXT_BYTES`.

Known limitations: one stream; no ``expandable_segments``, ``max_split_size_mb``
or garbage-collection threshold; no fragmentation from other processes; a
driver's out-of-memory retry (free the cache and try again) is not modelled, so
the figure is the reserved memory of an unconstrained run, an upper bound of
what a tight card needs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = [
    "AllocatorEstimate",
    "simulate_caching_allocator",
    "cublas_workspace_bytes",
    "CUDA_CONTEXT_BYTES",
]

MiB = 2**20
MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_BUFFER = 2 * MiB
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB

CUDA_CONTEXT_BYTES = 512 * MiB
"""Device memory the CUDA context takes before any tensor: kernels of torch, cuBLAS and
cuDNN, driver state. Reports range from about 300 MiB with lazy module loading (the
default since CUDA 11.7) to over 1 GiB with eager loading; 512 MiB is memfit's middle
figure. It is not counted by ``max_memory_reserved``; ``nvidia-smi`` shows it."""


def cublas_workspace_bytes(capability: tuple[int, int] = (9, 0)) -> int:
    """cuBLAS workspace of one handle: 32 MiB from Hopper (sm90) on, 8.125 MiB before."""
    return 32 * MiB if capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


def _round(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def _segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(frozen=True, slots=True)
class AllocatorEstimate:
    """What the caching allocator would report for a trace. All figures are int bytes."""

    allocated: int
    """Peak of bytes handed to blocks (``max_memory_allocated``), workspaces included."""
    reserved: int
    """Peak of segment bytes (``max_memory_reserved``)."""
    segments: int
    """Segments taken from the driver (cudaMalloc calls)."""
    workspace: int
    """Workspace bytes (cuBLAS, and others a device profile names) included in both figures."""


class _Pool:
    __slots__ = ("free",)

    def __init__(self) -> None:
        self.free: list[tuple[int, int, int]] = []  # (size, segment, offset), sorted


class _Allocator:
    def __init__(self) -> None:
        self.small = _Pool()
        self.large = _Pool()
        self.blocks: dict[tuple[int, int], list] = {}  # (segment, offset) -> [size, free, pool]
        self.ends: dict[tuple[int, int], int] = {}  # (segment, end offset) -> start offset
        self.segments = 0
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0

    def _insert(self, pool: _Pool, seg: int, off: int, size: int, free: bool) -> None:
        self.blocks[(seg, off)] = [size, free, pool]
        self.ends[(seg, off + size)] = off
        if free:
            bisect.insort(pool.free, (size, seg, off))

    def malloc(self, request: int) -> tuple[int, int]:
        size = _round(request)
        pool = self.small if size <= SMALL_SIZE else self.large
        i = bisect.bisect_left(pool.free, (size, -1, -1))
        if i < len(pool.free):
            block_size, seg, off = pool.free.pop(i)
            del self.blocks[(seg, off)]
            del self.ends[(seg, off + block_size)]
        else:
            block_size, seg, off = _segment_size(size), self.segments, 0
            self.segments += 1
            self.reserved += block_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block_size - size
        split = remaining >= MIN_BLOCK if pool is self.small else remaining > SMALL_SIZE
        if split:
            self._insert(pool, seg, off, size, False)
            self._insert(pool, seg, off + size, remaining, True)
        else:
            self._insert(pool, seg, off, block_size, False)
            size = block_size
        self.allocated += size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return seg, off

    def free(self, handle: tuple[int, int]) -> None:
        seg, off = handle
        size, _, pool = self.blocks.pop(handle)
        del self.ends[(seg, off + size)]
        self.allocated -= size
        # Merge with the free neighbour after, then before.
        after = self.blocks.get((seg, off + size))
        if after is not None and after[1]:
            pool.free.remove((after[0], seg, off + size))
            del self.blocks[(seg, off + size)]
            del self.ends[(seg, off + size + after[0])]
            size += after[0]
        start = self.ends.get((seg, off))
        if start is not None and self.blocks[(seg, start)][1]:
            before = self.blocks.pop((seg, start))
            pool.free.remove((before[0], seg, start))
            del self.ends[(seg, off)]
            off, size = start, size + before[0]
        self._insert(pool, seg, off, size, True)


def simulate_caching_allocator(
    events: list[tuple[int, int, int]],
    *,
    capability: tuple[int, int] = (9, 0),
    cublas_handles: int = 2,
    cublas_workspace: int | None = None,
    other_workspace: int = 0,
) -> AllocatorEstimate:
    """Replay a tracker's allocation trace (``MemoryTracker.allocation_events()``).

    Args:
        events: (op index, storage serial, byte delta) in order; a storage's first
            event allocates it, a negative one frees it, another positive one (a
            resize) is treated as free-and-allocate.
        capability: the GPU's compute capability, which sets the cuBLAS workspace.
        cublas_handles: workspaces held (2 for training: main thread and backward thread).
        cublas_workspace: one handle's workspace, if measured (:class:`memfit.devices.DeviceProfile`);
            by default the size cuBLAS takes for ``capability``.
        other_workspace: other bytes the step keeps through the allocator for the process's life
            (cuDNN workspaces, measured by ``memfit calibrate``).
    """
    alloc = _Allocator()
    workspace = cublas_workspace if cublas_workspace is not None else cublas_workspace_bytes(capability)
    for _ in range(cublas_handles):
        alloc.malloc(workspace)
    if other_workspace:
        alloc.malloc(other_workspace)
    live: dict[int, tuple[tuple[int, int], int]] = {}
    for _, sid, delta in events:
        current = live.get(sid)
        if delta > 0:
            size = delta if current is None else current[1] + delta
            if current is not None:
                alloc.free(current[0])
            if size > 0:
                live[sid] = (alloc.malloc(size), size)
        elif current is not None:
            size = current[1] + delta
            alloc.free(current[0])
            del live[sid]
            if size > 0:  # shrunk by a resize, still alive
                live[sid] = (alloc.malloc(size), size)
    return AllocatorEstimate(
        allocated=alloc.peak_allocated,
        reserved=alloc.peak_reserved,
        segments=alloc.segments,
        workspace=workspace * cublas_handles + other_workspace,
    )
