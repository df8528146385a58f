"""plan() and find_batch_size(): the plan fits, keeps the batch, and is the cheapest that fits."""

import dataclasses
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memfit
from memfit import Config, PlanError, UsageError, estimate, plan, simulate_budget
from memfit.cli import main
from memfit.cost import CostModel
from memfit.planner import Searcher, accumulation_steps, balanced_micro_batch
from memfit.strategies import Recipe
from memfit.step import run_steps
from memfit.workload import build_model
from zoo import ZOO


def test_a_balanced_micro_batch_keeps_the_number_of_micro_steps():
    assert balanced_micro_batch(256, 50) == 43 and accumulation_steps(256, 43) == (43,) * 5 + (41,)
    assert balanced_micro_batch(256, 64) == 64 and balanced_micro_batch(100, 100) == 100
    for batch in (1, 7, 64, 100, 257):
        for largest in range(1, batch + 1):
            m = balanced_micro_batch(batch, largest)
            assert m <= largest and len(accumulation_steps(batch, m)) == len(accumulation_steps(batch, largest))
            assert m == 1 or len(accumulation_steps(batch, m - 1)) > len(accumulation_steps(batch, largest))


def test_accumulation_sums_to_the_batch_for_awkward_sizes():
    assert accumulation_steps(100, 7) == (7,) * 14 + (2,)
    assert sum(accumulation_steps(100, 7)) == 100
    assert accumulation_steps(64, 64) == (64,)
    assert accumulation_steps(5, 8) == (5,)
    for batch, micro in itertools.product((1, 17, 100, 256), (1, 3, 7, 64)):
        assert sum(accumulation_steps(batch, micro)) == batch
        assert max(accumulation_steps(batch, micro)) <= micro


@pytest.fixture(scope="module")
def lm_plan():
    workload = ZOO["tied-lm"]()
    budget = estimate(workload, Config(micro_batch=12), device="cpu").required
    return workload, budget, plan(workload, budget, 100, device="cpu")


def test_the_plan_fits_for_real_and_the_next_micro_batch_would_not(lm_plan):
    workload, budget, p = lm_plan
    assert sum(p.accumulation) == 100 and p.required <= budget and p.headroom == budget - p.required
    config = p.config
    recipe = Recipe(config, "cpu")
    model = recipe.apply(build_model(workload))
    optimizer = workload.optimizer(model.parameters())
    with simulate_budget(budget, model, optimizer) as sim:  # raises if the plan does not fit
        # Every micro-step at the full micro-batch: at least what the plan's last, smaller one needs.
        run_steps(workload, model, optimizer, config.micro_batch, 2, tracker=sim, recipe=recipe,
                  accumulation=len(p.accumulation))
    largest = p.alternatives[0].largest
    assert len(accumulation_steps(100, largest)) == len(p.accumulation) and config.micro_batch <= largest
    # The largest micro-batch itself fits (not "nearly"), and the next one does not.
    at_largest = dataclasses.replace(config, micro_batch=largest)
    assert estimate(workload, at_largest, device="cpu", accumulation=2).required <= budget
    assert largest < 100
    bigger = dataclasses.replace(config, micro_batch=largest + 1)
    assert estimate(workload, bigger, device="cpu", accumulation=2).required > budget
    assert p.alternatives[0].config == p.config and p.alternatives[0].step_cost == p.step_cost
    assert p.reasons and all(isinstance(r, str) for r in p.reasons)
    json.dumps(p.to_dict())


def test_the_chosen_checkpoint_set_is_the_cheapest_of_all_subsets_that_fit():
    workload = memfit.Workload(
        model=lambda: ZOO["tied-lm"]().model().__class__(depth=3),
        batch=ZOO["tied-lm"]().batch,
        loss=ZOO["tied-lm"]().loss,
        optimizer=ZOO["tied-lm"]().optimizer,
    )
    batch = 32
    full = estimate(workload, Config(micro_batch=batch), device="cpu")
    ckpt = estimate(workload, Config(micro_batch=batch, checkpoint="all"), device="cpu")
    budget = (full.required + ckpt.required) // 2  # the whole batch fits only with some checkpointing
    chosen = plan(workload, budget, batch, device="cpu")
    searcher = Searcher(workload, "cpu", batch_size=batch)
    costs = CostModel(workload, device="cpu", m_half=chosen.extra["m_half"])
    blocks = [f"blocks.{i}" for i in range(3)]
    best = None
    for k in range(4):
        for subset in itertools.combinations(blocks, k):
            m = searcher.largest_micro_batch(Config(micro_batch=1, checkpoint=subset), budget, batch)
            if m:
                cost = costs.step_cost(Config(micro_batch=m, checkpoint=subset), batch)
                best = cost if best is None else min(best, cost)
    chosen_cost = costs.step_cost(chosen.config, batch)
    assert chosen_cost <= best * (1 + 1e-9)


def test_plan_error_states_the_floor_and_the_levers():
    workload = memfit.Workload(
        model=lambda: nn.Linear(1000, 1000),
        batch=lambda n: torch.randn(n, 1000),
        loss=lambda m, b: m(b).pow(2).mean(),
        optimizer=lambda p: torch.optim.Adam(p),
    )
    params = (1000 * 1000 + 1000) * 4
    with pytest.raises(PlanError) as info:
        plan(workload, "8MB", 16, device="cpu")
    error = info.value
    # fp32 weights + fp32 gradients + Adam's two moments and two 4-byte step counters.
    assert error.floor == params + params + 2 * params + 2 * 4
    assert error.budget == 8_000_000
    assert error.levers["sharding over 2 GPUs (FSDP)"] == error.floor - error.floor // 2
    assert error.levers["an optimizer with less state (SGD without momentum keeps none)"] == 2 * params + 8
    assert error.levers["precision bf16-true"] == error.floor // 2 - 4  # step counters stay fp32
    assert "nothing fits in 7.63 MiB" in str(error) and "Levers:" in str(error)


def test_plan_keeps_the_precision_unless_allowed(lm_plan):
    _, _, p = lm_plan
    assert {a.config.precision for a in p.alternatives} == {"32-true"}


def test_bad_plan_arguments():
    workload = ZOO["tied-lm"]()
    with pytest.raises(UsageError, match="batch_size must be a positive int"):
        plan(workload, "1GiB", 0, device="cpu")
    with pytest.raises(UsageError, match="precision 'fp8' is not one of"):
        plan(workload, "1GiB", 8, precisions=("fp8",), device="cpu")
    with pytest.raises(ValueError, match="bad byte quantity"):
        plan(workload, "lots", 8, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="budget 'auto' reads the free memory of a CUDA device"):
            plan(workload, "auto", 8, device="cuda")


def test_find_batch_size_on_cpu_fits_and_is_the_largest():
    workload = ZOO["tied-lm"]()
    budget = estimate(workload, Config(micro_batch=20), device="cpu").required
    found = memfit.find_batch_size(workload, budget=budget, device="cpu")
    assert found == 20
    assert memfit.measure(workload, found).peak <= budget
    assert estimate(workload, Config(micro_batch=found + 1), device="cpu").required > budget
    with pytest.raises(UsageError, match="needs budget="):
        memfit.find_batch_size(workload, device="cpu")


def test_plan_cli(capsys):
    code = main(["plan", "gpt2-tiny", "--budget", "620MiB", "-b", "24", "--seq-len", "32", "--precision", "32-true",
                 "bf16-mixed", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert sum(data["accumulation"]) == 24 and data["required"] <= data["budget"] == 620 * 2**20
    assert {a["config"]["precision"] for a in data["alternatives"]} <= {"32-true", "bf16-mixed"}
    code = main(["plan", "gpt2-tiny", "--budget", "1MiB", "-b", "64"])
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("memfit: error: nothing fits in 1.00 MiB") and err.count("\n") == 1
    code = main(["plan", "gpt2-tiny", "--budget", "big", "-b", "64"])
    out, err = capsys.readouterr()
    assert code == 2 and "bad byte quantity 'big'" in err


def test_calibration_fits_the_efficiency_curve_from_timed_steps(monkeypatch):
    # A clock that the step itself advances by c * (m + 3): the fit must find m_half = 3.
    from memfit import cost

    clock = {"now": 0.0}
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock["now"])
    base = ZOO["tied-lm"]()

    def timed_loss(model, batch):
        clock["now"] += 0.25 * (len(batch) + 3.0)
        return base.loss(model, batch)

    workload = dataclasses.replace(base, loss=timed_loss)
    assert cost.calibrate_efficiency(workload, device="cpu", sizes=(1, 4, 16), repeats=2) == pytest.approx(3.0)
    budget = estimate(base, Config(micro_batch=8), device="cpu").required
    calibrated = plan(workload, budget, 16, device="cpu", calibrate=True)
    assert calibrated.extra["m_half"] == pytest.approx(3.0) and sum(calibrated.accumulation) == 16
    # Time that does not grow with the micro-batch gives no curve to fit: the default is kept.
    flat = dataclasses.replace(base, loss=lambda m, b: (clock.__setitem__("now", clock["now"] + 1.0), base.loss(m, b))[1])
    assert cost.calibrate_efficiency(flat, device="cpu", sizes=(1, 2), repeats=1) == cost.DEFAULT_M_HALF

def _mlp_workload() -> memfit.Workload:
    return memfit.Workload(
        model=lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
        batch=lambda n: (torch.randn(n, 64), torch.randint(0, 10, (n,))),
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda p: torch.optim.Adam(p),
        name="mlp",
    )


_MLP_RANGE = {}


@settings(max_examples=12, deadline=None)
@given(st.floats(0.0, 1.0))
def test_for_any_budget_the_largest_micro_batch_fits_and_the_next_does_not(share):
    workload, batch = _mlp_workload(), 64
    if not _MLP_RANGE:
        _MLP_RANGE["lo"] = estimate(workload, Config(micro_batch=1), device="cpu", accumulation=2).required
        _MLP_RANGE["hi"] = estimate(workload, Config(micro_batch=batch), device="cpu").required
    budget = _MLP_RANGE["lo"] + int(share * (_MLP_RANGE["hi"] - _MLP_RANGE["lo"]))

    def required(m: int) -> int:  # accumulation (two micro-steps) below the batch, as the planner estimates
        return estimate(workload, Config(micro_batch=m), device="cpu", accumulation=2 if m < batch else 1).required

    p = plan(workload, budget, batch, device="cpu", allow_checkpoint=False)
    largest = p.alternatives[0].largest
    assert p.required <= budget and sum(p.accumulation) == batch
    assert required(largest) <= budget and required(p.config.micro_batch) == p.required
    assert largest == batch or required(largest + 1) > budget


def test_find_batch_size_refuses_what_it_cannot_run_here(monkeypatch):
    import memfit.host

    workload = ZOO["tied-lm"]()
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"find_batch_size\(device='cuda'\) runs real steps on a GPU"):
            memfit.find_batch_size(workload, "1GiB", device="cuda")
    monkeypatch.setattr(memfit.host, "available_memory", lambda: 64 << 20)  # a machine with 64 MiB free
    with pytest.raises(memfit.errors.NotEnoughMemory, match=r"verifying micro-batch \d+ with real steps under the "
                                                            r"simulated budget of 22\.35 GiB \(24\.00 GB\) needs"):
        memfit.find_batch_size(workload, "24GB", device="cpu", limit=100_000)


def test_find_batch_size_says_exactly_what_it_needs():
    workload = ZOO["tied-lm"]()
    cases = [
        (dict(workload=nn.Linear(2, 2), budget="1GiB", device="cpu"),
         "find_batch_size() takes a memfit.Workload, got Linear"),
        (dict(workload=workload, budget="1GiB", device="tpu"), "device must be 'cpu' or 'cuda', got 'tpu'"),
        (dict(workload=workload, device="cpu"),
         "find_batch_size on the CPU needs budget=... (the simulated device size, e.g. '2GiB')"),
        (dict(workload=workload, budget="1GiB", device="cpu", limit=0),
         "limit must be a positive whole number (the largest micro-batch to try), got 0"),
        (dict(workload=workload, budget="1GiB", device="cpu", limit=True),
         "limit must be a positive whole number (the largest micro-batch to try), got True"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(workload=workload, budget="1GiB", device="cuda"),
                      f"find_batch_size(device='cuda') runs real steps on a GPU, and torch {torch.__version__} sees "
                      "none here; use device='cpu' with a budget, or memfit.plan() (estimates only)"))
    for kwargs, message in cases:
        with pytest.raises(UsageError) as info:
            memfit.find_batch_size(**kwargs)
        assert str(info.value) == message
    budget = estimate(workload, Config(micro_batch=3, precision="bf16-true"), device="cpu").required
    assert memfit.find_batch_size(workload, budget, "cpu", precision="bf16-true", limit=3) == 3
    assert memfit.find_batch_size(workload, budget, "cpu", precision="bf16-true", limit=2) == 2
    assert memfit.find_batch_size(workload, budget, precision="bf16-true", limit=1000) == 3  # the CPU by default here
    with pytest.raises(PlanError, match=r"not even a micro-batch of 1 fits in 1\.00 KiB"):
        memfit.find_batch_size(workload, 1024, "cpu")


def test_calibration_refuses_a_missing_gpu_and_takes_the_median_of_its_repeats(monkeypatch):
    from memfit import cost

    if not torch.cuda.is_available():
        with pytest.raises(UsageError) as info:
            cost.calibrate_efficiency(ZOO["tied-lm"](), device="cuda")
        assert str(info.value) == "calibrate on 'cuda' needs a CUDA device; none is available here"
    # Each size's first run (warm-up) is slow and one repeat is an outlier: the median ignores both.
    durations = {1: [9.0, 4.0, 4.0, 40.0, 4.0], 4: [9.0, 7.0, 70.0, 7.0, 7.0]}  # t = m + 3, m_half = 3
    clock = {"now": 0.0, "calls": 0}
    base = ZOO["tied-lm"]()

    def timed_loss(model, batch):
        clock["now"] += durations[len(batch)].pop(0)
        return base.loss(model, batch)

    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock["now"])
    workload = dataclasses.replace(base, loss=timed_loss)
    assert cost.calibrate_efficiency(workload, device="cpu", sizes=(1, 4), repeats=4) == pytest.approx(3.0)
    assert durations == {1: [], 4: []}  # a warm-up and four repeats each
    slow_start = {1: [1.0, 2.0], 4: [1.0, 1.0]}  # bigger is not slower: no curve, the default stays
    durations.update(slow_start)
    assert cost.calibrate_efficiency(workload, device="cpu", sizes=(1, 4), repeats=1) == cost.DEFAULT_M_HALF
    durations.update({1: [1.0, 1.0], 4: [1.0, 7.0]})  # t = 2m - 1: a negative intercept clamps m_half to 0
    assert cost.calibrate_efficiency(workload, device="cpu", sizes=(1, 4), repeats=1) == 0.0



def test_find_batch_size_when_only_one_sample_fits(monkeypatch):
    import memfit.host
    from memfit.units import format_bytes

    workload = ZOO["tied-lm"]()
    one = estimate(workload, Config(micro_batch=1, precision="bf16-true"), device="cpu").required
    assert estimate(workload, Config(micro_batch=2, precision="bf16-true"), device="cpu").required > one
    # The CPU by default here; the smallest limit there is; the answer confirmed by a real step.
    if not torch.cuda.is_available():
        assert memfit.find_batch_size(workload, one, precision="bf16-true") == 1
    assert memfit.find_batch_size(workload, one, "cpu", precision="bf16-true", limit=1) == 1
    # Even a micro-batch of 1 is checked against the machine's memory, at the precision asked for.
    monkeypatch.setattr(memfit.host, "available_memory", lambda: one - 1)
    with pytest.raises(memfit.errors.NotEnoughMemory) as info:
        memfit.find_batch_size(workload, one, "cpu", precision="bf16-true")
    assert str(info.value).startswith(f"verifying micro-batch 1 with real steps under the simulated budget of "
                                      f"{format_bytes(one)} needs {format_bytes(one)} of host memory")


def test_nothing_fits_gives_its_levers_as_fixes():
    from memfit.fixes import Fix

    workload = ZOO["tied-lm"]()
    with pytest.raises(PlanError) as info:
        plan(workload, "64KiB", 4, device="cpu")
    error = info.value
    assert error.levers == {fix.lever: fix.saves for fix in error.fixes}
    precision = error.fixes[0]  # the levers a Config expresses are measured by estimates; the rest is arithmetic
    assert precision == Fix("precision bf16-true", change=(("precision", "bf16-true"),), saves=precision.saves,
                            verified=True)
    configured = [f for f in error.fixes if f.change]
    assert all(f.verified for f in configured) and configured == list(error.fixes[:len(configured)])
    assert {f.lever for f in configured[1:]} == {"optimizer_in_backward=True"}  # fused saves nothing here: the
    # peak of this step is in backward, where a step in backward frees each gradient at once
    assert [f.verified or bool(f.change) for f in error.fixes[len(configured):]] == [False] * 5
    assert str(error).endswith("Levers: " + "; ".join(f"{f.lever} saves {memfit.format_bytes(f.saves)}"
                                                      for f in error.fixes))


def test_nothing_fits_names_the_optimizer_levers_verified_by_estimates():
    workload = memfit.presets.load("gpt2-tiny", seq_len=32)
    with pytest.raises(memfit.PlanError) as info:
        memfit.plan(workload, "550MiB", 8)
    fixes = {fix.lever: fix for fix in info.value.fixes}
    base = Config(micro_batch=1, precision="32-true")
    needed = memfit.estimate(workload, base, device="cuda").required
    for lever, change in (("optimizer_impl='fused'", {"optimizer_impl": "fused"}),
                          ("optimizer_in_backward=True", {"optimizer_in_backward": True})):
        other = memfit.estimate(workload, dataclasses.replace(base, **change), device="cuda").required
        assert fixes[lever].verified and fixes[lever].saves == needed - other > 0
        assert fixes[lever].config(base) == dataclasses.replace(base, **change)


class _Hetero(nn.Module):
    """Blocks that differ: the first costs many FLOPs for few kept bytes, the next two keep wide activations cheaply."""

    def __init__(self) -> None:
        super().__init__()
        dense = nn.Sequential(nn.Linear(32, 256), nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 32))
        wide = lambda: nn.Sequential(nn.Linear(32, 1024), nn.GELU(), nn.Tanh(), nn.GELU(), nn.Linear(1024, 32))  # noqa: E731
        self.blocks = nn.ModuleList([dense, wide(), wide(), nn.Sequential(nn.Linear(32, 32), nn.Tanh())])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_the_cheapest_checkpoint_set_of_blocks_that_differ_need_not_be_a_prefix():
    workload = memfit.Workload(model=_Hetero, batch=lambda n: (torch.randn(n, 32), torch.randint(0, 4, (n,))),
                               loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1), name="hetero")
    batch = 64
    # A budget where the first wide block, recomputed, lets micro-batches of 16 fit, and an efficiency
    # curve (m_half = 8 samples) under which fewer micro-steps pay for recomputing it.
    budget = estimate(workload, Config(micro_batch=16, checkpoint=("blocks.1",)), device="cpu", accumulation=2).required
    chosen = plan(workload, budget, batch, device="cpu", m_half=8.0)
    assert chosen.config.checkpoint == ("blocks.1",) and chosen.config.micro_batch == 16
    # Against every subset of the four blocks, each searched for its largest micro-batch.
    searcher = Searcher(workload, "cpu", batch_size=batch)
    costs = CostModel(workload, device="cpu", m_half=chosen.extra["m_half"])
    blocks = [f"blocks.{i}" for i in range(4)]
    best = min(
        (costs.step_cost(Config(micro_batch=m, checkpoint=subset), batch), subset)
        for k in range(5) for subset in itertools.combinations(blocks, k)
        if (m := searcher.largest_micro_batch(Config(micro_batch=1, checkpoint=subset), budget, batch))
    )
    assert best[1] == ("blocks.1",) and costs.step_cost(chosen.config, batch) == best[0]
    # The search over the first k blocks recomputes the dense block as well.
    prefixes = plan(workload, budget, batch, device="cpu", m_half=8.0, exhaustive=True)
    assert prefixes.config.checkpoint == ("blocks.0", "blocks.1") and prefixes.step_cost > chosen.step_cost


@pytest.mark.parametrize("name, budget_share", [("tied-lm", 0.3), ("block-cnn", 0.5), ("gpt2-tiny", 0.25)])
def test_the_confirmed_search_finds_the_exhaustive_plan(name, budget_share):
    workload = ZOO[name]()
    whole = estimate(workload, Config(micro_batch=64), device="cpu").required
    fast = plan(workload, int(whole * budget_share), 64, device="cpu", precisions=("32-true", "bf16-mixed"))
    slow = plan(workload, int(whole * budget_share), 64, device="cpu", precisions=("32-true", "bf16-mixed"),
                exhaustive=True)
    assert fast.config == slow.config and fast.required == slow.required and fast.step_cost == slow.step_cost
    assert fast.alternatives[0].largest == slow.alternatives[0].largest
    assert fast.extra["estimates"] < slow.extra["estimates"] or slow.extra["estimates"] <= 8


def test_find_batch_size_verifies_with_as_many_real_steps_as_the_steady_state_needs(monkeypatch):
    import memfit.batch_size as finder

    ran = []
    real = finder.run_steps
    monkeypatch.setattr(finder, "run_steps", lambda *a, **k: ran.append(a[4]) or real(*a, **k))
    stateless = memfit.Workload(model=lambda: nn.Linear(64, 64), batch=lambda n: (torch.randn(n, 64),),
                                loss=lambda m, b: m(b[0]).square().mean(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    adam = dataclasses.replace(stateless, optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    for workload, steps in ((stateless, 1), (adam, 2)):  # SGD keeps no state: its second step repeats the first
        ran.clear()
        memfit.find_batch_size(workload, budget="600KiB", device="cpu", limit=512)
        assert ran == [steps]
