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
