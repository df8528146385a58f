"""Every random number generator a training run draws from: captured, restored, and found in a data loader.

A run is reproducible only if each generator it draws from is restored in the
order the uninterrupted run drew from it. Those are torch's global CPU
generator (dropout, ``iter(DataLoader)`` without a generator, a shuffling
sampler without one), CUDA's per device, Python's ``random`` and NumPy's global
state (augmentations), and the ``torch.Generator`` objects a data loader holds
(``DataLoader(generator=g)``, ``RandomSampler(generator=g)``), which
``iter(loader)`` and shuffling draw from.

Everything is kept as tensors, ints and lists, so a saved state loads with
``torch.load(..., weights_only=True)``. :func:`problems` says what keeps a state
from restoring, each generator's state set on a throwaway generator of its kind,
before anything global changes.

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

__all__ = ["capture", "restore", "problems", "generator_problems", "loader_generators", "fingerprint"]


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
    """Put every generator in ``state`` (from :func:`capture`, portable or not) back as it was.

    CUDA's states are restored for the devices this process sees (a run saved with more
    visible devices used none of the others here). Check ``state`` with :func:`problems`
    first where it comes from a file: a bad state raises midway, with some generators set.
    """
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[:torch.cuda.device_count()])
    if state.get("python") is not None:
        random.setstate(_python_state(state["python"]))
    if state.get("numpy") is not None:
        import numpy as np

        np.random.set_state(_numpy_state(state["numpy"], np))


def problems(state: Any, what: str = "the saved random state") -> list[str]:
    """What keeps :func:`restore` from restoring ``state``, one phrase each naming ``what``; none: it restores.

    Each state is set on a throwaway generator of its kind (``torch.Generator()``,
    ``random.Random()``, ``numpy.random.RandomState()``): no global generator changes.
    """
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        return [f"{what} has no CPU generator state"]
    found = generator_problems([state["cpu"]], f"{what}'s CPU generator")
    cuda = state.get("cuda")
    if cuda is not None and (not isinstance(cuda, (list, tuple)) or not all(_is_cuda_state(s) for s in cuda)):
        found.append(f"{what}'s CUDA generators are not torch.cuda.get_rng_state_all()'s (a list of uint8 tensors "
                     f"of {_CUDA_STATE_BYTES} bytes), got {_describe(cuda)}")
    if state.get("python") is not None:
        try:
            random.Random().setstate(_python_state(state["python"]))
        except Exception as exc:  # noqa: BLE001 - whatever setstate refuses on a throwaway, restore would too
            found.append(f"{what}'s Python generator is not random.getstate()'s ({exc})")
    if state.get("numpy") is not None:
        try:
            import numpy as np
        except ImportError:
            found.append(f"{what} has NumPy's generator, and NumPy is not installed here: pip install numpy")
        else:
            try:
                np.random.RandomState().set_state(_numpy_state(state["numpy"], np))
            except Exception as exc:  # noqa: BLE001 - as above, on a throwaway RandomState
                found.append(f"{what}'s NumPy generator is not numpy.random.get_state()'s ({exc})")
    return found


def generator_problems(states: Any, what: str) -> list[str]:
    """What keeps ``states`` (CPU ``torch.Generator.get_state()`` tensors) from being set, one phrase each."""
    if not isinstance(states, (list, tuple)):
        return [f"{what} states are not a list of torch.Generator states, got {_describe(states)}"]
    found = []
    for i, value in enumerate(states):
        name = what if len(states) == 1 else f"{what} {i}"
        try:
            if not isinstance(value, torch.Tensor):
                raise TypeError
            torch.Generator().set_state(value)  # a throwaway: checks the dtype and the size as restoring does
        except (TypeError, RuntimeError):
            found.append(f"{name} state is not torch.get_rng_state()'s (a uint8 tensor of {_CPU_STATE_BYTES} "
                         f"bytes), got {_describe(value)}")
    return found


_CPU_STATE_BYTES = torch.get_rng_state().numel()
_CUDA_STATE_BYTES = 16
"""A CUDA generator's state: its seed and Philox offset, 8 bytes each (CUDAGeneratorImpl::set_state, checked on
torch 2.13; it also takes the seed alone). Checked by size here: CUDA checks it only when it starts, after a load."""


def _is_cuda_state(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.device.type == "cpu"
            and value.numel() in (_CUDA_STATE_BYTES, _CUDA_STATE_BYTES // 2))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _python_state(saved: Any) -> tuple:
    """``random.setstate``'s tuple from a captured Python state (portable: a list, its internal state a list)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def _numpy_state(saved: Any, np: Any) -> tuple:
    """``numpy.random.set_state``'s tuple from a captured NumPy state (portable: its keys an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = saved
    if isinstance(keys, torch.Tensor):
        if keys.dtype != torch.int64:
            raise TypeError(f"its keys are {keys.dtype}, not torch.int64")
        keys = keys.numpy().astype(np.uint32)
    return name, keys, pos, has_gauss, gauss


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
