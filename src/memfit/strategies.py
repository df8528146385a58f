"""The memory strategies of a Config, each one small object with one ``apply``.

* :class:`Precision`: ``*-true`` casts the model; ``*-mixed`` runs autocast over
  fp32 weights (and a GradScaler for ``16-mixed``).
* :class:`~memfit.checkpointing.Checkpointing` (in :mod:`memfit.checkpointing`):
  recomputes the forward of chosen modules in backward; ``state_dict()`` keys do not change.
* :class:`OffloadActivations`: keeps tensors saved for backward in CPU memory.

:class:`Recipe` puts them together for one device, real or emulated under
fake tensors (memfit always fakes on CPU tensors: some ops abort the process
when fake tensors sit on "cuda" in a CPU-only torch build).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from memfit import _torch_private
from memfit._tree import map_tensors
from memfit.checkpointing import Checkpointing, blocks, segment_layers
from memfit.config import Config, check_precision
from memfit.emulation import cuda_emulation, fused_attention_emulation
from memfit.errors import UsageError
from memfit.optimizers import OptimizerInBackward, set_implementation

__all__ = ["Precision", "Checkpointing", "OffloadActivations", "fused_attention_emulation", "Recipe", "cast_module",
           "blocks", "segment_layers"]

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
        self.name = check_precision(name)
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


class Recipe:
    """A Config's strategies for one device type (``"cpu"`` or ``"cuda"``), real or fake."""

    def __init__(self, config: Config, device_type: str, *, fake: bool = False,
                 capability: tuple[int, int] = (9, 0)) -> None:
        self.config = config
        self.device_type = device_type
        self.fake = fake
        self.capability = capability
        """The CUDA card's compute capability a fake run stands for (it picks attention kernels)."""
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

    def build_optimizer(self, factory, model: nn.Module) -> torch.optim.Optimizer | None:
        """The optimizer over ``model``'s parameters as the Config runs it (None without a factory).

        ``optimizer_in_backward`` builds one optimizer per parameter, stepped in backward
        (:class:`memfit.optimizers.OptimizerInBackward`); ``optimizer_impl`` picks the
        implementation; see :meth:`tune_optimizer` for a CUDA target's default.
        """
        if factory is None:
            return None
        with self.optimizer_context():  # bitsandbytes builds its quantization map from values
            if self.config.optimizer_in_backward:
                optimizer = OptimizerInBackward(model.parameters(), factory)
            else:
                optimizer = factory(model.parameters())
        self.tune_optimizer(optimizer)
        return optimizer

    def tune_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The Config's ``optimizer_impl``; by default, on fake CPU tensors standing for CUDA, CUDA's choice.

        PyTorch's optimizers default to the foreach implementation on CUDA and to
        the per-tensor loop on CPU; their temporaries differ, so an emulated CUDA
        step must run the foreach one unless the user chose.
        """
        set_implementation(optimizer, self.config.optimizer_impl)
        if self.config.optimizer_impl != "default" or not (self.fake and self.device_type == "cuda"):
            return
        inner = optimizer.optimizers.values() if isinstance(optimizer, OptimizerInBackward) else [optimizer]
        for opt in inner:
            for group in opt.param_groups:
                if group.get("foreach", False) is None and not group.get("fused") and not group.get("differentiable"):
                    group["foreach"] = True

    def optimizer_context(self):
        """Around an optimizer step: on fake tensors, ``.item()`` answers 1 (Adafactor reads norms that way)."""
        return _torch_private.fake_item_values() if self.fake else contextlib.nullcontext()

    def emulation(self):
        """A context around the whole run that makes fake CPU kernels do what CUDA's would (memfit.emulation)."""
        if self.fake and self.device_type == "cuda":
            return cuda_emulation(self.capability)
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
