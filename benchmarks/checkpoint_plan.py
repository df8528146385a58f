"""Real step time of memfit's plan under a memory budget, against checkpointing every block and sqrt(n) segments.

A 12-block GPT-2-like model on CPU (``gpt2-tiny`` with n_layer=12, width 128,
4 heads, sequence 128, vocabulary 1024, no dropout, AdamW), batch 16. The
budget (target ``device="cpu"``, where an estimate's ``required`` is its
``peak``) is the unconstrained step's estimated peak with 60% of the
activations live at that peak removed::

    budget = est0.peak - 0.6 * est0.at_peak["activations"],  est0 = memfit.estimate(wl, Config(micro_batch=16))

so the model states, the batch and the temporaries stay and 40% of the
activations fit. Under it:

(a) memfit's plan: ``memfit.plan(wl, budget, batch_size=16, device="cpu",
    precisions=("32-true",))`` (its micro-batch, gradient accumulation and
    checkpointed blocks are printed);
(b) checkpointing every block at micro-batch 16 (``checkpoint=("all",)``:
    ``transformer.h.0`` .. ``transformer.h.11``);
(c) Chen et al. 2016's sqrt(n) scheme at micro-batch 16: the n blocks are split
    into contiguous segments of round(sqrt(n)) blocks (12 -> 4 segments of 3);
    each segment keeps only its input for backward and recomputes all its
    blocks at once. memfit checkpoints modules, and no module of GPT-2 spans
    several blocks, so the benchmark regroups ``transformer.h`` into a
    ModuleList of segment modules (each runs its blocks in turn; same weights,
    same math, checked once) and checkpoints them with memfit's own
    Checkpointing (``checkpoint=("transformer.h.*",)``). This is Chen's scheme
    exactly: stored are the segment inputs, and backward holds one segment's
    activations at a time; the recomputation is one extra forward of every
    block, as in (b).
(c') the closest per-block realization (no regrouping): memfit checkpoints
    whole blocks, and a checkpointed block keeps only its input, i.e. is a
    segment of length 1. Chen's "store ~sqrt(n) of the n layers' results"
    becomes: about sqrt(n) blocks keep their activations, evenly spaced, and
    the other blocks are checkpointed. The kept blocks are the last block of
    each segment of (c) (for 12: blocks 2, 5, 8, 11; a checkpointed last block
    would be recomputed at the start of backward, where memory is highest).
    It recomputes n - n/round(sqrt(n)) blocks (8 of 12).

Each is verified to fit by ``memfit.measure(wl, config=cfg, steps=2).peak <=
budget`` (printed). A plan with gradient accumulation also keeps the
gradients of earlier micro-steps during later ones, which ``measure`` at the
micro-batch does not run: its logical batch is also tracked for real
(``memfit.track`` around two logical batches), and that peak counts too.

Step time is of one logical batch (16 samples), run for real on CPU: a
forward and backward per micro-batch of the accumulation (the loss scaled by
the micro-batch's share), then one ``optimizer.step()`` and ``zero_grad``;
with one micro-batch this is exactly ``memfit.workload.run_steps``. Each
configuration has its own model and AdamW, built after ``Recipe.apply``; all
run one warm-up batch, then ``--repeats`` rounds interleaved in a rotated
order; the median is compared (the range is printed in brackets; on
8 blocks, (b) and the subset of all 8 blocks are the same configuration, so
their difference shows the timing noise). The unconstrained step (micro-batch 16, no
checkpointing, over the budget) is timed for reference.

Exhaustive best, on an 8-block variant (same widths, budget defined the same
way for it): all 2^8 = 256 subsets of ``transformer.h.0..7`` as checkpoint
sets at micro-batch 16 are estimated (``memfit.estimate(..., device="cpu")
.required``; in ``--workers`` processes); the fitting ones are kept. Blocks
are identical, so subsets with the same number of checkpointed blocks
recompute the same FLOPs: one representative per count of checkpointed blocks
among the fitting subsets is timed (the fitting subset with the lowest
estimated peak of that count; ``--all-subsets`` times every fitting subset),
and the fastest is the exhaustive best. Note that the exhaustive space is
checkpoint sets at micro-batch 16, while the plan may also choose a smaller
micro-batch with accumulation.

Targets: plan <= 0.9x checkpoint-every-block; plan within 5% of the
exhaustive best on 8 blocks (<= 1.05x); every configuration fits.

    python benchmarks/checkpoint_plan.py [--repeats 9] [--workers 2] [--all-subsets]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import multiprocessing

import torch
from torch import nn

import memfit
from memfit import Config
from memfit.strategies import Recipe
from memfit.workload import Workload, build_model, step_loss

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # the preset says so when it is loaded
    pass

BATCH = 16
SHAPE = dict(n_embd=128, n_head=4, seq_len=128, vocab_size=1024, dropout=0.0)


def _workload(n_layer: int) -> Workload:
    return memfit.presets.load("gpt2-tiny", n_layer=n_layer, **SHAPE)


def _budget(workload: Workload) -> tuple[int, memfit.Estimate]:
    est0 = memfit.estimate(workload, Config(micro_batch=BATCH), device="cpu")
    return int(est0.peak - 0.6 * est0.at_peak["activations"]), est0


def _blocks(n_layer: int) -> list[str]:
    return [f"transformer.h.{i}" for i in range(n_layer)]


# --- Chen et al.'s segments: regroup the blocks so that one module spans a segment ---------------------------


class Segment(nn.Module):
    """Consecutive GPT-2 blocks run in turn with the same extra arguments (one checkpointable module)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states, *args, **kwargs):
        for block in self.blocks:
            hidden_states = block(hidden_states, *args, **kwargs)
        return hidden_states


def _segment_lengths(n: int) -> list[int]:
    length = max(1, round(math.sqrt(n)))
    return [min(length, n - start) for start in range(0, n, length)]


def regroup(model: nn.Module) -> nn.Module:
    """``model.transformer.h`` as a ModuleList of :class:`Segment` s of round(sqrt(n)) blocks (in place)."""
    blocks = list(model.transformer.h)
    segments, start = [], 0
    for length in _segment_lengths(len(blocks)):
        segments.append(Segment(blocks[start : start + length]))
        start += length
    model.transformer.h = nn.ModuleList(segments)
    return model


def _segmented(workload: Workload) -> Workload:
    factory = workload.model
    return dataclasses.replace(workload, model=lambda: regroup(factory()), name=workload.name + "-segments")


def _check_regroup(workload: Workload) -> float:
    """The regrouped model computes the same loss with the same weights (largest absolute difference)."""
    torch.manual_seed(0)
    model = build_model(workload).eval()
    batch = workload.batch(2)
    with torch.no_grad():
        before = step_loss(workload.loss(model, batch))
        after = step_loss(workload.loss(regroup(model), batch))
    return abs(float(before) - float(after))


def _kept_sqrt(n: int) -> tuple[str, ...]:
    """(c'): every block checkpointed except the last of each Chen segment (round(sqrt(n)) blocks kept)."""
    kept, end = set(), 0
    for length in _segment_lengths(n):
        end += length
        kept.add(end - 1)
    return tuple(b for i, b in enumerate(_blocks(n)) if i not in kept)


# --- real steps ----------------------------------------------------------------------------------------------


def _logical_batch(workload: Workload, model, optimizer, recipe: Recipe, accumulation, tracker=None) -> None:
    total = sum(accumulation)
    for mb in accumulation:
        batch = workload.batch(mb)
        if tracker is not None:
            tracker.mark_inputs(batch)
        with recipe.forward_context():
            loss = step_loss(workload.loss(model, batch))
        (loss * (mb / total)).backward()
        del batch, loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass
class Case:
    label: str
    workload: Workload
    config: Config
    accumulation: tuple[int, ...]
    budget: int
    reference: bool = False  # timed for context, not expected to fit
    measured: int = 0
    tracked: int = 0
    times: list[float] = dataclasses.field(default_factory=list)

    def build(self) -> None:
        torch.manual_seed(0)
        self.recipe = Recipe(self.config, "cpu")
        self.model = self.recipe.apply(build_model(self.workload))
        self.model.train()
        self.optimizer = self.workload.optimizer(self.model.parameters())

    def step(self) -> None:
        _logical_batch(self.workload, self.model, self.optimizer, self.recipe, self.accumulation)

    def verify(self) -> None:
        """measure() at the micro-batch; and for accumulation, two tracked real logical batches."""
        self.measured = memfit.measure(self.workload, config=self.config, steps=2, device="cpu").peak
        self.tracked = self.measured
        if len(self.accumulation) > 1:
            torch.manual_seed(0)
            recipe = Recipe(self.config, "cpu")
            model = recipe.apply(build_model(self.workload))
            model.train()
            optimizer = self.workload.optimizer(model.parameters())
            with memfit.track(model, optimizer, device="cpu") as tracker:
                for _ in range(2):
                    _logical_batch(self.workload, model, optimizer, recipe, self.accumulation, tracker)
            self.tracked = tracker.report().peak

    @property
    def peak(self) -> int:
        return max(self.measured, self.tracked)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _time(cases: list[Case], repeats: int) -> None:
    for case in cases:
        case.build()
        case.step()  # warm-up: optimizer state, allocator, lazy imports
        case.times = []
    for r in range(repeats):
        # Rotate the order each round so that no configuration always runs first.
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            start = time.perf_counter()
            case.step()
            case.times.append(time.perf_counter() - start)
    for case in cases:
        del case.model, case.optimizer, case.recipe


def _describe(config: Config, accumulation, blocks: list[str]) -> str:
    ck = config.checkpoint
    if ck == ("all",):
        which = f"all {len(blocks)} blocks"
    elif ck and all(c in blocks for c in ck):
        which = f"{len(ck)} blocks [" + ",".join(c.rsplit(".", 1)[1] for c in ck) + "]"
    else:
        which = ",".join(ck) if ck else "none"
    acc = "+".join(map(str, accumulation))
    return f"micro-batch {config.micro_batch} x {len(accumulation)} ({acc}), checkpoint {which}"


# --- the exhaustive search's estimates, in worker processes --------------------------------------------------

_WORKER: dict = {}


def _init_worker(n_layer: int) -> None:
    torch.set_num_threads(1)
    if "transformers" in globals():
        transformers.logging.set_verbosity_error()
    _WORKER["workload"] = _workload(n_layer)


def _required(subset: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
    est = memfit.estimate(_WORKER["workload"], Config(micro_batch=BATCH, checkpoint=subset), device="cpu")
    return subset, est.required


def _estimate_subsets(n_layer: int, workers: int) -> dict[tuple[str, ...], int]:
    blocks = _blocks(n_layer)
    subsets = [tuple(b for i, b in enumerate(blocks) if mask >> i & 1) for mask in range(2**n_layer)]
    if workers <= 1:
        _WORKER["workload"] = _workload(n_layer)
        return dict(map(_required, subsets))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(n_layer,)) as pool:
        return dict(pool.map(_required, subsets, chunksize=8))


def _print_case(case: Case) -> None:
    fit = "fits" if case.fits else ("over (reference only)" if case.reference else "OVER THE BUDGET")
    extra = f", tracked accumulation peak {memfit.format_bytes(case.tracked)}" if case.tracked != case.measured else ""
    print(f"  {case.label:<26} median {1000 * case.median:7.1f} ms "
          f"[{1000 * min(case.times):5.0f}-{1000 * max(case.times):5.0f}]  "
          f"measured peak {memfit.format_bytes(case.measured)}{extra} ({fit})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--workers", type=int, default=2, help="processes estimating the 256 subsets")
    parser.add_argument("--all-subsets", action="store_true", help="time every fitting subset, not one per count")
    args = parser.parse_args()
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, batch {BATCH}")

    # ---- 12 blocks ----
    n = 12
    wl = _workload(n)
    blocks = _blocks(n)
    budget, est0 = _budget(wl)
    act = est0.at_peak["activations"]
    print(f"\n{n} blocks: unconstrained estimate peak {memfit.format_bytes(est0.peak)} (activations at the peak "
          f"{memfit.format_bytes(act)}, model states {memfit.format_bytes(est0.model_states)})")
    print(f"budget = peak - 0.6 x activations at the peak = {memfit.format_bytes(budget)} ({budget} bytes)")

    t = time.perf_counter()
    plan = memfit.plan(wl, budget, batch_size=BATCH, device="cpu", precisions=("32-true",))
    plan_s = time.perf_counter() - t
    print(f"memfit.plan: {plan_s:.1f} s, {plan.extra['estimates']} estimates; chose "
          f"{_describe(plan.config, plan.accumulation, blocks)}; predicted {memfit.format_bytes(plan.required)}, "
          f"predicted cost {plan.step_cost:.3f}")
    for alt in plan.alternatives[1:]:
        print(f"  alternative: {_describe(alt.config, alt.accumulation, blocks)}, cost {alt.step_cost:.3f}")

    diff = _check_regroup(wl)
    seg = _segmented(wl)
    lengths = _segment_lengths(n)
    print(f"Chen segments: {len(lengths)} segments of {'/'.join(map(str, lengths))} blocks "
          f"(regrouped model's loss differs by {diff:.1e})")
    kept = _kept_sqrt(n)
    cases12 = [
        Case("(a) memfit plan", wl, plan.config, plan.accumulation, budget),
        Case("(b) checkpoint every block", wl, Config(micro_batch=BATCH, checkpoint=("all",)), (BATCH,), budget),
        Case("(c) Chen sqrt(n) segments", seg, Config(micro_batch=BATCH, checkpoint=("transformer.h.*",)), (BATCH,), budget),
        Case("(c') sqrt(n) blocks kept", wl, Config(micro_batch=BATCH, checkpoint=kept), (BATCH,), budget),
        Case("unconstrained", wl, Config(micro_batch=BATCH), (BATCH,), budget, reference=True),
    ]
    print(f"(c') checkpoints {_describe(cases12[3].config, (BATCH,), blocks)}")
    for case in cases12:
        case.verify()

    # ---- 8 blocks: exhaustive ----
    n8 = 8
    wl8 = _workload(n8)
    blocks8 = _blocks(n8)
    budget8, est08 = _budget(wl8)
    print(f"\n{n8} blocks: unconstrained estimate peak {memfit.format_bytes(est08.peak)}; "
          f"budget (same definition) {memfit.format_bytes(budget8)} ({budget8} bytes)")
    t = time.perf_counter()
    plan8 = memfit.plan(wl8, budget8, batch_size=BATCH, device="cpu", precisions=("32-true",))
    plan8_s = time.perf_counter() - t
    print(f"memfit.plan: {plan8_s:.1f} s, {plan8.extra['estimates']} estimates; chose "
          f"{_describe(plan8.config, plan8.accumulation, blocks8)}; predicted {memfit.format_bytes(plan8.required)}")
    t = time.perf_counter()
    required = _estimate_subsets(n8, args.workers)
    fitting = {s: r for s, r in required.items() if r <= budget8}
    by_count: dict[int, list[tuple[str, ...]]] = {}
    for s in sorted(fitting, key=lambda s: (len(s), fitting[s])):
        by_count.setdefault(len(s), []).append(s)
    print(f"estimated all {len(required)} subsets in {time.perf_counter() - t:.1f} s ({args.workers} processes): "
          f"{len(fitting)} fit; fitting per count of checkpointed blocks: "
          + ", ".join(f"{k}: {len(v)}/{math.comb(n8, k)}" for k, v in sorted(by_count.items())))
    timed = [s for v in by_count.values() for s in (v if args.all_subsets else v[:1])]
    cases8 = [Case("(a) memfit plan", wl8, plan8.config, plan8.accumulation, budget8),
              Case("(b) checkpoint every block", wl8, Config(micro_batch=BATCH, checkpoint=("all",)), (BATCH,), budget8)]
    subset_cases = [Case(f"subset {''.join(b[-1] for b in s) or '-'}", wl8, Config(micro_batch=BATCH, checkpoint=s),
                         (BATCH,), budget8) for s in timed]
    cases8 += subset_cases
    for case in cases8:
        case.verify()

    _time(cases12, args.repeats)
    _time(cases8, args.repeats)

    print(f"\n{n} blocks, budget {memfit.format_bytes(budget)}, median step of one logical batch of {BATCH}:")
    for case in cases12:
        _print_case(case)
    print(f"\n{n8} blocks, budget {memfit.format_bytes(budget8)} (subsets named by their checkpointed blocks' indices):")
    for case in cases8:
        _print_case(case)
    fitting_subsets = [c for c in subset_cases if c.fits]
    best = min(fitting_subsets, key=lambda c: c.median) if fitting_subsets else None
    if best is not None:
        print(f"exhaustive best: {best.label} ({len(best.config.checkpoint)} blocks checkpointed), "
              f"{1000 * best.median:.1f} ms")

    plan12, all12 = cases12[0], cases12[1]
    r_all = plan12.median / all12.median
    r_best = cases8[0].median / best.median if best is not None else float("nan")
    all_fit = all(c.fits for c in cases12 + cases8 if not c.reference)
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f} s")
    print(f"ratio: plan / checkpoint-all = {r_all:.2f}x (target <= 0.9); "
          f"plan / exhaustive best (8 blocks) = {r_best:.2f}x (target <= 1.05); all fit: {all_fit}")


if __name__ == "__main__":
    main()
