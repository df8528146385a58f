"""The planner's cost model: the predicted time of a logical batch under a Config.

    cost = sum over micro-batches mb of  flops(mb) * (1 + recompute share) * speed(precision) / efficiency(mb)

* ``flops`` are forward + backward FLOPs counted by ``torch.utils.flop_counter``
  on fake tensors; checkpointed modules add their forward FLOPs again.
* ``efficiency(m) = m / (m + m_half)``: a device runs small micro-batches below
  its peak throughput; ``m_half`` is the micro-batch at which it reaches half.
  Default ``m_half = 2`` samples (a guess, stated as such);
  :func:`calibrate_efficiency` fits it from timed real micro-steps on the device.
* ``speed(precision)``: relative time of a step's arithmetic; 1.0 for 32-true and
  about 0.5 for 16-bit on CUDA (tensor cores), 1.0 everywhere on CPU.

Known limitations: a model (FLOPs, not a profile); offload's PCIe traffic is not costed.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from memfit import _torch_private
from memfit.checkpointing import segment_layers
from memfit.config import Config, accumulation_steps
from memfit.device import resolve_device
from memfit.estimator import fake_copy, source_model
from memfit.step import backward, forward, prepare
from memfit.strategies import Recipe
from memfit.workload import Workload, build_model, step_loss

__all__ = ["CostModel", "calibrate_efficiency", "DEFAULT_M_HALF"]

DEFAULT_M_HALF = 2.0
"""The efficiency curve's half point, in samples, when it is not calibrated: a guess, stated as such."""
_CUDA_SPEED = {"32-true": 1.0, "16-mixed": 0.55, "bf16-mixed": 0.55, "16-true": 0.5, "bf16-true": 0.5}


class CostModel:
    """Predicted time of a logical batch under a Config, relative units (see the module docstring)."""

    def __init__(self, workload: Workload, *, device: str = "cuda", m_half: float = DEFAULT_M_HALF) -> None:
        self.workload = workload
        self.device = device
        self.m_half = m_half
        self._flops: dict[str, tuple[int, dict[str, int]]] = {}

    def flops(self, precision: str) -> tuple[int, dict[str, int]]:
        """Forward+backward FLOPs per sample, and forward FLOPs per module per sample."""
        if precision not in self._flops:
            self._flops[precision] = _flops(self.workload, precision, 1)
        return self._flops[precision]

    def step_cost(self, config: Config, batch_size: int) -> float:
        total, per_module = self.flops(config.precision)
        recompute = sum(per_module.get(path, 0) for name in config.checkpoint for path in _module_paths(name))
        speed = _CUDA_SPEED[config.precision] if self.device == "cuda" else 1.0
        per_sample = (total + recompute) * speed
        # time(mb) = flops(mb) / efficiency(mb) = per_sample * mb * (mb + m_half) / mb
        return sum(per_sample * (mb + self.m_half) for mb in accumulation_steps(batch_size, config.micro_batch))


def calibrate_efficiency(workload: Workload, *, device: str = "cpu", sizes: tuple[int, ...] = (1, 2, 4), repeats: int = 3) -> float:
    """Fit ``m_half`` of the efficiency curve from timed real micro-steps on ``device``.

    Time per micro-step is modelled as ``c * (m + m_half)``; a least-squares line
    through the median times at ``sizes`` gives ``m_half = intercept / slope``.
    """

    dev = resolve_device(device, no_cuda="calibrate on 'cuda' needs a CUDA device; none is available here")
    model = build_model(workload).to(dev)
    times = []
    for m in sizes:
        batch = prepare(workload.batch(m), dev, None)
        samples = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()  # time the device's work, not the launch
            start = time.perf_counter()
            backward(step_loss(forward(workload.loss, model, batch, None)), None)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        times.append(sorted(samples[1:])[len(samples[1:]) // 2])
    n = len(sizes)
    mean_m = sum(sizes) / n
    mean_t = sum(times) / n
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(sizes, times)) / sum((m - mean_m) ** 2 for m in sizes)
    intercept = mean_t - slope * mean_m
    if slope <= 0:
        return DEFAULT_M_HALF
    return max(intercept / slope, 0.0)


def _module_paths(name: str) -> list[str]:
    """The module paths a checkpointed name covers: itself, or a Sequential segment's layers ("f[2:4]": f.2, f.3)."""

    return segment_layers(name) or [name]


def _flops(workload: Workload, precision: str, micro_batch: int) -> tuple[int, dict[str, int]]:
    """Forward+backward FLOPs of one micro-step and forward FLOPs per module, on fake tensors."""


    recipe = Recipe(Config(micro_batch=micro_batch, precision=precision), "cpu", fake=True)
    source = source_model(workload)
    with _torch_private.FakeTensorMode() as mode:
        model = fake_copy(source, mode)
        recipe.apply(model)
        batch = prepare(workload.batch(micro_batch), None, recipe)
        counter = FlopCounterMode(display=False)
        with counter:
            backward(step_loss(forward(workload.loss, model, batch, recipe)), None)
        total = counter.get_total_flops()
        per_module: dict[str, int] = {}
        root = type(model).__name__
        for name, counts in counter.get_flop_counts().items():
            path = name[len(root) + 1 :] if name.startswith(root + ".") else name
            per_module[path] = int(sum(counts.values()))
    return int(total), per_module
