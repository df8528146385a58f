"""find_batch_size(): the largest micro-batch that fits, predicted by the estimator and verified by real steps.

Lightning's and Accelerate's finders double (or halve) a batch size by trial, running out
of memory on purpose; this one asks the estimator (fake tensors, no memory) for the answer
and runs real steps only to confirm it: on a CUDA device, or on the CPU under a simulated
budget (:func:`memfit.simulate_budget`), after checking that the machine can hold them.
"""

from __future__ import annotations

import torch

from memfit.budget import simulate_budget
from memfit.checks import positive_int
from memfit.config import Config
from memfit.device import default_device
from memfit.errors import UsageError
from memfit.host import check_fits
from memfit.planner import PlanError, resolve_budget
from memfit.searcher import Searcher
from memfit.step import run_steps
from memfit.strategies import Recipe
from memfit.units import format_budget
from memfit.workload import Workload, build_model

__all__ = ["find_batch_size"]


def find_batch_size(
    workload: Workload,
    budget: int | str | None = None,
    device: str | None = None,
    *,
    precision: str = "32-true",
    limit: int = 4096,
) -> int:
    """The largest micro-batch that fits: predicted by the estimator, verified by real steps.

    On CPU give ``budget``: the verifying steps run under ``simulate_budget(budget)``.
    On CUDA the default budget is the free memory. Two steps verify it (the second is the
    steady state, with the optimizer's state alive), one where the estimate's steady state
    needs no more than its first step. If the verification runs out of memory, the size backs
    off and is verified again.
    """
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
    positive_int(limit, "limit", hint="the largest micro-batch to try", noun="whole number")
    budget_bytes = resolve_budget(budget if budget is not None else "auto", device)
    target = "cuda" if device == "cuda" else "cpu"
    searcher = Searcher(workload, target)
    m = searcher.largest_micro_batch(Config(micro_batch=1, precision=precision), budget_bytes, limit)
    # The real steps verify the steady state: a second step only where the estimate says it needs
    # more than the first (an optimizer's state exists from its start).
    est = searcher.estimate(Config(micro_batch=m, precision=precision)) if m > 0 else None
    steps = 2 if est is None or est.phases["steady"]["step"] > est.phases["first"]["step"] else 1
    if device == "cpu" and m > 0:
        # The verification runs real steps: on the CPU they take real memory, as much as the estimate says.
        check_fits(est.required,
                   f"verifying micro-batch {m} with real steps under the simulated budget of "
                   f"{format_budget(budget_bytes)}",
                   "give a budget this machine can hold, or use memfit.plan() (estimates only, no real steps)")
    while m > 0:
        config = Config(micro_batch=m, precision=precision)
        recipe = Recipe(config, target)
        model = recipe.apply(build_model(workload).to(device))
        optimizer = recipe.build_optimizer(workload.optimizer, model)
        try:
            if device == "cpu":
                with simulate_budget(budget_bytes, model, optimizer) as sim:
                    run_steps(workload, model, optimizer, m, steps, tracker=sim, device=device, recipe=recipe)
            else:
                run_steps(workload, model, optimizer, m, steps, device=device, recipe=recipe)
            return m
        except torch.OutOfMemoryError:
            m = max(m - max(1, m // 10), 0)  # back off 10% and verify again
        finally:
            del model, optimizer
            if device == "cuda":
                torch.cuda.empty_cache()  # the cache goes back: to the retry, or to the caller's own model
    raise PlanError(f"not even a micro-batch of 1 fits in {format_budget(budget_bytes)}", floor=0, budget=budget_bytes)
