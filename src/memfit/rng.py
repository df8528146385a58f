"""Every random number generator a training run draws from: captured, restored, and found in a data loader.

A run is reproducible only if each generator it draws from is restored in the
order the uninterrupted run drew from it. Those are torch's global CPU
generator (dropout, ``iter(DataLoader)`` without a generator, a shuffling
sampler without one), CUDA's per device, Python's ``random`` and NumPy's global
state (augmentations), and the ``torch.Generator`` objects a data loader holds
(``DataLoader(generator=g)``, ``RandomSampler(generator=g)``), which
``iter(loader)`` and shuffling draw from.

Everything is kept as tensors, ints and lists, so a saved state loads with
``torch.load(..., weights_only=True)``.

Known limitations: a generator that is neither global nor a ``torch.Generator``
reachable from the loader's attributes (a sampler's own ``random.Random`` or
``numpy.random.Generator``) is not seen; :func:`fingerprint` lets a resumed run
check that it got the same batches all the same.
"""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

import torch

from memfit._tree import tensors

__all__ = ["capture", "restore", "loader_generators", "fingerprint"]


def capture(*, cuda: bool | None = None, portable: bool = True) -> dict[str, Any]:
    """The state of every global generator: torch CPU, CUDA (each device, if initialized), Python, NumPy.

    ``cuda=None`` captures CUDA's when CUDA has been initialized (capturing does not
    initialize it). ``portable=False`` keeps Python's and NumPy's states as their own
    objects (faster, for restoring in the same process); ``True`` makes them tensors
    and lists, for a file.
    """
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "python": random.getstate(),
        "numpy": None,
    }
    np = sys.modules.get("numpy")  # only if the program imported it: nothing to restore otherwise
    if np is not None:
        state["numpy"] = np.random.get_state()
    if portable:
        version, internal, gauss = state["python"]
        state["python"] = [version, list(internal), gauss]
        if state["numpy"] is not None:
            name, keys, pos, has_gauss, gauss = state["numpy"]
            state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every generator in ``state`` (from :func:`capture`, portable or not) back as it was."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        if isinstance(keys, torch.Tensor):
            keys = keys.numpy().astype(np.uint32)
        np.random.set_state((name, keys, pos, has_gauss, gauss))


def loader_generators(loader: Any, depth: int = 3) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a data loader (or an object wrapping one) holds, in a fixed order.

    Searched through attributes up to ``depth`` levels: ``DataLoader.generator``,
    its ``sampler``/``batch_sampler`` and theirs, a custom iterable's ``loader``.
    Each generator once, CPU generators only (a CUDA generator is the device's own state).
    """
    found: list[torch.Generator] = []
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            if obj.device.type == "cpu":
                found.append(obj)
            return
        if isinstance(obj, (str, bytes, int, float, bool, torch.Tensor, torch.nn.Module)) or obj is None:
            return
        try:
            attributes = vars(obj)
        except TypeError:
            return
        for name in sorted(attributes):
            visit(attributes[name], level + 1)

    visit(loader, 0)
    return found


def fingerprint(batch: Any) -> str:
    """A digest of a batch's tensors (dtype, shape and bytes) and other leaves: equal batches, equal digests."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors(batch):
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
