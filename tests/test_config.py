"""Config: validated once, frozen, hashable."""

from __future__ import annotations

import dataclasses

import pytest

from memfit import Config


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
