"""How the optimizer runs (memfit.optimizers) and when gradients are released: exact bytes, estimate = measure."""

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import Config, UsageError
from memfit.optimizers import OptimizerInBackward, set_implementation

P = 256 * 256 * 4  # bytes of the one fp32 weight below


def _workload(layers=1, width=256, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3)):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    return memfit.Workload(model=model, batch=lambda n: (torch.randn(n, width),),
                           loss=lambda m, b: m(b[0]).pow(2).mean(), optimizer=optimizer)


def _both(workload, **options):
    config = Config(micro_batch=4, **options)
    est = memfit.estimate(workload, config, device="cpu")
    measured = memfit.measure(workload, config=config, device="cpu")
    # The estimate follows the loop it models: phase by phase, as a real run.
    assert est.report.peak_by_phase == measured.peak_by_phase and est.peak == measured.peak
    return est.report


def test_adamw_implementations_hold_their_documented_temporaries():
    loop, foreach, fused = (_both(_workload(), optimizer_impl=impl) for impl in ("for-loop", "foreach", "fused"))
    # _single_tensor_adamw: sqrt and the division, two temporaries of the weight's size at once.
    assert loop.peak_by_category["temporaries"] == 2 * P
    # _multi_tensor_adamw: _foreach_sqrt over every exp_avg_sq, one copy of them all.
    assert foreach.peak_by_phase["optimizer"] == loop.peak_by_phase["optimizer"] - P
    # _fused_adamw_: nothing beyond the weights, gradients and state (exp_avg, exp_avg_sq, a 4-byte step).
    assert fused.peak_by_phase["optimizer"] == P + P + 2 * P + 4
    assert loop.peak_phase == "optimizer" and fused.peak_phase == "backward"


def test_default_implementation_is_pytorchs_choice_per_device():
    cpu = memfit.estimate(_workload(), Config(micro_batch=4), device="cpu").report
    cuda = memfit.estimate(_workload(), Config(micro_batch=4), device="cuda").report
    assert cpu.peak_by_category["temporaries"] == 2 * P  # the loop on CPU
    assert cuda.peak_by_category["temporaries"] == P  # foreach on CUDA


def test_gradients_alive_through_the_forward_unless_set_to_none_after_the_step():
    default = _both(_workload())
    zeros = _both(_workload(), zero_grad="zeros")
    after_forward = _both(_workload(), zero_grad="after-forward")
    assert zeros.peak_by_phase["forward"] == default.peak_by_phase["forward"] + P
    assert after_forward.peak_by_phase["forward"] == default.peak_by_phase["forward"] + P
    # Adding into a kept gradient goes through a temporary (AccumulateGrad's grad += new): one more P in backward.
    assert zeros.peak_by_phase["backward"] == default.peak_by_phase["backward"] + P
    assert after_forward.peak_by_phase["backward"] == default.peak_by_phase["backward"]


def test_optimizer_in_backward_holds_one_gradient_at_a_time():
    layer = 128 * 128 * 4
    default = _both(_workload(layers=4, width=128))
    in_backward = _both(_workload(layers=4, width=128), optimizer_in_backward=True)
    assert default.peak_by_category["gradients"] == 4 * layer
    assert in_backward.peak_by_category["gradients"] == layer
    assert in_backward.peak_by_category["optimizer_state"] == default.peak_by_category["optimizer_state"] \
        == 4 * (2 * layer + 4)
    assert in_backward.peak_by_phase["optimizer"] == 0 and in_backward.steps == 2


def test_optimizer_in_backward_is_the_same_update():
    workload = _workload(layers=3, width=16)
    model = workload.model()
    reference = copy.deepcopy(model)
    in_backward = OptimizerInBackward(model.parameters(), workload.optimizer)
    optimizer = workload.optimizer(reference.parameters())
    for _ in range(3):
        x = torch.randn(5, 16)
        workload.loss(model, (x,)).backward()
        assert all(p.grad is None for p in model.parameters())  # freed in backward
        in_backward.step()
        workload.loss(reference, (x,)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert len(in_backward.state) == 3 and all("exp_avg" in s for s in in_backward.state.values())
    in_backward.remove()
    workload.loss(model, (torch.randn(5, 16),)).backward()
    assert all(p.grad is not None for p in model.parameters())  # unhooked: gradients stay


def test_implementations_are_set_and_refused_where_missing():
    model = nn.Linear(2, 2)
    adamw = torch.optim.AdamW(model.parameters())
    set_implementation(adamw, "fused")
    assert adamw.param_groups[0]["fused"] is True and adamw.param_groups[0]["foreach"] is False
    set_implementation(adamw, "foreach")
    assert adamw.param_groups[0]["foreach"] is True and not adamw.param_groups[0]["fused"]
    with pytest.raises(UsageError, match="needs an optimizer with a fused implementation .* LBFGS has none"):
        set_implementation(torch.optim.LBFGS(model.parameters()), "fused")


def test_loop_options_are_checked_once_with_the_valid_ones():
    with pytest.raises(UsageError, match="Config.optimizer_impl 'apex' is not one of default, for-loop, foreach, fused"):
        Config(micro_batch=1, optimizer_impl="apex")
    with pytest.raises(UsageError, match="Config.zero_grad 'never' is not one of set-to-none, after-forward, zeros"):
        Config(micro_batch=1, zero_grad="never")
    with pytest.raises(UsageError, match="zero_grad='zeros' cannot keep them"):
        Config(micro_batch=1, optimizer_in_backward=True, zero_grad="zeros")
    with pytest.raises(UsageError, match="16-mixed: the GradScaler"):
        Config(micro_batch=1, optimizer_in_backward=True, precision="16-mixed")
    with pytest.raises(UsageError, match="cannot accumulate gradients over 3 micro-batches"):
        memfit.estimate(_workload(), Config(micro_batch=2, optimizer_in_backward=True), accumulation=3)
    assert Config(micro_batch=2, optimizer_impl="fused", zero_grad="zeros").describe() == \
        "micro-batch 2, 32-true, fused optimizer, zero_grad zeros"


def test_a_plan_keeps_the_loop_and_a_step_in_backward_takes_the_whole_batch():
    workload = _workload(layers=4, width=128)
    plan = memfit.plan(workload, "4MiB", 16, device="cpu", optimizer_impl="fused", zero_grad="zeros")
    assert plan.config.optimizer_impl == "fused" and plan.config.zero_grad == "zeros"
    whole = memfit.plan(workload, "64MiB", 16, device="cpu", optimizer_in_backward=True)
    assert whole.config.micro_batch == 16 and whole.accumulation == (16,)
    with pytest.raises(memfit.PlanError, match="whole batch of 4096 is one micro-batch"):
        memfit.plan(workload, "2MiB", 4096, device="cpu", optimizer_in_backward=True)


def test_adafactor_keeps_factored_second_moments_and_sgd_only_momentum():
    # torch.optim.Adafactor: a 2-D weight keeps a row and a column of second-moment
    # statistics (256 + 256 fp32) and a step, not a full-size moment as Adam does.
    ada = _both(_workload(optimizer=lambda ps: torch.optim.Adafactor(ps, lr=1e-2)))
    assert ada.peak_by_category["optimizer_state"] == 256 * 4 + 256 * 4 + 4
    momentum = _both(_workload(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))
    plain = _both(_workload(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)))
    assert momentum.peak_by_category["optimizer_state"] == P and plain.peak_by_category["optimizer_state"] == 0


def test_bitsandbytes_8bit_adamw_state_is_its_own_layout():
    bnb = pytest.importorskip("bitsandbytes")
    workload = memfit.Workload(
        model=lambda: nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 8)),
        batch=lambda n: (torch.randn(n, 256),), loss=lambda m, b: m(b[0]).pow(2).mean(),
        optimizer=lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))
    report = _both(workload)  # the quantization map is built from values: on fake tensors inside the optimizer context
    # bitsandbytes/optim/optimizer.py: tensors of >= 4096 elements (min_8bit_size) keep two uint8 states and,
    # blockwise, one fp32 absmax per 256 elements each, plus the two 256-entry fp32 quantization maps (shared);
    # smaller tensors keep fp32 states like Adam.
    big = 256 * 256
    eight_bit = 2 * big + 2 * (big // 256) * 4 + 2 * 256 * 4
    small = 2 * (256 * 8 + 8) * 4
    assert report.peak_by_category["optimizer_state"] == eight_bit + small == 151616
