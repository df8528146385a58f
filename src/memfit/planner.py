"""plan(): the configuration that fits a memory budget at the best predicted speed.

The planner works from estimates only (fake tensors, no GPU): for each allowed
precision and each candidate checkpoint set it finds the largest micro-batch
that fits (a monotone search over estimates), splits the user's batch into
micro-batches of at most that size (gradient accumulation keeps the effective
batch and its math), and ranks the candidates by a cost model:

    cost = sum over micro-batches mb of  flops(mb) * (1 + recompute share) * speed(precision) / efficiency(mb)

* ``flops`` are forward + backward FLOPs counted by ``torch.utils.flop_counter``
  on fake tensors; checkpointed modules add their forward FLOPs again.
* ``efficiency(m) = m / (m + m_half)``: a device runs small micro-batches below
  its peak throughput; ``m_half`` is the micro-batch at which it reaches half.
  Default ``m_half = 2`` samples (a guess, stated as such); ``calibrate=True``
  fits it (and the precision speeds) from timed real micro-steps on the device.
* ``speed(precision)``: relative time of a step's arithmetic; by default 1.0 for
  32-true and 0.5 for 16-bit on CUDA (tensor cores), 1.0 everywhere on CPU.

It never changes the math the user asked for: the effective batch, the
optimizer, and any precision outside ``precisions`` stay as they are.

Known limitations: the cost model is a model (FLOPs, not a profile): use
``calibrate=True`` on the target device for the efficiency curve. Checkpoint
candidates are the first k of the model's repeated blocks
(:func:`memfit.strategies.blocks`, or the ``checkpoint_candidates`` globs given;
every k up to 8 blocks, powers of two and all beyond): for identical blocks
(a transformer's) which k blocks makes no difference to memory or FLOPs; for
blocks that differ, the set is not chosen by each block's activation bytes per
recomputed FLOP yet. Offload is costed as free (its PCIe traffic is not modelled).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from memfit.config import PRECISIONS, Config
from memfit.device import default_device, resolve_device
from memfit.errors import MemfitError, UsageError
from memfit.estimator import Estimate, estimate
from memfit.units import format_budget, format_bytes, parse_bytes
from memfit.workload import Workload

__all__ = ["Plan", "Alternative", "PlanError", "CostModel", "plan", "find_batch_size", "accumulation_steps",
           "balanced_micro_batch", "calibrate_efficiency"]

_DEFAULT_M_HALF = 2.0
_CUDA_SPEED = {"32-true": 1.0, "16-mixed": 0.55, "bf16-mixed": 0.55, "16-true": 0.5, "bf16-true": 0.5}
# A safety margin under "auto" budgets: the CUDA context of other libraries, NCCL
# buffers and fragmentation the allocator model does not see.
_AUTO_MARGIN = 0.05


class PlanError(MemfitError):
    """Nothing fits the budget. ``floor`` is the model states' bytes, ``levers`` what would move them."""

    def __init__(self, message: str, *, floor: int, budget: int, levers: dict[str, int]) -> None:
        super().__init__(message)
        self.floor = floor
        self.budget = budget
        self.levers = levers


@dataclass(frozen=True, slots=True)
class Alternative:
    """One configuration the planner considered."""

    config: Config
    accumulation: tuple[int, ...]
    required: int
    """Bytes the device needs at this config's micro-batch."""
    step_cost: float
    """Predicted time of one logical batch, relative to the chosen plan's (1.0)."""
    fits: bool
    largest: int | None = None
    """The largest micro-batch that fits with these settings (``config.micro_batch`` balances
    the same number of micro-steps, so it may be smaller)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The chosen configuration for a budget. All byte figures are int bytes.

    Example:
        >>> p = memfit.plan(memfit.presets.load("gpt2", seq_len=512), "24GiB", batch_size=64,
        ...                 precisions=("bf16-mixed",))
        >>> p.config.micro_batch, p.accumulation[:3]
    """

    config: Config
    accumulation: tuple[int, ...]
    """Micro-batch sizes, summing exactly to the batch size (the last may be smaller)."""
    batch_size: int
    budget: int
    required: int
    """Predicted bytes the device needs (the estimate's ``required``)."""
    step_cost: float
    """Predicted relative time of one logical batch (1.0 = the batch in one micro-step, unconstrained)."""
    reasons: tuple[str, ...]
    alternatives: tuple[Alternative, ...]
    estimate: Estimate
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headroom(self) -> int:
        """Budget minus the predicted requirement."""
        return self.budget - self.required

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "accumulation": list(self.accumulation),
            "batch_size": self.batch_size,
            "budget": self.budget,
            "required": self.required,
            "headroom": self.headroom,
            "step_cost": self.step_cost,
            "reasons": list(self.reasons),
            "alternatives": [
                {
                    "config": dataclasses.asdict(a.config),
                    "accumulation_steps": len(a.accumulation),
                    "required": a.required,
                    "step_cost": a.step_cost,
                    "fits": a.fits,
                }
                for a in self.alternatives
            ],
            "extra": dict(self.extra),
        }

    def table(self, *, width: int = 100) -> str:
        from memfit.display import render_plan

        return render_plan(self, width=width)


def accumulation_steps(batch_size: int, micro_batch: int) -> tuple[int, ...]:
    """Micro-batch sizes for ``batch_size`` samples at most ``micro_batch`` each: ``(7,)*14 + (2,)`` for 100, 7."""
    if micro_batch < 1 or batch_size < 1:
        raise UsageError(f"batch_size and micro_batch must be positive, got {batch_size} and {micro_batch}")
    full, rest = divmod(batch_size, micro_batch)
    return (micro_batch,) * full + ((rest,) if rest else ())


def balanced_micro_batch(batch_size: int, largest: int) -> int:
    """The smallest micro-batch that splits ``batch_size`` into as few micro-steps as ``largest`` does.

    ``balanced_micro_batch(256, 50) == 43``: six micro-steps either way (5 x 50 + 6, or 5 x 43 + 41),
    the same work, and each micro-step needs less memory.
    """
    steps = -(-batch_size // largest)
    return -(-batch_size // steps)


def resolve_budget(budget: int | str, device: str) -> int:
    """Int bytes from "24GiB", an int, or "auto" (free CUDA memory minus 5%)."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        if device != "cuda" or not torch.cuda.is_available():
            raise UsageError("budget 'auto' reads the free memory of a CUDA device, and none is available here; "
                             "give a size such as '24GiB'")
        free, _total = torch.cuda.mem_get_info()
        return int(free * (1 - _AUTO_MARGIN))
    return parse_bytes(budget)


class _Searcher:
    """Estimates with a cache, and the FLOP counts of the cost model."""

    def __init__(self, workload: Workload, device: str, steps: int = 2, batch_size: int | None = None) -> None:
        self.workload = workload
        self.device = device
        self.steps = steps
        self.batch_size = batch_size
        self.cache: dict[tuple, Estimate] = {}
        self.calls = 0

    def estimate(self, config: Config) -> Estimate:
        # A micro-batch smaller than the batch means accumulation: the first
        # micro-step's gradients are alive during the next, so estimate two.
        accumulation = 2 if self.batch_size is not None and config.micro_batch < self.batch_size else 1
        key = (config.micro_batch, config.precision, config.checkpoint, config.offload_activations, accumulation)
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = estimate(self.workload, config, steps=self.steps, device=self.device,
                                       accumulation=accumulation)
        return self.cache[key]

    def fits(self, config: Config, budget: int) -> bool:
        return self.estimate(config).required <= budget

    def largest_micro_batch(self, base: Config, budget: int, limit: int, start: int = 1) -> int:
        """The largest micro-batch <= limit that fits (0 if 1 does not).

        Memory grows with the micro-batch, so "fits" is monotone and a search is
        exact. Memory is also close to affine in the micro-batch (activations scale
        with it, model states do not), so two estimates predict the answer and two
        more confirm it; where the prediction is off, doubling and bisection finish.
        """
        def at(m: int) -> Config:
            return dataclasses.replace(base, micro_batch=m)

        def required(m: int) -> int:
            return self.estimate(at(m)).required

        lo = max(1, min(start, limit))
        if lo > 1 and required(lo) > budget:
            lo = 1
        if required(lo) > budget:
            return 0
        if lo == limit:
            return lo
        nxt = min(lo + max(1, lo), limit)
        slope = (required(nxt) - required(lo)) / (nxt - lo)
        if required(nxt) > budget:
            return self._bisect(at, budget, lo, nxt)
        if slope <= 0:
            return self._double(at, budget, nxt, limit)
        guess = max(nxt, min(limit, lo + int((budget - required(lo)) // slope)))
        if required(guess) <= budget:
            if guess == limit or required(guess + 1) > budget:
                return guess
            return self._double(at, budget, guess + 1, limit)
        return self._bisect(at, budget, nxt, guess)

    def _double(self, at, budget: int, good: int, limit: int) -> int:
        """From a size that fits, double until one does not (or the limit), then bisect."""
        while good < limit:
            trial = min(good * 2, limit)
            if not self.fits(at(trial), budget):
                return self._bisect(at, budget, good, trial)
            good = trial
        return good

    def _bisect(self, at, budget: int, good: int, bad: int) -> int:
        """The largest size in [good, bad) that fits, given good fits and bad does not."""
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.fits(at(mid), budget):
                good = mid
            else:
                bad = mid
        return good


class CostModel:
    """Predicted time of a logical batch under a Config, relative units (see the module docstring)."""

    def __init__(self, workload: Workload, *, device: str = "cuda", m_half: float = _DEFAULT_M_HALF) -> None:
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


def _module_paths(name: str) -> list[str]:
    """The module paths a checkpointed name covers: itself, or a Sequential segment's layers ("f[2:4]": f.2, f.3)."""
    from memfit.strategies import segment_layers

    return segment_layers(name) or [name]


def _flops(workload: Workload, precision: str, micro_batch: int) -> tuple[int, dict[str, int]]:
    """Forward+backward FLOPs of one micro-step and forward FLOPs per module, on fake tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from memfit import _torch_private
    from memfit.estimator import fake_copy, source_model
    from memfit.strategies import Recipe
    from memfit.workload import step_loss

    recipe = Recipe(Config(micro_batch=micro_batch, precision=precision), "cpu", fake=True)
    source = source_model(workload)
    with _torch_private.FakeTensorMode() as mode:
        model = fake_copy(source, mode)
        recipe.apply(model)
        batch = recipe.precision.convert_input(workload.batch(micro_batch))
        counter = FlopCounterMode(display=False)
        with counter:
            with recipe.forward_context():
                loss = step_loss(workload.loss(model, batch))
            loss.backward()
        total = counter.get_total_flops()
        per_module: dict[str, int] = {}
        root = type(model).__name__
        for name, counts in counter.get_flop_counts().items():
            path = name[len(root) + 1 :] if name.startswith(root + ".") else name
            per_module[path] = int(sum(counts.values()))
    return int(total), per_module


def _candidates(workload: Workload, globs: tuple[str, ...] | None) -> list[str]:
    """The modules the planner may checkpoint, in forward order: the model's repeated blocks, or the user's globs."""
    from memfit.estimator import source_model
    from memfit.strategies import Checkpointing, blocks

    model = source_model(workload)
    if globs is None:
        return blocks(model)
    return Checkpointing(tuple(globs)).select(model)


def plan(
    workload: Workload,
    budget: int | str,
    batch_size: int,
    *,
    precisions: tuple[str, ...] | list[str] | None = None,
    allow_checkpoint: bool = True,
    checkpoint_candidates: tuple[str, ...] | list[str] | str | None = None,
    allow_offload: bool = False,
    device: str = "cuda",
    m_half: float | None = None,
    calibrate: bool = False,
) -> Plan:
    """The configuration that fits ``budget`` at the lowest predicted step cost, keeping ``batch_size``.

    Args:
        workload: the training step's factories.
        budget: "24GiB", int bytes, or "auto" (free CUDA memory minus 5%).
        batch_size: the effective batch the user trains with; the plan splits it
            into micro-batches that sum to it exactly.
        precisions: the precisions the planner may choose from (Lightning's names; one
            name or several); by default only "32-true", i.e. the model's own math.
        allow_checkpoint: whether activation checkpointing of blocks may be used.
        checkpoint_candidates: module-path globs of the modules the plan may checkpoint
            (``("features.*",)``), in forward order; by default the model's repeated
            blocks (:func:`memfit.strategies.blocks`).
        allow_offload: whether saved activations may be offloaded to CPU memory.
        device: the target, "cuda" (default) or "cpu".
        m_half: the efficiency curve's half-throughput micro-batch (default 2, or calibrated).
        calibrate: time a few real micro-steps on ``device`` to fit ``m_half``.

    Raises:
        PlanError: nothing fits, with the floor and the levers that would move it.
    """
    if not isinstance(workload, Workload):
        raise UsageError(f"plan() takes a memfit.Workload, got {type(workload).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive int (the effective batch), got {batch_size!r}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
    budget = resolve_budget(budget, device)
    if isinstance(precisions, str):
        precisions = (precisions,)
    precisions = tuple(precisions) if precisions else ("32-true",)
    for p in precisions:
        if p not in PRECISIONS:
            raise UsageError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    if m_half is not None and (isinstance(m_half, bool) or not isinstance(m_half, (int, float))
                               or not 0 < m_half < float("inf")):
        raise UsageError(f"m_half must be a positive number of samples (the micro-batch at half the device's "
                         f"throughput), got {m_half!r}")
    if isinstance(checkpoint_candidates, str):
        checkpoint_candidates = (checkpoint_candidates,)
    if checkpoint_candidates is not None and not allow_checkpoint:
        raise UsageError("checkpoint_candidates were given with allow_checkpoint=False; give one or the other")
    if calibrate:
        m_half = calibrate_efficiency(workload, device=device)
    m_half = _DEFAULT_M_HALF if m_half is None else float(m_half)

    searcher = _Searcher(workload, device, batch_size=batch_size)
    blocks = _candidates(workload, checkpoint_candidates) if allow_checkpoint else []
    # Every count of blocks up to 8; beyond, powers of two and all (each count costs a search).
    counts = range(1, len(blocks) + 1) if len(blocks) <= 8 else sorted({2**i for i in range(len(blocks).bit_length()) if 2**i < len(blocks)} | {len(blocks)})
    checkpoint_sets: list[tuple[str, ...]] = [()] + [tuple(blocks[:k]) for k in counts]
    offloads = (False, True) if allow_offload and device == "cuda" else (False,)

    model = CostModel(workload, device=device, m_half=m_half)
    cost_of = lambda config: model.step_cost(config, batch_size)  # noqa: E731

    candidates: list[Alternative] = []
    for precision in precisions:
        for offload in offloads:
            previous_best = 0
            for ckpt in checkpoint_sets:
                base = Config(micro_batch=1, precision=precision, checkpoint=ckpt, offload_activations=offload)
                # More checkpointing never needs more memory: start from the last size that fitted.
                m = searcher.largest_micro_batch(base, budget, batch_size, start=previous_best or 1)
                if m == 0:
                    continue
                if ckpt and m <= previous_best:
                    continue  # more recomputation, no larger micro-batch: never cheaper
                previous_best = m
                # As many micro-steps as the largest size needs, each as small as that allows:
                # the same predicted cost, and headroom for what an estimate cannot see.
                config = dataclasses.replace(base, micro_batch=balanced_micro_batch(batch_size, m))
                candidates.append(
                    Alternative(config, accumulation_steps(batch_size, config.micro_batch),
                                searcher.estimate(config).required, cost_of(config), True, largest=m)
                )
                if m == batch_size:
                    break  # the whole batch fits: more checkpointing only costs

    if not candidates:
        raise _nothing_fits(searcher, precisions, budget, blocks)

    # 1.0 = the whole batch in one micro-step at the fastest allowed precision, no recomputation.
    ideal = min(cost_of(Config(micro_batch=batch_size, precision=p)) for p in precisions)
    candidates.sort(key=lambda a: (a.step_cost, a.required))
    best = candidates[0]
    alternatives = tuple(dataclasses.replace(a, step_cost=a.step_cost / ideal) for a in candidates)
    chosen = alternatives[0]
    est = searcher.estimate(best.config)
    reasons = _reasons(chosen, alternatives, batch_size, budget, est, blocks, searcher)
    return Plan(
        config=chosen.config,
        accumulation=chosen.accumulation,
        batch_size=batch_size,
        budget=budget,
        required=chosen.required,
        step_cost=chosen.step_cost,
        reasons=tuple(reasons),
        alternatives=alternatives,
        estimate=est,
        extra={"estimates": searcher.calls, "m_half": m_half, "device": device, "workload": workload.name},
    )


def _reasons(chosen, alternatives, batch_size, budget, est, blocks, searcher) -> list[str]:
    c = chosen.config
    reasons = []
    if c.micro_batch == batch_size:
        reasons.append(f"the whole batch of {batch_size} fits in one micro-step")
    else:
        reasons.append(
            f"micro-batch {chosen.largest} is the largest that fits with these settings, so the batch of "
            f"{batch_size} takes {len(chosen.accumulation)} micro-steps"
            + (f"; micro-batch {c.micro_batch} balances them (the same work, more headroom)"
               if c.micro_batch != chosen.largest else "")
        )
    reasons.append(f"precision {c.precision}" + (" (the only one allowed)" if len({a.config.precision for a in alternatives}) == 1 else " predicted fastest of those allowed"))
    if c.checkpoint:
        reasons.append(f"checkpointing {len(c.checkpoint)} of {len(blocks)} blocks lets a larger micro-batch fit, "
                       "which saves more time than the recomputation costs")
    elif blocks:
        reasons.append("no checkpointing: recomputation would cost more than it saves")
    if c.offload_activations:
        reasons.append("activations offloaded to CPU memory")
    reasons.append(f"predicted {format_bytes(chosen.required)} of {format_budget(budget)} "
                   f"({format_bytes(budget - chosen.required)} headroom)")
    return reasons


def _nothing_fits(searcher: _Searcher, precisions, budget: int, blocks) -> PlanError:
    cheapest = min(precisions, key=lambda p: (0 if p.endswith("-true") and not p.startswith("32") else 1, p))
    est = searcher.estimate(Config(micro_batch=1, precision=cheapest, checkpoint=tuple(blocks)))
    own = est.report.peak_by_category
    floor = own["parameters"] + own["gradients"] + own["optimizer_state"]
    levers: dict[str, int] = {}
    if cheapest != "bf16-true":
        low = searcher.estimate(Config(micro_batch=1, precision="bf16-true", checkpoint=tuple(blocks))).report.peak_by_category
        levers["precision bf16-true"] = floor - (low["parameters"] + low["gradients"] + low["optimizer_state"])
    levers["an optimizer with less state (SGD without momentum keeps none)"] = own["optimizer_state"]
    for n in (2, 4, 8):
        levers[f"sharding over {n} GPUs (FSDP)"] = floor - floor // n
    levers["offloading the optimizer state to CPU"] = own["optimizer_state"]
    lines = "; ".join(f"{name} saves {format_bytes(saving)}" for name, saving in levers.items())
    message = (
        f"nothing fits in {format_budget(budget)}: at micro-batch 1 the step needs {format_bytes(est.required)}, and "
        f"parameters + gradients + optimizer state alone take {format_bytes(floor)} at {cheapest} "
        f"(the cheapest precision allowed). Levers: {lines}"
    )
    return PlanError(message, floor=floor, budget=budget, levers=levers)


def calibrate_efficiency(workload: Workload, *, device: str = "cpu", sizes: tuple[int, ...] = (1, 2, 4), repeats: int = 3) -> float:
    """Fit ``m_half`` of the efficiency curve from timed real micro-steps on ``device``.

    Time per micro-step is modelled as ``c * (m + m_half)``; a least-squares line
    through the median times at ``sizes`` gives ``m_half = intercept / slope``.
    """
    from memfit.workload import build_model, move_batch, step_loss

    dev = resolve_device(device, no_cuda="calibrate on 'cuda' needs a CUDA device; none is available here")
    model = build_model(workload).to(dev)
    times = []
    for m in sizes:
        batch = move_batch(workload.batch(m), dev)
        samples = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()  # time the device's work, not the launch
            start = time.perf_counter()
            step_loss(workload.loss(model, batch)).backward()
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
        return _DEFAULT_M_HALF
    return max(intercept / slope, 0.0)


def find_batch_size(
    workload: Workload,
    budget: int | str | None = None,
    device: str | None = None,
    *,
    precision: str = "32-true",
    limit: int = 4096,
) -> int:
    """The largest micro-batch that fits: predicted by the estimator, verified by one real step.

    On CPU give ``budget``: the verifying step runs under ``simulate_budget(budget)``.
    On CUDA the default budget is the free memory. If the verifying step runs out
    of memory, the size backs off and is verified again.
    """
    from memfit.budget import simulate_budget
    from memfit.strategies import Recipe
    from memfit.workload import build_model, run_steps

    if not isinstance(workload, Workload):
        raise UsageError(f"find_batch_size() takes a memfit.Workload, got {type(workload).__name__}")
    device = device or default_device().type
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"find_batch_size(device='cuda') runs real steps on a GPU, and torch {torch.__version__} "
                         "sees none here; use device='cpu' with a budget, or memfit.plan() (estimates only)")
    if device == "cpu" and budget is None:
        raise UsageError("find_batch_size on the CPU needs budget=... (the simulated device size, e.g. '2GiB')")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"limit must be a positive whole number (the largest micro-batch to try), got {limit!r}")
    budget_bytes = resolve_budget(budget if budget is not None else "auto", device)
    target = "cuda" if device == "cuda" else "cpu"
    searcher = _Searcher(workload, target)
    m = searcher.largest_micro_batch(Config(micro_batch=1, precision=precision), budget_bytes, limit)
    if device == "cpu" and m > 0:
        from memfit.host import check_fits

        # The verification runs real steps: on the CPU they take real memory, as much as the estimate says.
        check_fits(searcher.estimate(Config(micro_batch=m, precision=precision)).required,
                   f"verifying micro-batch {m} with real steps under the simulated budget of "
                   f"{format_budget(budget_bytes)}",
                   "give a budget this machine can hold, or use memfit.plan() (estimates only, no real steps)")
    while m > 0:
        config = Config(micro_batch=m, precision=precision)
        recipe = Recipe(config, target)
        model = recipe.apply(build_model(workload).to(device))
        optimizer = workload.optimizer(model.parameters()) if workload.optimizer is not None else None
        try:
            if device == "cpu":
                with simulate_budget(budget_bytes, model, optimizer) as sim:
                    run_steps(workload, model, optimizer, m, 2, tracker=sim, device=device, recipe=recipe)
            else:
                run_steps(workload, model, optimizer, m, 2, device=device, recipe=recipe)
            return m
        except torch.OutOfMemoryError:
            m = max(m - max(1, m // 10), 0)  # back off 10% and verify again
        finally:
            del model, optimizer
            if device == "cuda":
                torch.cuda.empty_cache()  # after an OOM only: hand the cache back before retrying
    raise PlanError(f"not even a micro-batch of 1 fits in {format_budget(budget_bytes)}", floor=0, budget=budget_bytes, levers={})

