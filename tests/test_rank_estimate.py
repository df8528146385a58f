"""Per-rank estimates on PyTorch's fake process group: FSDP2's shards, DDP's buckets, the bad inputs.

The estimate against a measured per-rank peak on real gloo ranks is in test_distributed.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

import dist_worker
import memfit
from memfit.cli import main
from memfit.errors import UsageError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _config(strategy: str, **kwargs) -> memfit.Config:
    return memfit.Config(micro_batch=4, strategy=strategy, **kwargs)


def _rank0_shard_bytes(world: int) -> int:
    """What FSDP2 keeps of each parameter on rank 0: dim 0 cut in ``world`` chunks (torch.chunk), the first one."""
    return sum(math.ceil(p.shape[0] / world) * p[0].numel() * p.element_size() for p in dist_worker.model().parameters())


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_keeps_one_shard_of_the_parameters_and_of_adams_state_per_rank(world):
    est = memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=world)
    own = est.report.peak_by_category
    shard = _rank0_shard_bytes(world)
    n_params = len(list(dist_worker.model().parameters()))
    assert own["parameters"] == shard
    assert own["optimizer_state"] == 2 * shard + 4 * n_params  # exp_avg, exp_avg_sq per shard; a float32 step each
    assert own["unsharded_parameters"] > 0 and own["communication"] > 0
    assert est.extra["world_size"] == world and est.extra["strategy"] == "fsdp"
    assert not dist.is_initialized()  # the fake process group is gone


def test_fsdp_shards_shrink_with_the_world_and_keeping_blocks_gathered_costs_memory():
    peaks = {world: memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=world).peak for world in (1, 2, 4)}
    assert peaks[1] > peaks[2] > peaks[4]
    kept = memfit.estimate(dist_worker.workload(), _config("fsdp", reshard_after_forward=False), world_size=4)
    # Every block stays gathered, each parameter as FSDP2's all-gather output holds it: 4 padded shards.
    assert kept.report.peak_by_category["unsharded_parameters"] == 4 * _rank0_shard_bytes(4)
    assert kept.peak > peaks[4]


def test_ddp_holds_its_buckets_all_run_and_accumulation_without_sync_holds_gradients_beside_them():
    params = sum(p.numel() * p.element_size() for p in dist_worker.model().parameters())
    plain = memfit.estimate(dist_worker.workload(), _config("ddp"), world_size=2)
    assert plain.report.peak_by_category["ddp_buckets"] == params
    assert plain.report.timeline[0].live["ddp_buckets"] == params  # from before the first op
    accumulating = memfit.estimate(dist_worker.workload(), _config("ddp"), world_size=2, accumulation=2)
    assert accumulating.report.peak_by_category["gradients"] == params
    assert accumulating.peak > plain.peak
    single = memfit.estimate(dist_worker.workload(), _config("single"))
    assert plain.report.peak_by_category["parameters"] == single.report.peak_by_category["parameters"]


def test_bad_world_sizes_and_strategies_are_refused_with_the_fix():
    with pytest.raises(UsageError, match=r"world_size=2 needs a strategy that runs on several ranks"):
        memfit.estimate(dist_worker.workload(), _config("single"), world_size=2)
    for bad in (0, True, 1.5):
        with pytest.raises(UsageError, match=r"world_size must be a positive int"):
            memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=bad)
    with pytest.raises(UsageError, match=r"has none \(no ModuleList or Sequential of blocks\): only the root would "
                                         r"be sharded, all 6,399 parameters"):
        memfit.estimate(memfit.Workload(model=lambda: torch.nn.Linear(80, 79), batch=lambda n: torch.randn(n, 80),
                                        loss=lambda m, b: m(b).sum(), optimizer=torch.optim.SGD),
                        _config("fsdp"), world_size=2)
    assert not dist.is_initialized()


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "--gpus takes a positive whole number, got '0'"),
    (["--gpus", "2", "--strategy", "single"], "--strategy single runs on one GPU, and --gpus is 2"),
    (["--gpus", "2", "--strategy", "ddp", "--no-reshard"], "--no-reshard is an FSDP setting"),
    (["--gpus", "2", "--strategy", "zero"], "invalid choice: 'zero'"),
])
def test_cli_refuses_bad_gpu_flags_in_one_line(capsys, argv, message):
    code = main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_estimates_one_rank_of_several_gpus(capsys):
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--gpus", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["strategy"] == "fsdp" and data["extra"]["world_size"] == 4  # fsdp by default on several
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--gpus", "4", "--strategy", "ddp"]) == 0
    assert "on cuda, one rank of 4: micro-batch 2, 32-true, ddp." in capsys.readouterr().out.replace("\n", " ")
