"""The device memfit runs real steps on, looked up in one place.

Estimates need no device (they run on fake tensors, for a target named ``"cpu"`` or
``"cuda"``); measuring, finding a batch size and training run real steps, on the CPU
or on a CUDA device that this torch can see.
"""

from __future__ import annotations

from typing import Any

import torch

from memfit.errors import UsageError

__all__ = ["default_device", "resolve_device"]


def default_device() -> torch.device:
    """CUDA when this torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Any, *, no_cuda: str | None = None) -> torch.device:
    """``device`` (a torch.device, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None: :func:`default_device`) checked.

    Raises:
        UsageError: not a device; a device other than the CPU and CUDA; CUDA where torch sees
            none (``no_cuda`` is that message, when the caller has a better fix to suggest).
    """
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(no_cuda or f"device {str(device)!r} was asked for but torch.cuda.is_available() is False; "
                                    "use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {str(device)!r}: memfit trains on 'cpu' or 'cuda'")
    return device
