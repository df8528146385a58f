"""Config: validated once, frozen, hashable."""

from __future__ import annotations

import dataclasses

import pytest

from memfit import Config
from memfit.errors import UsageError


def test_a_config_is_frozen_and_hashable():
    config = Config(micro_batch=4, checkpoint=["a.*"])
    assert config.checkpoint == ("a.*",)  # normalised once, when made
    assert {config: 1}[Config(micro_batch=4, checkpoint=("a.*",))] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.micro_batch = 8
    assert dataclasses.replace(config, micro_batch=8).micro_batch == 8 and config.micro_batch == 4


@pytest.mark.parametrize("name", ["fp8", "bf16-foo", "32", None])
def test_one_precision_check_for_configs_plans_and_strategies(name):
    from memfit import UsageError, plan, presets
    from memfit.strategies import Precision

    expected = (f"precision {name!r} is not one of 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true (Lightning's "
                "names: *-mixed keeps fp32 weights under autocast, *-true casts the model)")
    with pytest.raises(UsageError) as info:
        Config(micro_batch=1, precision=name)
    assert str(info.value) == "Config." + expected
    with pytest.raises(UsageError) as info:
        Precision(name)  # "bf16-foo" used to pass as a bf16 precision
    assert str(info.value) == expected
    with pytest.raises(UsageError) as info:
        plan(presets.load("cifar-cnn"), "1GiB", 4, precisions=[name], device="cpu")
    assert str(info.value) == expected


def test_a_strategy_outside_the_list_and_its_misplaced_options_are_refused_naming_the_valid_ones():
    with pytest.raises(UsageError, match=r"Config.strategy 'zero3' is not one of single, ddp, fsdp"):
        Config(micro_batch=1, strategy="zero3")
    with pytest.raises(UsageError, match=r"reshard_after_forward=False applies to strategy='fsdp' only"):
        Config(micro_batch=1, strategy="ddp", reshard_after_forward=False)
    with pytest.raises(UsageError, match=r"GradScaler's inf check sees only this rank's shard"):
        Config(micro_batch=1, strategy="fsdp", precision="16-mixed")
    with pytest.raises(UsageError, match=r"optimizer_in_backward runs on one process only; strategy='ddp'"):
        Config(micro_batch=1, strategy="ddp", optimizer_in_backward=True)
    with pytest.raises(UsageError, match=r"Config.reshard_after_forward must be True or False, got 'no'"):
        Config(micro_batch=1, strategy="fsdp", reshard_after_forward="no")
    assert Config(micro_batch=2, strategy="fsdp", reshard_after_forward=False).describe() == \
        "micro-batch 2, 32-true, fsdp (no reshard after forward)"


def test_rank_micro_batches_spread_a_short_rank_over_the_micro_steps_every_rank_runs():
    from memfit.config import rank_micro_batches

    assert rank_micro_batches(10, 4, 3) == (4, 4, 2)  # its own split has as many steps
    assert rank_micro_batches(10, 4, 4) == (3, 3, 2, 2)
    with pytest.raises(UsageError, match="this rank has 2 samples but every rank runs 3 micro-steps"):
        rank_micro_batches(2, 4, 3)
