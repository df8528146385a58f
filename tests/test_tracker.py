"""MemoryTracker: exact byte counts on toy models, roles, modules, fake and real agreement."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

import memfit
from memfit import CATEGORIES, MemfitError, track
from memfit.step import run_steps
from memfit.workload import step_loss

F32 = 4


def linear_bytes(i, o):
    return (i * o + o) * F32


def test_categories_are_exactly_these():
    assert CATEGORIES == ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs",
                          "temporaries")


def test_linear_weight_bias_gradient_and_input_bytes_are_exact():
    model = nn.Linear(16, 8)
    with track(model) as t:
        x = torch.randn(4, 16)
        model(x).sum().backward()
    r = t.report()
    assert set(r.at_peak) == set(CATEGORIES)
    assert r.peak_by_category["parameters"] == linear_bytes(16, 8) == 544
    assert r.peak_by_category["gradients"] == 544
    assert r.peak_by_category["inputs"] == 4 * 16 * F32
    assert r.peak_by_category["buffers"] == 0
    assert r.peak == sum(r.at_peak.values())
    # x and the grads are alive at the end; the output and the loss are not.
    assert r.at_end == {**dict.fromkeys(CATEGORIES, 0), "parameters": 544, "gradients": 544, "inputs": 256}


def _one_step(model, optimizer, x):
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_adam_has_two_states_per_parameter_plus_step_tensors():
    model = nn.Linear(16, 8)
    optimizer = torch.optim.Adam(model.parameters())
    with track(model, optimizer) as t:
        _one_step(model, optimizer, torch.randn(4, 16))
    r = t.report()
    # exp_avg and exp_avg_sq per parameter, plus one float32 "step" scalar per parameter.
    assert r.at_end["optimizer_state"] == 2 * 544 + 2 * F32
    assert r.at_end["gradients"] == 0  # zero_grad(set_to_none=True) freed them
    assert r.steps == 1


def test_sgd_momentum_buffers():
    model = nn.Linear(16, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with track(model, optimizer) as t:
        _one_step(model, optimizer, torch.randn(4, 16))
        _one_step(model, optimizer, torch.randn(4, 16))
    r = t.report()
    assert r.at_end["optimizer_state"] == 544
    assert r.peak_by_category["optimizer_state"] == 544
    assert r.steps == 2


def test_plain_sgd_has_no_state():
    model = nn.Linear(16, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with track(model, optimizer) as t:
        _one_step(model, optimizer, torch.randn(4, 16))
    assert t.report().peak_by_category["optimizer_state"] == 0


def test_buffers_count_as_buffers():
    model = nn.BatchNorm1d(10)
    with track(model) as t:
        model(torch.randn(4, 10))
    # running_mean, running_var (10 floats each) and num_batches_tracked (one int64).
    assert t.report().at_end["buffers"] == 2 * 10 * F32 + 8


def test_views_and_in_place_ops_are_not_double_counted():
    with track(device="cpu") as t:
        x = torch.zeros(1000)
        v = x[10:]
        x.add_(1)
        v.mul_(2)
        y = x.view(10, 100)
        z = y.t()
        assert t.live_bytes() == 4000
    assert t.report().peak == 4000
    del v, y, z, x


def test_slices_of_a_batch_made_before_tracking_allocate_nothing():
    # The Trainer slices micro-batches out of a batch built outside the tracker: a view or an
    # in-place op on such a tensor shares its storage, which was allocated before tracking began.
    batch = torch.randn(100, 10)
    with track(device="cpu") as t:
        micro = batch[20:30]
        flat = micro.flatten()
        micro.mul_(1.0)
        assert t.live_bytes() == 0
        doubled = micro * 2  # a new 10 x 10 float32 storage
        assert t.live_bytes() == 400
    assert t.report().peak == 400
    del micro, flat, doubled


def test_a_tensor_freed_mid_step_leaves_the_count_at_once():
    with track(device="cpu") as t:
        a = torch.zeros(1000)
        b = torch.zeros(2000)
        assert t.live_bytes() == 12000
        del a
        assert t.live_bytes() == 8000
        c = torch.zeros(500)
        assert t.live_bytes() == 10000
    r = t.report()
    assert r.peak == 12000
    assert [e.total for e in r.timeline] == [4000, 12000, 10000]
    del b, c


def test_a_storage_kept_by_a_view_stays_counted():
    with track(device="cpu") as t:
        a = torch.zeros(1000)
        view = a[:10]
        del a
        assert t.live_bytes() == 4000
        del view
        assert t.live_bytes() == 0


def test_tensor_resize_is_seen():
    with track(device="cpu") as t:
        a = torch.zeros(10)
        a.resize_(1000)
        assert t.live_bytes() == 4000
    assert t.report().peak == 4000


def test_storage_resize_frees_and_reallocates_as_fsdp2_does():
    # FSDP2 frees an unsharded parameter with storage.resize_(0) and brings it back with
    # storage.resize_(nbytes) (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, free_storage).
    with track(device="cpu") as t:
        a = torch.zeros(100)
        storage = a.untyped_storage()
        storage.resize_(0)
        assert t.live_bytes() == 0
        storage.resize_(1000)
        assert t.live_bytes() == 1000
        b = torch.zeros(25)  # 100 bytes on top of the regrown storage
    r = t.report()
    assert r.peak == 1100 and r.at_end["temporaries"] == 1100
    assert [delta for _, _, delta in t.allocation_events()] == [400, -400, 1000, 100]
    del a, b


def test_storage_resize_of_a_storage_made_before_entry_counts_it_whole():
    a = torch.zeros(10)
    storage = a.untyped_storage()
    storage.resize_(0)
    with track(device="cpu") as t:
        storage.resize_(2000)
        assert t.live_bytes() == 2000
        storage.resize_(0)
        assert t.live_bytes() == 0
    assert t.report().peak == 2000


def test_storage_resize_on_fake_tensors_is_counted():
    with FakeTensorMode():
        with track(device="cpu") as t:
            a = torch.empty(256)
            a.untyped_storage().resize_(0)
            freed = t.live_bytes()
            a.untyped_storage().resize_(2048)
    assert freed == 0 and t.report().peak == 2048 and t.report().fake


def test_storage_resize_past_a_simulated_budget_raises_before_resizing():
    with memfit.simulate_budget(4096, device="cpu") as sim:
        a = torch.zeros(512)  # 2 KiB
        storage = a.untyped_storage()
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 3.00 KiB"):
            storage.resize_(5120)
        assert storage.nbytes() == 2048 and sim.live_bytes() == 2048
        storage.resize_(4096)  # exactly the budget fits
        assert sim.live_bytes() == 4096


def test_storage_resize_is_unwrapped_on_exit_even_after_an_error():
    original = torch.UntypedStorage.resize_
    with pytest.raises(RuntimeError, match="boom"):
        with track(device="cpu"):
            assert torch.UntypedStorage.resize_ is not original
            raise RuntimeError("boom")
    assert torch.UntypedStorage.resize_ is original


def test_added_categories_take_their_place_by_strength():
    model = nn.Linear(4, 4, bias=False)
    tracker = track(model)
    tracker.add_category("all_gather_buffers", strength=5)  # between activations (10) and temporaries (0)
    assert tracker.categories == (*CATEGORIES, "all_gather_buffers")
    with tracker:
        x = torch.randn(2, 4, requires_grad=True)
        buf = torch.empty(64)  # a temporary, until marked
        tracker.mark(buf, "all_gather_buffers")
        y = model(x).exp()  # exp saves its output: an activation, stronger than the new role
        tracker.mark(y, "all_gather_buffers")
        tracker.mark(model.weight, "all_gather_buffers")  # parameters stay parameters
        assert tracker.live_by_category()["all_gather_buffers"] == 256
    r = tracker.report()
    assert list(r.at_peak) == [*CATEGORIES, "all_gather_buffers"]
    assert r.peak_by_category["all_gather_buffers"] == 256
    assert r.peak_by_category["parameters"] == 64 and r.at_end["activations"] == 32
    assert "all_gather_buffers" in r.table()
    assert memfit.MemoryReport.from_dict(r.to_dict()) == r


def test_bad_categories_are_refused_with_the_valid_ones():
    tracker = track(device="cpu")
    with pytest.raises(MemfitError, match="exists already; the categories are: parameters"):
        tracker.add_category("gradients", strength=1)
    with pytest.raises(MemfitError, match="lowercase identifier"):
        tracker.add_category("all gather", strength=1)
    with pytest.raises(MemfitError, match="strength is a number"):
        tracker.add_category("shards", strength="high")
    tracker.add_category("shards", strength=55)
    with pytest.raises(MemfitError, match="unknown category 'shard'; .*temporaries, shards"):
        tracker.mark(torch.zeros(1), "shard")


def test_saved_tensors_are_activations_and_the_rest_temporaries():
    x = torch.randn(1000, requires_grad=True)
    with track(device="cpu") as t:
        y = x.exp()  # exp saves its output for backward
        z = y * 2  # multiplying by a Python number saves nothing
        assert t.live_by_category()["activations"] == 4000
        assert t.live_by_category()["temporaries"] == 4000
    del y, z


def test_checkpoint_recomputation_counts_as_activations_in_backward():
    x = torch.randn(1000, requires_grad=True)

    def f(v):
        return torch.exp(torch.exp(v))

    with track(device="cpu") as t:
        y = checkpoint(f, x, use_reentrant=False)
        assert t.live_by_category()["activations"] == 0  # nothing saved in forward
        y.sum().backward()
    r = t.report()
    forward = [e for e in r.timeline if e.phase == "forward"]
    backward = [e for e in r.timeline if e.phase == "backward"]
    assert max(e.live["activations"] for e in forward) == 0
    # Both recomputed exp outputs are saved for the backward of the checkpointed region.
    assert max(e.live["activations"] for e in backward) == 2 * 4000


def test_checkpointing_a_block_lowers_forward_activations():
    def run(use_checkpoint):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
        x = torch.randn(32, 64)
        with track(model) as t:
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            out.sum().backward()
        return t.report()

    plain, ckpt = run(False), run(True)
    forward_act = lambda r: max(e.live["activations"] for e in r.timeline if e.phase == "forward")  # noqa: E731
    assert forward_act(ckpt) < forward_act(plain)
    assert ckpt.peak_by_category["gradients"] == plain.peak_by_category["gradients"]


def test_forward_allocations_are_attributed_to_modules_inclusively():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with track(model) as t, torch.no_grad():
        model(torch.randn(8, 16))
    r = t.report()
    assert r.by_module["0"] == 8 * 32 * F32
    assert r.by_module["1"] == 8 * 32 * F32
    assert r.by_module["2"] == 8 * 4 * F32
    # The root includes its children; at most layer 0's and layer 1's outputs are alive together.
    assert r.by_module[""] == 2 * 8 * 32 * F32


def test_backward_ops_are_attributed_to_the_module_whose_backward_runs():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with track(model) as t:
        model(torch.randn(8, 16)).sum().backward()
    r = t.report()
    backward_modules = {e.module for e in r.timeline if e.phase == "backward"}
    assert {"0", "1", "2"} <= backward_modules
    # Layer 0's weight gradient is allocated in layer 0's backward.
    assert r.by_module["0"] >= linear_bytes(16, 32)


def test_phases_and_steps_in_the_timeline():
    model = nn.Linear(16, 8)
    optimizer = torch.optim.Adam(model.parameters())
    with track(model, optimizer) as t:
        for _ in range(3):
            _one_step(model, optimizer, torch.randn(4, 16))
    r = t.report()
    assert {e.phase for e in r.timeline} == {"forward", "backward", "optimizer"}
    assert [e.step for e in r.timeline] == sorted(e.step for e in r.timeline)
    assert r.timeline[-1].step == 2
    assert r.peak_by_phase["optimizer"] > 0
    assert r.peak == max(r.peak_by_phase.values())


def _step(workload, model, optimizer, n, tracker=None):
    batch = workload.batch(n)
    if tracker is not None:
        tracker.mark_inputs(batch)
    step_loss(workload.loss(model, batch)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_many_steps_and_repeated_entries_reach_a_steady_state():
    workload = memfit.presets.load("cifar-cnn")
    model = workload.model()
    optimizer = workload.optimizer(model.parameters())
    tracker = track(model, optimizer)
    for _ in range(4):  # torch's MemTracker refuses a second iteration without a reset
        with tracker:
            _step(workload, model, optimizer, 8, tracker)
    r = tracker.report()
    assert r.steps == 4
    per_step = [max(e.total for e in r.timeline if e.step == s) for s in range(4)]
    assert per_step[1] == per_step[2] == per_step[3]
    assert per_step[0] <= per_step[1]  # momentum buffers appear during the first step


def test_the_same_step_measured_twice_gives_the_same_peak():
    workload = memfit.presets.load("gpt2-tiny")
    assert memfit.measure(workload, 4).peak == memfit.measure(workload, 4).peak


def _memtracker_peak(workload, n, steps=2):
    from torch.distributed._tools.mem_tracker import MemTracker

    model = workload.model()
    optimizer = workload.optimizer(model.parameters())
    mt = MemTracker()
    mt.track_external(model, optimizer)
    with mt:
        for _ in range(steps):
            mt.reset_mod_stats()
            _step(workload, model, optimizer, n)
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("name", ["cifar-cnn", "gpt2-tiny"])  # the presets small enough to run for real
def test_peak_agrees_with_torch_memtracker(name):
    workload = memfit.presets.load(name)
    ours = memfit.measure(workload, 8).peak
    theirs = _memtracker_peak(workload, 8)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def _fake_report(workload, n, steps=2):
    with FakeTensorMode():
        model = workload.model()
        optimizer = workload.optimizer(model.parameters())
        with track(model, optimizer) as tracker:
            run_steps(workload, model, optimizer, n, steps, tracker=tracker)
    return tracker.report()


@pytest.mark.parametrize("name", ["cifar-cnn", "gpt2-tiny"])  # the presets small enough to run for real
def test_fake_tensor_tracking_equals_real_tracking_byte_for_byte(name):
    workload = memfit.presets.load(name)
    real = memfit.measure(workload, 8)
    fake = _fake_report(workload, 8)
    assert fake.fake and not real.fake
    assert fake.peak == real.peak
    assert fake.at_peak == real.at_peak
    assert fake.peak_by_category == real.peak_by_category
    assert fake.by_module == real.by_module
    if name == "cifar-cnn":
        assert [(e.op, e.module, e.live) for e in fake.timeline] == [(e.op, e.module, e.live) for e in real.timeline]
    # transformers builds GPT-2's attention mask on a data-dependent path for real tensors
    # and a shape-only one for fake ones: the ops differ there, the bytes do not.


def test_entering_an_active_tracker_again_is_an_error():
    tracker = track(device="cpu")
    with tracker:
        with pytest.raises(MemfitError, match="already entered"):
            tracker.__enter__()


def test_bad_arguments():
    with pytest.raises(MemfitError, match="torch.nn.Module"):
        track(model="gpt2")
    with pytest.raises(MemfitError, match="Optimizer"):
        track(optimizer=[1, 2])


def test_tracker_leaves_no_hooks_or_modes_behind():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = nn.Linear(4, 4)
    with track(model):
        model(torch.randn(2, 4))
    assert _get_current_dispatch_mode() is None
    assert not model._forward_hooks and not model._forward_pre_hooks
    # Saved tensors are stored as usual again (no memfit pack hook).
    x = torch.randn(3, requires_grad=True)
    assert x.exp().grad_fn._saved_result is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_matches_max_memory_allocated():
    workload = memfit.presets.load("gpt2-tiny")
    # cuBLAS takes its workspace from the caching allocator at the first matmul and
    # keeps it; take it before the baseline, as it is not a tensor memfit counts.
    ones = torch.ones(8, 8, device="cuda")
    (ones @ ones).sum().item()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    report = memfit.measure(workload, 8, device="cuda")
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated() - base
    assert abs(report.peak - real) <= 0.05 * real, (report.peak, real)


def test_forgetting_the_history_keeps_what_is_alive_and_starts_the_peak_over():
    model = torch.nn.Linear(256, 256)
    with track(model) as t:
        x = torch.randn(64, 256)
        out = model(x).relu()
        out.sum().backward()
        del out
        live = t.live_bytes()
        cats = t.live_by_category()
        t.forget_history()
        report = t.report()
        assert report.peak == live and report.at_peak == cats and report.timeline == () and report.by_module == {}
        assert report.at_end == cats and report.peak_index == -1 and report.peak_op is None
        model.weight.grad = None  # frees 256 KiB: the peak stays where the history now starts
        y = model(x[:4])  # a small step afterwards
        report = t.report()
        assert report.peak == live and report.peak_index == 0 and report.by_module["" ] > 0
        del y
    t.reset_peak()
    assert t.peak == t.live_bytes() < live


def test_reset_peak_starts_the_peak_from_the_live_bytes():
    with track(device="cpu") as t:
        a = torch.zeros(1000)
        b = torch.zeros(1000)
        del a
        t.reset_peak()
        assert t.peak == 4000
        c = torch.zeros(500)
        report = t.report()
        assert report.peak == 6000 and report.at_peak["temporaries"] == 6000
        assert report.timeline[report.peak_index].total == 6000
    del b, c
    with track(device="cpu") as t:
        a = torch.zeros(1000)
        t.reset_peak()  # nothing later goes higher: the peak is the moment of the reset
        del a
        report = t.report()
    assert report.peak == 4000 and report.at_peak["temporaries"] == 4000 and report.at_end["temporaries"] == 0
