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


def test_ddp_holds_its_buckets_all_run_and_accumulates_in_them():
    sizes = [p.numel() * p.element_size() for p in dist_worker.model().parameters()]
    plain = memfit.estimate(dist_worker.workload(), _config("ddp"), world_size=2)
    assert plain.report.peak_by_category["ddp_buckets"] == sum(sizes)
    assert plain.report.timeline[0].live["ddp_buckets"] == sum(sizes)  # from before the first op
    # The Trainer defers DDP's reduction and accumulates in the buckets: a gradient exists apart from its
    # bucket only from autograd's making it to its copy into the bucket, one parameter at a time.
    accumulating = memfit.estimate(dist_worker.workload(), _config("ddp"), world_size=2, accumulation=2)
    assert accumulating.report.peak_by_category["ddp_buckets"] == sum(sizes)
    assert accumulating.report.peak_by_category["gradients"] <= max(sizes)
    single = memfit.estimate(dist_worker.workload(), _config("single"))
    assert plain.report.peak_by_category["parameters"] == single.report.peak_by_category["parameters"]


def test_bad_world_sizes_and_strategies_are_refused_with_the_fix():
    with pytest.raises(UsageError, match=r"world_size=2 needs a strategy that runs on several ranks"):
        memfit.estimate(dist_worker.workload(), _config("single"), world_size=2)
    for bad in (0, True, 1.5):
        with pytest.raises(UsageError, match=r"world_size must be a positive int"):
            memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=bad)
    # A world past any job's size: one clear line, not torch's TypeError from inside the fake process group.
    with pytest.raises(UsageError, match=r"world_size takes 1 to 1,048,576 ranks \(GPUs\), got 9,223,372,036,854,775,808"):
        memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=2**63)
    with pytest.raises(UsageError, match=r"world_size takes 1 to 1,048,576 ranks"):
        memfit.plan(dist_worker.workload(), budget="1GiB", batch_size=2**64, world_size=2**63)
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
    (["--gpus", "2", "--strategy", "ddp", "--sync-every-micro-step"], "--sync-every-micro-step is an FSDP setting"),
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


def test_communication_bytes_follow_ring_collectives_per_strategy():
    from memfit.cost import communication_bytes

    ring = 3 / 4
    assert communication_bytes(_config("single"), 1000, 4, 2) == 0
    assert communication_bytes(_config("ddp"), 1000, 4, 2) == 2 * ring * 1000 * 4  # one all-reduce per step
    assert communication_bytes(_config("ddp", precision="bf16-true"), 1000, 4, 2) == 2 * ring * 1000 * 2
    # FSDP: per micro-step an all-gather for forward and one for backward, one reduce-scatter per step.
    assert communication_bytes(_config("fsdp"), 1000, 4, 2) == ring * 1000 * (2 * 2 * 4 + 4)
    assert communication_bytes(_config("fsdp", reshard_after_forward=False), 1000, 4, 2) == ring * 1000 * (2 * 4 + 4)
    # bf16-mixed gathers bf16 parameters and reduces float32 gradients.
    assert communication_bytes(_config("fsdp", precision="bf16-mixed"), 1000, 4, 1) == ring * 1000 * (2 * 2 + 4)


class Wide(torch.nn.Module):
    """Model states outweigh activations: replicating them (DDP) costs what sharding (FSDP) saves."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_plan_over_ranks_splits_the_global_batch_and_picks_the_strategy_that_fits():
    workload = memfit.Workload(model=Wide, batch=lambda n: torch.randn(n, 256), loss=lambda m, b: m(b).pow(2).mean(),
                               optimizer=torch.optim.AdamW, name="wide")
    ddp = memfit.estimate(workload, _config("ddp"), world_size=4, device="cpu")
    fsdp = memfit.estimate(workload, memfit.Config(micro_batch=4, strategy="fsdp", reshard_after_forward=True),
                           world_size=4, device="cpu")
    assert fsdp.required < ddp.required
    plan = memfit.plan(workload, fsdp.required, 14, world_size=4, device="cpu", allow_checkpoint=False)
    assert plan.extra["rank_batches"] == [4, 4, 3, 3]
    assert plan.config.strategy == "fsdp" and plan.config.micro_batch == 4 and plan.accumulation == (4,)
    assert plan.required <= fsdp.required
    assert plan.reasons[0].startswith("the global batch of 14 over 4 ranks: 4 samples on ranks 0-1 and 3 on the others")
    again = memfit.estimate(workload, plan.config, world_size=4, device="cpu")
    assert again.required == plan.required
    roomy = memfit.plan(workload, "1GiB", 14, world_size=4, device="cpu", allow_checkpoint=False, strategies=("ddp",))
    assert roomy.config.strategy == "ddp" and "DDP (each rank holds the whole model" in roomy.reasons[0]


def test_plans_over_ranks_refuse_what_cannot_run():
    workload = dist_worker.workload()
    with pytest.raises(UsageError, match=r"a global batch of 3 cannot give each of 4 ranks a sample; give a batch "
                                         r"of at least 4, or fewer GPUs"):
        memfit.plan(workload, "1GiB", 3, world_size=4, device="cpu")
    with pytest.raises(UsageError, match=r"strategy 'single' runs one process, and world_size is 2"):
        memfit.plan(workload, "1GiB", 8, world_size=2, strategies=("single",), device="cpu")
    with pytest.raises(UsageError, match=r"a strategy 'zero' is not one of single, ddp, fsdp"):
        memfit.plan(workload, "1GiB", 8, world_size=2, strategies=("zero",), device="cpu")
    code = main(["plan", "gpt2-tiny", "-b", "3", "--gpus", "4", "--budget", "1GiB"])
    assert code == 2


@pytest.mark.parametrize("strategy,reshard,accumulation", [("fsdp", True, 1), ("fsdp", False, 2), ("ddp", True, 2)])
def test_later_steps_derived_from_the_first_equal_steps_that_run(strategy, reshard, accumulation):
    # FSDP2's gathered parameters are made in the first step and regrown by resizes in later ones: the
    # derivation repeats those resizes on the same storages. Every figure must equal running the steps.
    config = _config(strategy, reshard_after_forward=reshard)
    for device in ("cpu", "cuda"):
        derived, run = (memfit.estimate(dist_worker.workload(), config, steps=3, world_size=4, device=device,
                                        accumulation=accumulation, run_all_steps=flag) for flag in (False, True))
        assert (derived.peak, derived.at_peak, derived.phases, derived.by_module, derived.required) == \
            (run.peak, run.at_peak, run.phases, run.by_module, run.required)


def test_fsdp_chunks_made_on_demand_are_the_views_torch_chunk_makes():
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    from memfit._torch_private import _LazyChunks

    for shape in [(11, 6), (6,), (3, 4), (8, 2), (0, 5)]:
        t = torch.randn(shape)
        for n in (1, 2, 4, 7):
            real, lazy = _chunk_with_empty(t, n, 0), _LazyChunks(t, n, 0)
            assert len(lazy) == len(real) == n
            for i in (*range(n), -1):
                a, b = real[i], lazy[i]
                assert (a.shape, a.stride(), a.storage_offset(), a.numel() and a.untyped_storage().data_ptr()) == \
                    (b.shape, b.stride(), b.storage_offset(), b.numel() and b.untyped_storage().data_ptr()), (shape, n, i)


def test_fsdp_syncing_every_micro_step_keeps_only_sharded_gradients_and_reduces_each_time():
    from memfit.cost import communication_bytes

    last = memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=4, accumulation=2)
    every = memfit.estimate(dist_worker.workload(), _config("fsdp", sync_every_micro_step=True), world_size=4,
                            accumulation=2)
    # Without sync every unsharded gradient stays between micro-steps; with it they go as they are reduced.
    assert last.report.peak_by_category["gradients"] == sum(
        p.numel() * p.element_size() for p in dist_worker.model().parameters())
    assert every.report.peak_by_category["gradients"] < last.report.peak_by_category["gradients"]
    assert every.peak < last.peak
    assert communication_bytes(_config("fsdp", sync_every_micro_step=True), 1000, 4, 3) == 0.75 * 1000 * (6 * 4 + 3 * 4)
    assert "fsdp (sync every micro-step)" in _config("fsdp", sync_every_micro_step=True).describe()
    for strategy in ("single", "ddp"):
        with pytest.raises(UsageError, match=rf"sync_every_micro_step applies to strategy='fsdp' only .* "
                                             rf"not to strategy='{strategy}'"):
            _config(strategy, sync_every_micro_step=True)
    with pytest.raises(UsageError, match=r"sync_every_micro_step must be True or False, got 1"):
        _config("fsdp", sync_every_micro_step=1)


def test_a_per_rank_estimate_inside_a_process_group_is_refused_naming_the_fix():
    from memfit import _torch_private

    dist.init_process_group("fake", store=_torch_private.fake_store(), rank=0, world_size=2)
    try:
        with pytest.raises(UsageError, match=r"this process has one initialised already; estimate before "
                                             r"init_process_group \(or in another process\)"):
            memfit.estimate(dist_worker.workload(), _config("fsdp"), world_size=2)
    finally:
        dist.destroy_process_group()


def test_loading_a_sharded_save_checks_the_ranks_before_touching_anything(tmp_path):
    from types import SimpleNamespace

    from memfit import statefile
    from memfit.engine import sharded

    trainer = SimpleNamespace(rank=0, world_size=2)
    single = tmp_path / "one.pt"
    single.write_bytes(b"")
    with pytest.raises(UsageError, match=r"is not a save of this run's rank 0: a run on several ranks saves a "
                                         r"directory with a trainer-rank<r>.pt per rank"):
        sharded.load(trainer, single)
    saved = tmp_path / "run"
    saved.mkdir()
    statefile.write({"world_size": 4}, saved / "trainer-rank0.pt")
    with pytest.raises(UsageError, match=r"was saved by 4 ranks and this run has 2; resume with the same number"):
        sharded.load(trainer, saved)
