"""plan(): the configuration that fits a memory budget at the best predicted speed.

The planner works from estimates only (fake tensors, no GPU): for each allowed
precision it finds the largest micro-batch that fits without checkpointing (a
monotone search over estimates), chooses the checkpoint sets that would let
larger micro-batches fit from those estimates and confirms the best by
estimates (:mod:`memfit.candidates`), splits the user's batch into
micro-batches of at most that size (gradient accumulation keeps the effective
batch and its math), and ranks the candidates by the cost model of
:mod:`memfit.cost` (FLOPs on fake tensors, recomputation, precision speed, and the
device's efficiency at small micro-batches; ``calibrate=True`` fits the latter
from timed real micro-steps). ``exhaustive=True`` searches every set of the first
k blocks instead, as memfit did before.

It never changes the math the user asked for: the effective batch, the
optimizer, and any precision outside ``precisions`` stay as they are.

Known limitations: the cost model is a model (FLOPs, not a profile): use
``calibrate=True`` on the target device for the efficiency curve. Candidates
not confirmed by an estimate (they were predicted dearer than the winner) are
listed with predicted figures. Offload is costed as free (its PCIe traffic is
not modelled).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from memfit.candidates import fast_candidates
from memfit.checks import positive_int
from memfit.config import Config, accumulation_steps, balanced_micro_batch, check_precision
from memfit.cost import DEFAULT_M_HALF, CostModel, calibrate_efficiency
from memfit.devices import DeviceProfile
from memfit.errors import Explained, MemfitError, UsageError
from memfit.explain import explain
from memfit.estimator import Estimate
from memfit.fixes import Fix
from memfit.ranks import ranks_reason, strategy_variants
from memfit.searcher import Searcher
from memfit.units import format_budget, format_bytes, parse_bytes
from memfit.workload import Workload

__all__ = ["Plan", "Alternative", "PlanError", "Searcher", "plan", "resolve_budget", "accumulation_steps",
           "balanced_micro_batch"]

# A safety margin under "auto" budgets: the CUDA context of other libraries, NCCL
# buffers and fragmentation the allocator model does not see.
_AUTO_MARGIN = 0.05


class PlanError(Explained, MemfitError):
    """Nothing fits the budget. ``floor`` is the model states' bytes; ``fixes`` what would move them
    (:class:`memfit.fixes.Fix`), and ``levers`` the same as a dict, each lever's bytes saved;
    ``explanation`` the smallest step's (micro-batch 1, every block checkpointed) explained, its fixes
    estimated (:func:`memfit.explain`), made when first read."""

    def __init__(self, message: str, *, floor: int, budget: int, fixes: tuple[Fix, ...] = (),
                 levers: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.floor = floor
        self.budget = budget
        # ``levers`` is the form before Fix records: each a lever's name and the bytes it saves.
        self.fixes = tuple(fixes) or tuple(Fix(name, saves=saves) for name, saves in (levers or {}).items())
        self.levers = {fix.lever: fix.saves for fix in self.fixes}


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
    predicted: bool = False
    """True for a candidate the planner ranked from its memory model without confirming it by an
    estimate (it was not the cheapest): ``required`` and ``largest`` are predictions."""


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
                    "predicted": a.predicted,
                }
                for a in self.alternatives
            ],
            "extra": dict(self.extra),
        }

    def table(self, *, width: int = 100) -> str:
        from memfit.display import render_plan

        return render_plan(self, width=width)


def resolve_budget(budget: int | str, device: str) -> int:
    """Int bytes from "24GiB", an int, or "auto" (free CUDA memory minus 5%)."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        if device != "cuda" or not torch.cuda.is_available():
            raise UsageError("budget 'auto' reads the free memory of a CUDA device, and none is available here; "
                             "give a size such as '24GiB'")
        free, _total = torch.cuda.mem_get_info()
        return int(free * (1 - _AUTO_MARGIN))
    return parse_bytes(budget)


def _candidates(workload: Workload, globs: tuple[str, ...] | None) -> list[str]:
    """The modules the planner may checkpoint, in forward order: the model's repeated blocks, or the user's globs."""
    from memfit.estimator import source_model
    from memfit.checkpointing import Checkpointing, blocks

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
    optimizer_impl: str = "default",
    zero_grad: str = "set-to-none",
    optimizer_in_backward: bool = False,
    profile: DeviceProfile | str | None = None,
    exhaustive: bool = False,
    world_size: int = 1,
    strategies: tuple[str, ...] | list[str] | None = None,
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
        optimizer_impl, zero_grad, optimizer_in_backward: how the training loop runs the
            optimizer and releases gradients (the :class:`Config` fields of these names); the
            plan keeps them. A step in backward accumulates nothing: its plan is one micro-batch.
        profile: the CUDA card's context and workspaces (see :func:`memfit.estimate`).
        exhaustive: search the largest micro-batch of every candidate checkpoint set (the first
            k blocks, for each k up to 8, powers of two and all), every estimate a full trace,
            instead of choosing the set from the search without checkpointing and confirming the
            winner (:mod:`memfit.candidates`) on extrapolated traces (:mod:`memfit.traces`,
            :mod:`memfit.depth`); slower, kept to compare against.
        world_size: the GPUs (ranks) trained on. ``batch_size`` is then the global batch: each rank
            gets its share (the first ranks one sample more where it does not divide), every rank runs
            the same micro-steps, and the figures are one rank's (the largest share's).
        strategies: with ``world_size`` > 1, the strategies the plan may use (default ``("ddp",
            "fsdp")``; FSDP with and without resharding after forward); their collectives are costed
            by :func:`memfit.cost.communication_bytes`. Gradients are synced on the last micro-step
            only, as the Trainer runs them.

    Raises:
        PlanError: nothing fits, with the floor and the levers that would move it.
    """
    if not isinstance(workload, Workload):
        raise UsageError(f"plan() takes a memfit.Workload, got {type(workload).__name__}")
    positive_int(batch_size, "batch_size", hint="the effective batch")
    variants = strategy_variants(world_size, strategies, batch_size)
    rank_batch = -(-batch_size // world_size)  # the largest rank's share
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
    budget = resolve_budget(budget, device)
    if isinstance(precisions, str):
        precisions = (precisions,)
    precisions = tuple(precisions) if precisions else ("32-true",)
    for p in precisions:
        check_precision(p)
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
    m_half = DEFAULT_M_HALF if m_half is None else float(m_half)

    # The exhaustive search is kept as it was before issue 12, full traces included, to compare against.
    searcher = Searcher(workload, device, batch_size=rank_batch, profile=profile,
                        extrapolate=False if exhaustive else None, world_size=world_size)
    blocks = _candidates(workload, checkpoint_candidates) if allow_checkpoint else []
    offloads = (False, True) if allow_offload and device == "cuda" else (False,)
    model = CostModel(workload, device=device, m_half=m_half)
    cost_of = lambda config: model.step_cost(config, rank_batch, world_size)  # noqa: E731

    candidates: list[Alternative] = []
    for precision in precisions:
        for offload in offloads:
            for variant in variants:
                try:
                    base = Config(micro_batch=1, precision=precision, offload_activations=offload,
                                  optimizer_impl=optimizer_impl, zero_grad=zero_grad,
                                  optimizer_in_backward=optimizer_in_backward, **variant)
                except UsageError:  # a combination Config refuses (FSDP with 16-mixed's GradScaler)
                    continue
                if exhaustive:
                    candidates += _exhaustive(searcher, base, budget, rank_batch, blocks, cost_of)
                    continue
                for c in fast_candidates(searcher, model, base, budget, rank_batch, blocks):
                    candidates.append(Alternative(c.config, accumulation_steps(rank_batch, c.config.micro_batch),
                                                  c.required, cost_of(c.config), True, largest=c.largest,
                                                  predicted=c.predicted))

    # Syncing every micro-step changes nothing where there is one: the same candidate twice.
    candidates = [c for c in candidates if not (c.config.sync_every_micro_step and len(c.accumulation) == 1)]
    if not candidates and optimizer_in_backward:
        one = Config(micro_batch=batch_size, precision=precisions[0], optimizer_impl=optimizer_impl,
                     optimizer_in_backward=True)
        raise PlanError(f"with optimizer_in_backward the whole batch of {batch_size} is one micro-batch (a step in "
                        f"backward cannot accumulate), and it needs {format_bytes(searcher.estimate(one).required)} at "
                        f"{precisions[0]} against a budget of {format_bytes(budget)}; plan without "
                        "optimizer_in_backward to split the batch", floor=0, budget=budget)
    if not candidates:
        raise _nothing_fits(searcher, precisions, budget, blocks, variants[-1])

    # 1.0 = the whole batch in one micro-step at the fastest allowed precision, no recomputation.
    ideal = min(model.step_cost(Config(micro_batch=rank_batch, precision=p), rank_batch) for p in precisions)
    candidates.sort(key=lambda a: (a.step_cost, a.predicted, a.required))
    best = candidates[0]
    alternatives = tuple(dataclasses.replace(a, step_cost=a.step_cost / ideal) for a in candidates)
    chosen = alternatives[0]
    est = searcher.estimate(best.config)
    reasons = _reasons(chosen, alternatives, rank_batch, budget, est, blocks, searcher)
    if world_size > 1:
        reasons.insert(0, ranks_reason(chosen.config, batch_size, world_size, variants))
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
        extra={"estimates": searcher.calls, "m_half": m_half, "device": device, "workload": workload.name,
               "search": "exhaustive" if exhaustive else "confirmed", "world_size": world_size,
               "rank_batches": [len(range(r, batch_size, world_size)) for r in range(world_size)]},
    )


def _exhaustive(searcher: Searcher, base: Config, budget: int, batch_size: int, blocks: list[str],
                cost_of) -> list[Alternative]:
    """The largest micro-batch of each checkpoint set of the first k blocks (every k up to 8, then
    powers of two and all), each a search over estimates: the planner before :mod:`memfit.candidates`."""
    counts = range(1, len(blocks) + 1) if len(blocks) <= 8 else sorted(
        {2**i for i in range(len(blocks).bit_length()) if 2**i < len(blocks)} | {len(blocks)})
    found = []
    previous_best = 0
    for ckpt in [()] + [tuple(blocks[:k]) for k in counts]:
        config = dataclasses.replace(base, checkpoint=ckpt)
        # More checkpointing never needs more memory: start from the last size that fitted.
        m = searcher.largest_micro_batch(config, budget, batch_size, start=previous_best or 1)
        if m == 0 or (base.optimizer_in_backward and m < batch_size):
            continue
        if ckpt and m <= previous_best:
            continue  # more recomputation, no larger micro-batch: never cheaper
        previous_best = m
        # As many micro-steps as the largest size needs, each as small as that allows:
        # the same predicted cost, and headroom for what an estimate cannot see.
        config = dataclasses.replace(config, micro_batch=balanced_micro_batch(batch_size, m))
        found.append(Alternative(config, accumulation_steps(batch_size, config.micro_batch),
                                 searcher.estimate(config).required, cost_of(config), True, largest=m))
        if m == batch_size:
            break  # the whole batch fits: more checkpointing only costs
    return found


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


def _nothing_fits(searcher: Searcher, precisions, budget: int, blocks, variant: dict[str, Any]) -> PlanError:
    cheapest = min(precisions, key=lambda p: (0 if p.endswith("-true") and not p.startswith("32") else 1, p))
    if variant.get("strategy") == "fsdp" and cheapest == "16-mixed":
        variant = {}  # Config refuses FSDP with 16-mixed: the floor of one process
    est = searcher.estimate(Config(micro_batch=1, precision=cheapest, checkpoint=tuple(blocks), **variant))
    own = est.report.peak_by_category
    floor = own["parameters"] + own["gradients"] + own["optimizer_state"]
    fixes = []
    if cheapest != "bf16-true":
        low = searcher.estimate(Config(micro_batch=1, precision="bf16-true", checkpoint=tuple(blocks),
                                       **variant)).report.peak_by_category
        fixes.append(Fix("precision bf16-true", change=(("precision", "bf16-true"),), verified=True,
                         saves=floor - (low["parameters"] + low["gradients"] + low["optimizer_state"])))
    # How the loop runs the optimizer: estimated, as the plan would run them.
    base = Config(micro_batch=1, precision=cheapest, checkpoint=tuple(blocks), **variant)
    for lever, change in (("optimizer_impl='fused'", (("optimizer_impl", "fused"),)),
                          ("optimizer_in_backward=True", (("optimizer_in_backward", True),))):
        try:
            other = searcher.estimate(dataclasses.replace(base, **dict(change)))
        except UsageError:  # an optimizer without a fused kernel, a GradScaler: not a lever here
            continue
        if other.required < est.required:
            fixes.append(Fix(lever, change=change, saves=est.required - other.required, verified=True))
    # The rest is arithmetic on the estimate's model states: no Config expresses them yet.
    fixes.append(Fix("an optimizer with less state (SGD without momentum keeps none)", saves=own["optimizer_state"]))
    fixes += [Fix(f"sharding over {n} GPUs (FSDP)", saves=floor - floor // n) for n in (2, 4, 8)]
    fixes.append(Fix("offloading the optimizer state to CPU", saves=own["optimizer_state"]))
    lines = "; ".join(fix.describe() for fix in fixes)
    message = (
        f"nothing fits in {format_budget(budget)}: at micro-batch 1 the step needs {format_bytes(est.required)}, and "
        f"parameters + gradients + optimizer state alone take {format_bytes(floor)} at {cheapest} "
        f"(the cheapest precision allowed). Levers: {lines}"
    )
    error = PlanError(message, floor=floor, budget=budget, fixes=tuple(fixes))
    error.explain_with(lambda: explain(searcher.workload, base, budget, batch_size=searcher.batch_size,
                                       device=searcher.device, profile=searcher.profile,
                                       world_size=searcher.world_size if base.strategy != "single" else 1))
    return error


