"""The planner's candidates for one precision: found from a few estimates, the winner confirmed by estimates.

Today's exhaustive search (``plan(..., exhaustive=True)``) searches the largest
micro-batch for each of up to a dozen checkpoint sets, each search a few
estimates. Here the largest micro-batch without checkpointing is searched once
(exact), and checkpointing is chosen from that search's estimates:

* what checkpointing each block would free comes from the module attribution of
  one trace (:attr:`memfit.MemoryReport.kept_by_module`: the bytes its forward
  allocated and kept for backward), per sample; what it costs, from the cost
  model's forward FLOPs of the block;
* memory without checkpointing is affine in the micro-batch (activations scale
  with it, model states do not): the search's estimates give the line;
* for each number of micro-steps the batch could take, the micro-batch it needs
  and the bytes that must be freed follow, and the cheapest set of blocks that
  frees them is chosen: every subset where there are 12 blocks or fewer (so a CNN
  whose big first stage is worth more than two later ones is handled), else the
  blocks in order of recompute FLOPs per byte kept (for identical blocks, any k
  of them; the first k are taken);
* the candidates are ranked by the cost model, and the best is confirmed: its
  largest micro-batch is searched with estimates (it fits, the next does not),
  and its cost recomputed from it. Where a prediction was wrong (the set does not
  fit), a block more is added; while a predicted candidate would still be cheaper
  than the best confirmed, it is confirmed too.

Known limitations: a block's kept bytes are an upper bound of what checkpointing
it frees (its output stays alive for the next block), so a set may need a block
more than predicted (one more estimate); candidates that were not confirmed are
listed with their predicted requirement (``Alternative.predicted``).
"""

from __future__ import annotations

import dataclasses
import itertools

from memfit.checkpointing import segment_layers
from memfit.config import Config, balanced_micro_batch
from memfit.cost import CostModel
from memfit.searcher import Searcher

__all__ = ["Candidate", "fast_candidates", "cheapest_cover"]

# Up to this many blocks every subset is tried; beyond, blocks are taken in order of FLOPs per byte.
_EXACT_BLOCKS = 12
# Predicted candidates confirmed at most, per precision, beyond the first.
_MAX_CONFIRM = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A configuration found for the plan: see :class:`memfit.planner.Alternative` for the fields."""

    config: Config
    required: int
    step_cost: float
    largest: int | None
    predicted: bool = False


def cheapest_cover(saves: list[int], costs: list[float], need: float) -> tuple[int, ...] | None:
    """Indices of the items whose ``saves`` sum to at least ``need`` at the least total cost (None: none do).

    Every subset for up to 12 items; beyond, items in order of cost per byte saved.
    Ties go to fewer items, then earlier ones.
    """
    n = len(saves)
    if need <= 0:
        return ()
    if sum(saves) < need:
        return None
    if n <= _EXACT_BLOCKS:
        best = None
        for k in range(1, n + 1):
            for subset in itertools.combinations(range(n), k):
                if sum(saves[i] for i in subset) >= need:
                    key = (sum(costs[i] for i in subset), k, subset)
                    if best is None or key < best:
                        best = key
        return best[2]
    order = sorted(range(n), key=lambda i: (costs[i] / saves[i] if saves[i] > 0 else float("inf"), i))
    chosen, total = [], 0
    for i in order:
        chosen.append(i)
        total += saves[i]
        if total >= need:
            return tuple(sorted(chosen))
    return None


def fast_candidates(searcher: Searcher, cost: CostModel, base: Config, budget: int, batch_size: int,
                    blocks: list[str]) -> list[Candidate]:
    """The confirmed best configuration for ``base``'s precision (and any cheaper predicted ones), see the module.

    With ``base.optimizer_in_backward`` only the whole batch in one micro-step is a candidate.
    """
    whole = base.optimizer_in_backward  # a step in backward cannot accumulate

    def usable(c: Candidate | None) -> bool:
        return c is not None and (not whole or c.config.micro_batch == batch_size)

    m0 = searcher.largest_micro_batch(base, budget, batch_size)
    found = [c for c in [_confirmed(searcher, cost, base, batch_size, (), m0) if m0 else None] if usable(c)]
    if m0 == batch_size or not blocks:
        return found
    if m0 == 0 and not searcher.fits(dataclasses.replace(base, checkpoint=tuple(blocks)), budget):
        return found  # not one sample fits even with every block recomputed
    model = _Model(searcher, cost, base, blocks, m0)
    predicted = model.predict(budget, batch_size, whole)
    tried: set[tuple[str, ...]] = set()
    for _ in range(_MAX_CONFIRM + 1):
        best = min((c.step_cost for c in found), default=float("inf"))
        pending = [p for p in predicted if p[0] < best and p[1] not in tried]
        if not pending:
            break
        _, ckpt, _, _ = min(pending)
        tried.add(ckpt)
        candidate = model.confirm(budget, batch_size, ckpt)
        if usable(candidate):
            tried.add(candidate.config.checkpoint)
            found.append(candidate)
    best = min((c.step_cost for c in found), default=float("inf"))
    for step_cost, ckpt, m, required in predicted[:3]:
        if ckpt not in tried and step_cost >= best:
            config = dataclasses.replace(base, micro_batch=balanced_micro_batch(batch_size, m), checkpoint=ckpt)
            found.append(Candidate(config, required, step_cost, m, predicted=True))
    return found


class _Model:
    """Memory and recomputation of each block, from the estimates without checkpointing."""

    def __init__(self, searcher: Searcher, cost: CostModel, base: Config, blocks: list[str], m0: int) -> None:
        self.searcher, self.cost, self.base, self.blocks, self.m0 = searcher, cost, base, blocks, m0
        ref = max(m0, 1)
        low = searcher.estimate(dataclasses.replace(base, micro_batch=ref))
        high = searcher.estimate(dataclasses.replace(base, micro_batch=ref + 1))
        self.slope = high.required - low.required
        self.intercept = low.required - self.slope * ref
        # What each block keeps for backward, affine in the micro-batch: activations scale with it,
        # the weights autocast cast and a matmul saved do not.
        self.saves_at = [_kept(low, b) for b in blocks]
        self.saves = [_kept(high, b) - at for b, at in zip(blocks, self.saves_at)]
        self.ref = ref
        _, per_module = cost.flops(base.precision)
        self.costs = [float(sum(per_module.get(p, 0) for p in (segment_layers(b) or [b]))) for b in blocks]

    def predict(self, budget: int, batch_size: int, whole: bool) -> list[tuple[float, tuple[str, ...], int, int]]:
        """(predicted cost, checkpoint set, micro-batch, predicted bytes) per number of micro-steps, cheapest first."""
        out = []
        steps = 1 if whole else (-(-batch_size // self.m0) - 1 if self.m0 else batch_size)
        seen = set()
        for n in range(steps, 0, -1):
            m = -(-batch_size // n)
            if m in seen or m <= self.m0:
                continue
            seen.add(m)
            saves = [at + slope * (m - self.ref) for at, slope in zip(self.saves_at, self.saves)]
            chosen = cheapest_cover(saves, self.costs, self.intercept + self.slope * m - budget)
            if chosen is None:
                # No set frees enough by the model, nor at any larger micro-batch; but the model is
                # additive, and recomputing every block frees more than the sum (no two blocks'
                # kept tensors alive at once): all blocks are a candidate at m, to be confirmed.
                ckpt = tuple(self.blocks)
                config = dataclasses.replace(self.base, micro_batch=balanced_micro_batch(batch_size, m),
                                             checkpoint=ckpt)
                out.append((self.cost.step_cost(config, batch_size), ckpt, m, int(self.intercept + m * self.slope
                                                                                   - sum(saves))))
                break
            ckpt = tuple(self.blocks[i] for i in chosen)
            config = dataclasses.replace(self.base, micro_batch=balanced_micro_batch(batch_size, m), checkpoint=ckpt)
            required = int(self.intercept + m * self.slope - sum(saves[i] for i in chosen))
            out.append((self.cost.step_cost(config, batch_size), ckpt, m, required))
        return sorted(out)

    def confirm(self, budget: int, batch_size: int, ckpt: tuple[str, ...]) -> Candidate | None:
        """The set's largest micro-batch by estimates. A set that lets no larger micro-batch than none
        does fit gets the block with the fewest FLOPs per byte it does not have yet (three times at most)."""
        for _ in range(3):
            config = dataclasses.replace(self.base, checkpoint=ckpt)
            largest = self.searcher.largest_micro_batch(config, budget, batch_size, start=self.m0 + 1)
            if largest > self.m0:
                return _confirmed(self.searcher, self.cost, config, batch_size, ckpt, largest)
            rest = [i for i, b in enumerate(self.blocks) if b not in ckpt]
            if not rest:
                return None
            extra = min(rest, key=lambda i: (self.costs[i] / self.saves_at[i] if self.saves_at[i] > 0 else float("inf"), i))
            ckpt = tuple(b for i, b in enumerate(self.blocks) if b in ckpt or i == extra)
        return None


def _kept(estimate, block: str) -> int:
    kept = estimate.report.kept_by_module
    return sum(kept.get(p, 0) for p in (segment_layers(block) or [block]))


def _confirmed(searcher: Searcher, cost: CostModel, base: Config, batch_size: int, ckpt: tuple[str, ...],
               largest: int) -> Candidate:
    config = dataclasses.replace(base, micro_batch=balanced_micro_batch(batch_size, largest), checkpoint=tuple(ckpt))
    return Candidate(config, searcher.estimate(config).required, cost.step_cost(config, batch_size), largest)
