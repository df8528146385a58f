"""The sharding strategy's choices and refusals that need no process group (training runs in test_distributed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dist_worker
from memfit import Config, Trainer
from memfit.engine.comm import LocalComm, make_comm
from memfit.errors import UsageError
from memfit.sharding import shard_units


def test_fsdp_shards_each_repeated_block_and_refuses_a_model_without_them_saying_what_it_would_shard():
    assert shard_units(dist_worker.TinyLM()) == ["blocks.0", "blocks.1", "blocks.2"]
    flat = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(UsageError, match=r"Sequential has none .* only the root would be sharded, all 58 parameters "
                                         r"gathered at once .* use strategy 'ddp'"):
        shard_units(flat)


def test_a_distributed_strategy_without_a_process_group_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match=r"strategy 'ddp' needs a process group: launch with `torchrun"):
        make_comm("ddp", 60.0)
    assert isinstance(make_comm("single", 60.0), LocalComm)


def test_from_parts_refuses_fsdp_whose_sharded_parameters_the_built_optimizer_would_not_hold():
    model = dist_worker.TinyLM()
    with pytest.raises(UsageError, match=r"from_parts cannot shard with strategy 'fsdp'"):
        Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), dist_worker.mean_loss,
                           Config(micro_batch=2, strategy="fsdp"))


@pytest.mark.parametrize("timeout", [0, -1.0, True, "60"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(timeout):
    model = dist_worker.TinyLM()
    with pytest.raises(UsageError, match=r"timeout must be a positive number of seconds"):
        Trainer.from_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), dist_worker.mean_loss,
                           Config(micro_batch=2), timeout=timeout)


def test_strategy_single_on_one_rank_of_several_is_refused():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=1, world_size=4, store=FakeStore())
    try:
        with pytest.raises(UsageError, match=r"rank 1 of 4 but the config's strategy is 'single'"):
            make_comm("single", 60.0)
    finally:
        dist.destroy_process_group()
