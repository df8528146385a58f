"""DeviceProfile: what a CUDA card adds to a training step beyond its tensors, measured or from published facts.

An estimate's tensors are the same on every card. What differs is outside them:

* the CUDA context (kernels, driver state), which ``nvidia-smi`` shows and the
  allocator does not;
* the cuBLAS workspaces, one per handle, taken through the allocator (their size
  depends on the compute capability);
* other workspaces a step keeps through the allocator (cuDNN's convolution
  algorithm search);
* the allocator's configuration (``expandable_segments``).

``memfit calibrate`` (:func:`calibrate`) measures them on the user's card and writes
a small JSON profile; ``estimate``/``plan`` read one with ``profile=`` /
``--profile PATH|CARD``, or the file ``calibrate`` wrote to :func:`default_path`.
Without a profile, the estimate uses memfit's defaults: a 512 MiB context and
the local card's compute capability (else Hopper's). The built-in card profiles
(:data:`CARD_CAPABILITY`) carry each card's compute capability and memory, which
are public facts. A card's CUDA context is not published, so they keep the
default context; calibrate to replace it.

Known limitations: calibration reads the whole card's used memory, so other
processes on the card count as context; run it on an idle card.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memfit.allocator import CUDA_CONTEXT_BYTES, cublas_workspace_bytes
from memfit.errors import UsageError
from memfit.units import CARDS, format_bytes

__all__ = ["DeviceProfile", "CARD_CAPABILITY", "load_profile", "default_path", "default_profile", "calibrate"]

FORMAT = 1
"""The profile file's format version."""

CARD_CAPABILITY: dict[str, tuple[int, int]] = {
    # NVIDIA's CUDA GPU compute capability table (developer.nvidia.com/cuda-gpus).
    "t4": (7, 5), "v100": (7, 0), "l4": (8, 9), "a10": (8, 6), "rtx3090": (8, 6), "rtx4090": (8, 9),
    "a100-40gb": (8, 0), "l40": (8, 9), "h100": (9, 0), "a100-80gb": (8, 0),
}
"""Compute capability of each card in :data:`memfit.units.CARDS` (it sets the cuBLAS workspace size)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceProfile:
    """Device memory a step needs beyond its tensors, on one CUDA card. All sizes are int bytes."""

    name: str
    """The card, e.g. ``"NVIDIA H100 80GB HBM3"`` or a built-in card name."""
    capability: tuple[int, int]
    """CUDA compute capability, e.g. (9, 0)."""
    total: int | None = None
    """Memory CUDA lets a process use on the card (``torch.cuda.mem_get_info()[1]``), if known."""
    context: int = CUDA_CONTEXT_BYTES
    """The CUDA context: device memory in use before any tensor, outside the allocator."""
    cublas_workspace: int | None = None
    """One cuBLAS handle's workspace; None: the size cuBLAS takes for :attr:`capability`."""
    cublas_handles: int = 2
    """Workspaces held while training: the main thread's and autograd's backward thread's."""
    other_workspace: int = 0
    """Other memory a step keeps through the allocator besides its tensors (cuDNN workspaces)."""
    expandable_segments: bool = False
    """Whether ``PYTORCH_CUDA_ALLOC_CONF`` had ``expandable_segments:True`` (memfit's allocator model
    assumes it off, so such a profile is refused rather than mis-estimated)."""
    source: str = "memfit's defaults"
    """Where the figures come from: ``memfit calibrate`` on a named card and torch, or published facts."""

    def __post_init__(self) -> None:
        capability = self.capability
        if (not isinstance(capability, (tuple, list)) or len(capability) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in capability)):
            raise UsageError(f"a device profile's capability is (major, minor), such as (9, 0), got {capability!r}")
        object.__setattr__(self, "capability", tuple(capability))
        for field in ("context", "cublas_handles", "other_workspace"):
            _check_bytes(getattr(self, field), field)
        for field in ("total", "cublas_workspace"):
            if getattr(self, field) is not None:
                _check_bytes(getattr(self, field), field)
        if self.expandable_segments:
            raise UsageError(f"the device profile {self.name!r} was measured with expandable_segments:True, which "
                             "memfit's allocator model does not follow; calibrate without it "
                             "(unset PYTORCH_CUDA_ALLOC_CONF)")

    @property
    def workspace(self) -> int:
        """One cuBLAS handle's workspace, in bytes."""
        return self.cublas_workspace if self.cublas_workspace is not None else cublas_workspace_bytes(self.capability)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "device": "cuda", **dataclasses.asdict(self), "capability": list(self.capability)}

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON to ``path`` (folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_bytes(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"a device profile's {field} is a whole number of bytes >= 0, got {value!r}")


def default_path() -> Path:
    """Where ``memfit calibrate`` writes and ``estimate`` looks: ``$XDG_CACHE_HOME/memfit/device.json``
    (``~/.cache/memfit/device.json``), or ``$MEMFIT_DEVICE_PROFILE``."""
    override = os.environ.get("MEMFIT_DEVICE_PROFILE")
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "memfit" / "device.json"


def default_profile() -> DeviceProfile:
    """The calibrated profile at :func:`default_path` if there is one; else memfit's defaults for the local card
    (its compute capability, or Hopper's without a GPU)."""
    path = default_path()
    if path.is_file():
        return load_profile(path)
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return DeviceProfile(name="default", capability=capability)


def load_profile(spec: DeviceProfile | str | Path) -> DeviceProfile:
    """A profile from a built-in card name (``"h100"``, ``"rtx4090"``) or a JSON file ``memfit calibrate`` wrote."""
    if isinstance(spec, DeviceProfile):
        return spec
    text = str(spec)
    card = text.lower()
    if card in CARD_CAPABILITY:
        return DeviceProfile(name=card, capability=CARD_CAPABILITY[card], total=CARDS[card][0],
                             source=f"published: compute capability {CARD_CAPABILITY[card]}, memory {CARDS[card][1]}; "
                             "CUDA context: memfit's default")
    path = Path(text)
    if not path.is_file():
        raise UsageError(f"device profile {text!r} is neither a file nor a card ({', '.join(CARD_CAPABILITY)}); "
                         "write one with `memfit calibrate` on the card")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"device profile {text}: not a profile memfit wrote ({exc.__class__.__name__}: {exc}); "
                         "write it again with `memfit calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"device profile {text}: not a memfit device profile (format {FORMAT}); "
                         "write it again with `memfit calibrate`")
    if data.get("device") != "cuda":
        raise UsageError(f"device profile {text} is for device {data.get('device')!r}; memfit's profiles describe "
                         "CUDA cards: calibrate on one with `memfit calibrate`")
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(data) - fields - {"format", "device"})
    if unknown or "capability" not in data or "name" not in data:
        raise UsageError(f"device profile {text}: unexpected fields {unknown} or missing name/capability; "
                         "write it again with `memfit calibrate`")
    return DeviceProfile(**{k: v for k, v in data.items() if k in fields and k != "capability"},
                         capability=tuple(data["capability"]) if isinstance(data["capability"], list)
                         else data["capability"])


def calibrate(device: str = "cuda") -> DeviceProfile:  # pragma: no cover - needs a CUDA card
    """Measure the local CUDA card: its context, one cuBLAS workspace, and the allocator's configuration.

    The context is the card's used memory (``mem_get_info``) less what the allocator
    reserved, after one matmul has loaded cuBLAS; the workspace is what that first
    matmul took beyond its output.
    """
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise UsageError(f"calibrate measures a CUDA card; none is available to torch {torch.__version__} here "
                         f"(device {device!r}); on this machine, use a built-in card profile such as --profile h100")
    dev = torch.device(device)
    torch.cuda.init()
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    a = torch.ones(64, 64, device=dev)
    before = torch.cuda.memory_allocated(dev)
    out = a @ a  # loads cuBLAS and takes its workspace through the allocator
    torch.cuda.synchronize(dev)
    workspace = torch.cuda.memory_allocated(dev) - before - out.untyped_storage().nbytes()
    free, total = torch.cuda.mem_get_info(dev)
    context = (total - free) - torch.cuda.memory_reserved(dev)
    props = torch.cuda.get_device_properties(dev)
    return DeviceProfile(
        name=props.name, capability=(props.major, props.minor), total=total, context=max(context, 0),
        cublas_workspace=max(workspace, 0) or None, expandable_segments="expandable_segments:true" in conf.lower(),
        source=f"memfit calibrate on {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"context {format_bytes(max(context, 0))}",
    )
