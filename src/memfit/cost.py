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

* Across ranks, the strategy's collectives (:func:`communication_bytes`) at
  :data:`FLOPS_PER_COMM_BYTE`, and no overlap with compute assumed.

Known limitations: a model (FLOPs, not a profile); offload's PCIe traffic is not costed.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from memfit import _torch_private
from memfit.checkpointing import segment_layers
from memfit.config import Config, accumulation_steps
from memfit.depth import repeated_run, truncated
from memfit.device import resolve_device
from memfit.estimator import fake_copy, source_model
from memfit.step import backward, forward, prepare
from memfit.strategies import Recipe
from memfit.workload import Workload, build_model, step_loss

__all__ = ["CostModel", "calibrate_efficiency", "communication_bytes", "DEFAULT_M_HALF", "FLOPS_PER_COMM_BYTE"]

DEFAULT_M_HALF = 2.0
"""The efficiency curve's half point, in samples, when it is not calibrated: a guess, stated as such."""
FLOPS_PER_COMM_BYTE = 1000.0
"""How many FLOPs (at 32-true speed) a byte of communication costs: the stated assumption of an interconnect
moving ~100 GB/s per GPU (NVLink-class, within a node; across nodes it is several times slower) beside
~100 TFLOP/s of useful compute. Used to weigh collectives against arithmetic, nothing else."""
_CUDA_SPEED = {"32-true": 1.0, "16-mixed": 0.55, "bf16-mixed": 0.55, "16-true": 0.5, "bf16-true": 0.5}


class CostModel:
    """Predicted time of a logical batch under a Config, relative units (see the module docstring)."""

    def __init__(self, workload: Workload, *, device: str = "cuda", m_half: float = DEFAULT_M_HALF) -> None:
        self.workload = workload
        self.device = device
        self.m_half = m_half
        self._flops: dict[str, tuple[int, dict[str, int]]] = {}
        self._parameters: int | None = None

    def flops(self, precision: str) -> tuple[int, dict[str, int]]:
        """Forward+backward FLOPs per sample, and forward FLOPs per module per sample."""
        if precision not in self._flops:
            self._flops[precision] = _flops(self.workload, precision, 1)
        return self._flops[precision]

    def remember_flops(self, precision: str, counts: tuple[int, dict[str, int]]) -> None:
        """Use ``counts`` (what :meth:`flops` returned, in another process) for ``precision``."""
        self._flops[precision] = counts

    def step_cost(self, config: Config, batch_size: int, world_size: int = 1) -> float:
        """The step's cost in FLOP-equivalents: its micro-steps on ``batch_size`` samples (one rank's), plus
        the collectives of ``config.strategy`` over ``world_size`` ranks (:func:`communication_bytes`)."""
        micro_steps = len(accumulation_steps(batch_size, config.micro_batch))
        comm = communication_bytes(config, self.parameters(), world_size, micro_steps)
        return self._compute_cost(config, batch_size) + comm * FLOPS_PER_COMM_BYTE

    def parameters(self) -> int:
        """The model's parameter count (tied weights once)."""
        if self._parameters is None:
            self._parameters = sum(p.numel() for p in source_model(self.workload).parameters())
        return self._parameters

    def _compute_cost(self, config: Config, batch_size: int) -> float:
        total, per_module = self.flops(config.precision)
        recompute = sum(per_module.get(path, 0) for name in config.checkpoint for path in _module_paths(name))
        speed = _CUDA_SPEED[config.precision] if self.device == "cuda" else 1.0
        per_sample = (total + recompute) * speed
        # time(mb) = flops(mb) / efficiency(mb) = per_sample * mb * (mb + m_half) / mb
        return sum(per_sample * (mb + self.m_half) for mb in accumulation_steps(batch_size, config.micro_batch))


def communication_bytes(config: Config, parameters: int, world_size: int, micro_steps: int) -> float:
    """Bytes one rank sends per optimizer step for ``config.strategy``, by ring collectives over ``world_size``.

    A ring all-gather or reduce-scatter of ``B`` bytes sends ``(N-1)/N * B`` per rank, an all-reduce twice that.
    DDP all-reduces the gradients once per step (in the parameters' dtype). FSDP2 all-gathers each block's
    parameters for every micro-step's forward, and again for its backward where it reshards after forward (in
    ``param_dtype``: the low precision under ``*-mixed``), and reduce-scatters the gradients once per step
    (float32 under ``*-mixed``, the parameters' dtype under ``*-true``), or every micro-step with
    ``sync_every_micro_step``.
    """
    if config.strategy == "single" or world_size == 1:
        return 0.0
    ring = (world_size - 1) / world_size
    true_size = 2 if config.precision in ("16-true", "bf16-true") else 4
    low_size = 2 if config.precision != "32-true" else 4
    if config.strategy == "ddp":
        return 2 * ring * parameters * true_size
    gathers = micro_steps * (2 if config.reshard_after_forward else 1)
    reduces = micro_steps if config.sync_every_micro_step else 1
    return ring * parameters * (gathers * low_size + reduces * true_size)


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
    """Forward+backward FLOPs of one micro-step and forward FLOPs per module, on fake tensors.

    A model with a run of 8 or more identical blocks is counted cut to 1, 2 and 3 of them
    (:mod:`memfit.depth`): identical blocks count the same FLOPs, and the rest is affine in the
    depth; where the counts show otherwise the full model is counted.
    """
    source = source_model(workload)
    run = repeated_run(source)
    if run is not None and run.count >= 8:
        counts = {}
        for n in (1, 2, 3):
            with truncated(source, run, n) as cut:
                counts[n] = _count_flops(workload, cut, precision, micro_batch)
        extrapolated = _deeper(counts, run)
        if extrapolated is not None:
            return extrapolated
    return _count_flops(workload, source, precision, micro_batch)


def _deeper(counts: dict[int, tuple[int, dict[str, int]]], run) -> tuple[int, dict[str, int]] | None:
    """The counts at the run's full depth from those at 1, 2 and 3 blocks; None where they are not affine."""
    (t1, m1), (t2, m2), (t3, m3) = counts[1], counts[2], counts[3]
    if t3 - t2 != t2 - t1:
        return None
    extra = run.count - 1
    per_module: dict[str, int] = {}
    for path, value in m3.items():
        where = run.locate(path)
        if where is not None:
            first = run.block(0) + ("." + where[1] if where[1] else "")
            if value != m3.get(first):
                return None  # blocks that count differently
            continue
        if value - m2.get(path, 0) != m2.get(path, 0) - m1.get(path, 0):
            return None
        per_module[path] = m1.get(path, 0) + extra * (m2.get(path, 0) - m1.get(path, 0))
    for path, value in m1.items():
        where = run.locate(path)
        if where is not None:
            for j in range(run.count):
                per_module[run.block(j) + ("." + where[1] if where[1] else "")] = value
    return t1 + extra * (t2 - t1), per_module


def _count_flops(workload: Workload, source, precision: str, micro_batch: int) -> tuple[int, dict[str, int]]:
    recipe = Recipe(Config(micro_batch=micro_batch, precision=precision), "cpu", fake=True)
    with _torch_private.FakeTensorMode() as mode:
        model = fake_copy(source, mode)
        recipe.apply(model)
        batch = prepare(workload.batch(micro_batch), None, recipe)
        # Forward and backward are counted apart: a checkpoint recomputes a module's forward only, and
        # FlopCounterMode's module attribution in backward puts some of a block's gradients' FLOPs
        # on other modules (a Llama block's self_attn counted the next block's attention backward).
        counter = FlopCounterMode(display=False)
        with counter:
            loss = step_loss(forward(workload.loss, model, batch, recipe))
        backward_counter = FlopCounterMode(display=False)
        with backward_counter:
            backward(loss, None)
        total = counter.get_total_flops() + backward_counter.get_total_flops()
        per_module: dict[str, int] = {}
        root = type(model).__name__
        for name, counts in counter.get_flop_counts().items():
            path = name[len(root) + 1 :] if name.startswith(root + ".") else name
            per_module[path] = int(sum(counts.values()))
    return int(total), per_module
