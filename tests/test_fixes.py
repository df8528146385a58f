"""Fix: one lever, rendered the same way for an out-of-memory error and for a plan that finds nothing."""

from __future__ import annotations

from memfit import Config
from memfit.fixes import Fix


def test_a_fix_says_what_it_saves_or_why_it_helps():
    assert Fix("precision bf16-true", saves=1 << 20).describe() == "precision bf16-true saves 1.00 MiB"
    assert Fix("checkpoint='all'", "recomputes activations").describe() == "checkpoint='all' recomputes activations"
    assert Fix("checkpoint='all'", "recomputes activations", saves=1536, verified=True).describe() == (
        "checkpoint='all' recomputes activations (saves 1.50 KiB, estimated)")
    assert Fix("offloading", "moves state", saves=0).describe() == "offloading moves state (saves 0 B)"
    assert Fix("a larger budget or device").describe() == "a larger budget or device"


def test_a_fix_applies_its_change_to_a_config():
    base = Config(micro_batch=4)
    fix = Fix("precision 'bf16-mixed'", change=(("precision", "bf16-mixed"), ("checkpoint", ("all",))))
    assert fix.config(base) == Config(micro_batch=4, precision="bf16-mixed", checkpoint="all")
    assert Fix("an optimizer with less state").config(base) is None  # a lever outside the Config
    assert hash(fix) == hash(Fix("precision 'bf16-mixed'", change=fix.change))  # frozen records


def test_a_plan_error_made_with_levers_as_before_has_them_as_fixes():
    from memfit import PlanError

    error = PlanError("nothing fits", floor=10, budget=5, levers={"sharding over 2 GPUs (FSDP)": 5})
    assert error.fixes == (Fix("sharding over 2 GPUs (FSDP)", saves=5),)
    assert error.levers == {"sharding over 2 GPUs (FSDP)": 5}
