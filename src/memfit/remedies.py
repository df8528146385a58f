"""Remedies: the fixes of a step that does not fit, each verified by an estimate of the fixed configuration.

For a base :class:`memfit.Config` and the user's batch, each lever that the step's anatomy says
could move its peak is applied alone and estimated (:class:`memfit.searcher.Searcher`, so that
a configuration is estimated once): a smaller micro-batch with exact accumulation to the same
batch, a lower precision, checkpointing every block, the fused optimizer, the optimizer step in backward, zero_grad's setting, bitsandbytes' 8-bit optimizer,
sharding over GPUs (FSDP2). Each fix carries the bytes it saves (``required`` before minus
after, as the device needs them), the new requirement, the relative step cost
(:class:`memfit.cost.CostModel`) and whether the step then fits.

Where no lever fits alone, they are combined greedily, the most saving first, each combination
estimated, the micro-batch last (the largest that then fits), then sharding. A lever that cannot run
with the others is left out of the combination (the step in backward accumulates nothing and runs on
one process: not with a smaller micro-batch, not with FSDP); where no combination fits, the one that
needs the least (a fix alone or combined) is kept (:attr:`Remedies.closest`), so that the answer says
by how much.

The levers' estimates are independent: they run in forked worker processes, one per core
(:mod:`memfit.parallel`), with the FLOP counts of the cost model.

Levers that change what is trained (LoRA adapters instead of every weight) are options, named
with their arithmetic and never applied: they are the user's choice, not a setting.

Activation offload is not among the levers: its PCIe time is not in the cost model, so it would read as
free (``memfit plan --offload-activations`` weighs it the same way, and says so).

Known limitations: the combination is greedy, not the fastest (``memfit plan`` searches that);
levers that cannot move the peak by their mechanism are not estimated (the fused optimizer
changes only the optimizer phase's temporaries: it is tried where the peak is in that phase).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memfit.checkpointing import Checkpointing, blocks
from memfit.config import Config, accumulation_steps, balanced_micro_batch
from memfit.cost import CostModel
from memfit.errors import UsageError
from memfit.estimator import Estimate, source_model
from memfit.fixes import Fix
from memfit.parallel import run_all
from memfit.searcher import Searcher
from memfit.workload import Workload

__all__ = ["Remedies", "remedies"]

GPUS = (2, 4, 8)
"""The GPU counts a sharding fix tries (the fewest that fits is listed)."""


@dataclass(frozen=True, slots=True)
class Remedies:
    """The verified fixes (ranked: those that fit first, cheapest first; then the most saving), a combination
    that fits where none does alone, and options that change what is trained."""

    fixes: tuple[Fix, ...]
    combined: Fix | None
    options: tuple[Fix, ...]
    base: Estimate
    """The base's estimate, every fix's reference."""
    closest: Fix | None = None
    """Where nothing fits, alone or together: the fix or combination that needs the least (its ``fits`` False)."""


class _Lever:
    """A lever to try: its Config, ranks and optimizer (None: the workload's), estimated as one job."""

    def __init__(self, lever: str, effect: str, config: Config, world_size: int, optimizer: Any = None,
                 search: bool = False) -> None:
        self.lever, self.effect, self.config, self.world_size = lever, effect, config, world_size
        self.optimizer = optimizer
        self.search = search
        """The micro-batch lever: the job finds the largest micro-batch that fits and estimates it."""


class _Trial:
    """Estimates and costs of configurations relative to the base, one searcher per world size and optimizer."""

    def __init__(self, workload: Workload, base: Config, batch_size: int, budget: int | None, device: str,
                 profile: Any, world_size: int) -> None:
        self.workload, self.base, self.budget, self.batch_size = workload, base, budget, batch_size
        self.device, self.profile, self.world_size = device, profile, world_size
        self.searchers: dict[tuple, Searcher] = {}
        self.base_required = 0
        self.known: dict[tuple, int | None] = {}  # (world size, optimizer, config) -> required, from the workers
        self.costs = CostModel(workload, device=device)
        self._base_cost: float | None = None

    def set_base(self, estimate: Estimate) -> None:
        """The base's estimate: what every fix saves against (and the searcher's, so it is not made again)."""
        searcher = self.searcher(self.world_size)
        searcher.cache[(self.base, 2 if self.base.micro_batch < searcher.batch_size else 1)] = estimate
        self.base_required = estimate.required

    def searcher(self, world_size: int, optimizer: Any = None) -> Searcher:
        if (world_size, optimizer) not in self.searchers:
            workload = self.workload
            if optimizer is not None:
                # The model built once (on meta) serves: only the optimizer differs.
                workload = dataclasses.replace(workload, model=source_model(workload), optimizer=optimizer,
                                               name=workload.name + " (8-bit optimizer)")
            share = -(-self.batch_size // world_size)
            self.searchers[world_size, optimizer] = Searcher(workload, self.device, batch_size=share,
                                                             profile=self.profile, world_size=world_size)
        return self.searchers[world_size, optimizer]

    def required(self, config: Config, world_size: int | None = None, optimizer: Any = None) -> int | None:
        """Bytes the device needs under ``config``; None where the step refuses it (UsageError)."""
        world_size = world_size or self.world_size
        key = (world_size, optimizer, config)
        if key not in self.known:
            try:
                self.known[key] = self.searcher(world_size, optimizer).estimate(config).required
            except UsageError:  # an optimizer without a fused kernel, a combination the step refuses
                self.known[key] = None
        return self.known[key]

    def run(self, lever: _Lever) -> tuple[Config, int | None]:
        """One lever's job: its configuration (the micro-batch found, for the micro-batch lever) and requirement."""
        config = lever.config
        if lever.search:
            largest = 0
            if self.budget is not None:
                largest = self.searcher(lever.world_size).largest_micro_batch(self.base, self.budget,
                                                                              lever.config.micro_batch)
            share = self.searcher(lever.world_size).batch_size
            config = dataclasses.replace(config, micro_batch=balanced_micro_batch(share, largest) if largest else 1)
        return config, self.required(config, lever.world_size, lever.optimizer)

    def fix(self, lever: str, effect: str, config: Config, *, world_size: int | None = None,
            optimizer: Any = None) -> Fix | None:
        """``config`` estimated as a Fix of the base; None where it saves nothing or the step refuses it."""
        world_size = world_size or self.world_size
        required = self.required(config, world_size, optimizer)
        if required is None or required >= self.base_required:
            return None
        change = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(Config)
                       if getattr(config, f.name) != getattr(self.base, f.name))
        return Fix(lever, effect, change=change, saves=self.base_required - required, verified=True,
                   required=required, step_cost=self.cost(config, world_size), world_size=world_size,
                   optimizer=optimizer, fits=None if self.budget is None else required <= self.budget)

    def cost(self, config: Config, world_size: int) -> float | None:
        """The logical batch's predicted time with ``config`` relative to the base's (1.0)."""
        try:
            if self._base_cost is None:
                self._base_cost = self.costs.step_cost(self.base, -(-self.batch_size // self.world_size),
                                                       self.world_size)
            return self.costs.step_cost(config, -(-self.batch_size // world_size), world_size) / self._base_cost
        except Exception:  # noqa: BLE001 - a step the FLOP counter cannot run: the fix stands without a cost
            return None


def remedies(workload: Workload, base: Config, base_estimate: Estimate | Callable[[], Estimate], *, batch_size: int,
             budget: int | None, device: str, profile: Any = None, world_size: int = 1) -> Remedies:
    """The fixes of ``base`` for ``batch_size`` samples per step. ``base_estimate`` is the base's estimate, or
    makes it (here, before the workers fork)."""
    trial = _Trial(workload, base, batch_size, budget, device, profile, world_size)
    # The base first: its trace warms what every later trace reuses (torch's lazy imports, fake tensors' op
    # caches), and the workers forked after it inherit that; started before it, each paid it again.
    estimated = base_estimate if isinstance(base_estimate, Estimate) else base_estimate()
    trial.set_base(estimated)
    levers, options = _levers(trial, base, batch_size)
    levers += _levers_after(trial, base, estimated, batch_size)
    # Every lever's estimate, and the FLOPs for the costs, in worker processes; the longest first
    # (sharding traces a fake process group, the micro-batch search steps that accumulate).
    levers.sort(key=lambda lv: (lv.world_size == world_size, not lv.search, lv.optimizer is None))
    results = run_all([lambda lv=lv: trial.run(lv) for lv in levers] + [lambda: trial.costs.flops(base.precision)])
    # FLOPs are counted from shapes (FlopCounterMode's formulas for matmuls, convolutions and attention), which
    # no precision changes: one count serves every lever, and the cost model's speed factor tells them apart.
    for precision in {lv.config.precision for lv in levers} | {base.precision}:
        trial.costs.remember_flops(precision, results[-1])
    share = trial.searcher(world_size).batch_size
    fixes = []
    for lever, (config, required) in zip(levers, results):
        trial.known[(lever.world_size, lever.optimizer, config)] = required
        name = lever.lever
        if lever.search:
            name = f"micro-batch {config.micro_batch} x {len(accumulation_steps(share, config.micro_batch))} micro-steps"
        fix = trial.fix(name, lever.effect, config, world_size=lever.world_size, optimizer=lever.optimizer)
        if fix is not None:
            fixes.append(fix)
    fixes.sort(key=lambda f: (not f.fits, f.step_cost if f.fits and f.step_cost is not None else 0, -f.saves))
    combined = closest = None
    if budget is not None and fixes and not any(f.fits for f in fixes):
        combined, closest = _combine(trial, base, fixes, share)
    at_peak = estimated.at_peak
    options.append(Fix("LoRA adapters (peft) instead of training every weight",
                       "changes what is trained: the frozen weights keep no gradients or optimizer state "
                       "(arithmetic, the adapters' own few bytes aside)",
                       saves=at_peak.get("gradients", 0) + at_peak.get("optimizer_state", 0)))
    return Remedies(tuple(fixes), combined, tuple(options), estimated, closest)


def _adder(base: Config, levers: list[_Lever], world_size: int):
    def add(lever: str, effect: str, world: int = world_size, optimizer: Any = None, search: bool = False,
            **change: Any) -> None:
        try:
            config = dataclasses.replace(base, **change)
        except UsageError:  # a combination Config refuses (FSDP with 16-mixed's GradScaler)
            return
        levers.append(_Lever(lever, effect, config, world, optimizer, search))

    return add


def _levers(trial: _Trial, base: Config, batch_size: int) -> tuple[list[_Lever], list[Fix]]:
    """The levers worth estimating whatever the base's estimate says (a lever that saves nothing is dropped
    once estimated), and the options by arithmetic."""
    world_size = trial.world_size
    model = source_model(trial.workload)
    every_block = tuple(blocks(model))
    levers: list[_Lever] = []
    add = _adder(base, levers, world_size)
    if base.micro_batch > 1 and not base.optimizer_in_backward:
        add("micro-batch", f"exact gradient accumulation to the same batch of "
            f"{trial.searcher(world_size).batch_size}: the same update", search=True, micro_batch=base.micro_batch - 1)
    for precision in _lower_precisions(base.precision):
        add(f"precision {precision}", _PRECISION_EFFECT[precision], precision=precision)
    covered = set(Checkpointing(base.checkpoint).select(model)) if base.checkpoint else set()
    if every_block and not set(every_block) <= covered:
        add("checkpoint='all'", f"recomputes each of the {len(every_block)} blocks' activations in backward instead "
            "of keeping them", checkpoint=every_block)
    if base.zero_grad != "set-to-none":
        add("zero_grad='set-to-none'", "releases gradients right after the update", zero_grad="set-to-none")
    return levers, _eight_bit(trial, base, add)


def _levers_after(trial: _Trial, base: Config, base_estimate: Estimate, batch_size: int) -> list[_Lever]:
    """The levers the base's estimate selects: the fused optimizer where the peak is in the optimizer, the step in
    backward where gradients are alive at the peak, FSDP2 over the fewest GPUs whose model states' share fits."""
    at_peak, world_size = base_estimate.at_peak, trial.world_size
    levers: list[_Lever] = []
    add = _adder(base, levers, world_size)
    if base.optimizer_impl != "fused" and base_estimate.report.peak_phase == "optimizer":
        add("optimizer_impl='fused'", "one kernel for the update, no temporaries", optimizer_impl="fused")
    if (base.strategy == "single" and not base.optimizer_in_backward and base.micro_batch >= batch_size
            and base.precision != "16-mixed" and base.zero_grad == "set-to-none" and at_peak.get("gradients", 0)):
        add("optimizer_in_backward=True", "steps each parameter in backward and frees its gradient at once",
            optimizer_in_backward=True)
    if base.strategy == "single" and world_size == 1 and base.precision != "16-mixed":
        counts = [n for n in GPUS if n <= batch_size]
        if counts:
            states = base_estimate.model_states
            rest = base_estimate.required - states
            fitting = [n for n in counts if trial.budget is not None and states // n + rest <= trial.budget]
            n = fitting[0] if fitting else counts[-1]
            share = -(-batch_size // n)
            add(f"FSDP2 over {n} GPUs", f"shards parameters, gradients and optimizer state 1/{n} per GPU, each GPU "
                f"{share} of the {batch_size} samples (torchrun; memfit.Trainer)", world=n, strategy="fsdp",
                micro_batch=min(base.micro_batch, share))
    return levers


_PRECISION_EFFECT = {
    "bf16-mixed": "autocast to bfloat16: activations in 16 bits, fp32 weights and optimizer state kept",
    "bf16-true": "the model cast to bfloat16: weights, gradients, optimizer state and activations in 16 bits "
                 "(changes the numerics of the update: no fp32 master weights)",
}


def _lower_precisions(precision: str) -> tuple[str, ...]:
    if precision in ("16-true", "bf16-true"):
        return ()
    if precision.endswith("-mixed"):
        return ("bf16-true",)
    return ("bf16-mixed", "bf16-true")


def _eight_bit(trial: _Trial, base: Config, add) -> list[Fix]:
    """bitsandbytes' AdamW8bit (or Adam8bit) for a torch Adam or AdamW: a lever where bitsandbytes is installed,
    else an option by arithmetic."""
    if trial.workload.optimizer is None or base.optimizer_in_backward:
        return []
    probe = trial.workload.optimizer([torch.nn.Parameter(torch.zeros(1))])
    if type(probe) not in (torch.optim.Adam, torch.optim.AdamW):
        return []
    name = "AdamW8bit" if isinstance(probe, torch.optim.AdamW) else "Adam8bit"
    hyper = {k: probe.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    effect = "keeps Adam's two states in 8 bits, blockwise quantized (a small change to the update's numerics)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return [Fix(f"bitsandbytes.optim.{name}", effect + "; pip install bitsandbytes to estimate it (it saves "
                    "up to 3/4 of Adam's fp32 state: 2 of its 8 bytes a parameter kept, and a scale per block)")]
    add(f"bitsandbytes.optim.{name}", effect, optimizer=_EightBit(name, hyper))
    return []


class _EightBit:
    """``params -> bitsandbytes.optim.<name>`` with the user's hyperparameters (hashable: it keys a searcher).

    bitsandbytes is imported when the optimizer is first made (seconds: in the worker that estimates it, not
    before the workers fork)."""

    def __init__(self, name: str, hyper: dict[str, Any]) -> None:
        self.name, self.hyper = name, hyper

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        import bitsandbytes

        return getattr(bitsandbytes.optim, self.name)(params, **self.hyper)


def _combine(trial: _Trial, base: Config, fixes: list[Fix], share: int) -> tuple[Fix | None, Fix | None]:
    """Config levers applied together, most saving first, until the step fits; then the micro-batch, then sharding.

    Returns (the combination that fits, None), or (None, the fix, alone or combined, that needs the least) where
    none fits. A lever that cannot run with those chosen before it, or with the smaller
    micro-batch or the sharding (the step in backward accumulates nothing and runs on one process), is left out
    of that combination, not raised."""
    levers = [(f.lever, dict(f.change)) for f in sorted(fixes, key=lambda f: -f.saves)
              if f.change and f.world_size == trial.world_size and "micro_batch" not in dict(f.change)
              and f.optimizer is None]
    chosen: list[tuple[str, dict[str, Any]]] = []
    config, tried = base, []
    for name, change in levers:
        candidate, applied = _together(config, [(name, change)], share)
        required = trial.required(candidate) if applied and candidate is not None else None
        if required is not None and required < trial.required(config):
            config, chosen = candidate, chosen + [(name, change)]
            if required <= trial.budget:
                break
    if chosen:
        tried.append(trial.fix(" + ".join(name for name, _ in chosen), "together", config))
    if not _fits(tried) and base.micro_batch > 1:
        smaller, kept = _together(base, chosen, share, micro_batch=base.micro_batch - 1)
        if smaller is not None:
            # The largest that fits, else 1: the least this combination can need (the closest, and sharding's).
            largest = trial.searcher(trial.world_size).largest_micro_batch(smaller, trial.budget, smaller.micro_batch)
            m = balanced_micro_batch(share, largest) if largest else 1
            config = dataclasses.replace(smaller, micro_batch=m)
            chosen = [(name, change) for name, change in chosen if name in kept] \
                + [(f"micro-batch {m} x {len(accumulation_steps(share, m))} micro-steps", {})]
            tried.append(trial.fix(" + ".join(name for name, _ in chosen), "together", config))
    if not _fits(tried) and base.strategy == "single":
        for n in (n for n in GPUS if n <= share):
            rank_share = -(-share // n)
            sharded, kept = _together(base, [(name, change) for name, change in chosen if change], rank_share,
                                      strategy="fsdp", micro_batch=min(config.micro_batch, rank_share))
            if sharded is None:  # the base cannot shard (its step in backward, its GradScaler) with any lever
                continue
            if sharded.micro_batch < rank_share:
                kept.append(f"micro-batch {sharded.micro_batch} x "
                            f"{len(accumulation_steps(rank_share, sharded.micro_batch))} micro-steps")
            tried.append(trial.fix(" + ".join(kept + [f"FSDP2 over {n} GPUs"]), "together", sharded, world_size=n))
            if _fits(tried):
                break
    tried = [f for f in tried if f is not None]
    fitting = [f for f in tried if f.fits]
    if fitting:
        return fitting[-1], None
    # The least any fix needs, alone or together (a lever outside the combination, an 8-bit optimizer, may be it).
    return None, min(tried + fixes, key=lambda f: f.required) if tried or fixes else None


def _fits(tried: list[Fix | None]) -> bool:
    return bool(tried) and tried[-1] is not None and bool(tried[-1].fits)


def _together(config: Config, levers: list[tuple[str, dict[str, Any]]], share: int,
              **forced: Any) -> tuple[Config | None, list[str]]:
    """``config`` with ``forced`` (a micro-batch, the sharding) and each lever's change that can run with it and
    the levers before it; and the names of the levers applied. None where ``forced`` cannot run with them.

    A lever is left out where Config refuses the combination, or where it makes a step that ran with ``forced``
    one that cannot: the step in backward with a micro-batch under the rank's ``share`` samples (it cannot
    accumulate), or with sharding (Config refuses it)."""
    def runs(c: Config) -> Config | None:
        c = _config(c, **forced)
        return None if c is None or (c.optimizer_in_backward and c.micro_batch < share) else c

    applied = []
    for name, change in levers:
        candidate = _config(config, **change)
        if candidate is None or (runs(candidate) is None and runs(config) is not None):
            continue
        config, applied = candidate, applied + [name]
    return runs(config), applied


def _config(config: Config, **change: Any) -> Config | None:
    """``config`` with ``change``, or None where Config refuses the combination."""
    try:
        return dataclasses.replace(config, **change)
    except UsageError:
        return None
