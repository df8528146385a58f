"""CUDA's rules on fake CPU tensors (memfit.emulation): dropout's bool mask, CUDA's autocast policy, exact bytes."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import memfit
from memfit import UsageError, emulation, track
from memfit._torch_private import autocast_cpu_ops
from memfit.emulation import cuda_autocast_policy, cuda_emulation, dropout_as_cuda

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"


def _macro_entries(text: str, macro: str) -> set[str]:
    body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S).group(1)
    return {".".join(p.strip() for p in m.split(",")) for m in re.findall(r"_\(([^()]*)\)", body)}


@pytest.mark.skipif(not HEADER.exists(), reason="this torch ships no C++ headers")
def test_cuda_autocast_tables_are_the_installed_torchs():
    text = HEADER.read_text()
    assert set(emulation.CUDA_LOWER_PRECISION) == _macro_entries(text, "AT_FORALL_LOWER_PRECISION_FP")
    assert set(emulation.CUDA_FP32) == _macro_entries(text, "AT_FORALL_FP32")
    assert set(emulation.CUDA_FP32_SET_OPT_DTYPE) == _macro_entries(text, "AT_FORALL_FP32_SET_OPT_DTYPE")
    assert set(emulation.CUDA_PROMOTE) == _macro_entries(text, "AT_FORALL_PROMOTE")
    redispatch = re.search(r"#define AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE\(_\)(.*?)\n\n", text, re.S).group(1)
    assert set(emulation.CUDA_FP32_APPEND_DTYPE) == set(re.findall(r'"(norm\.\w+)"', redispatch))


def test_cpu_lower_precision_list_is_registered_on_cpu_autocast():
    assert set(emulation.CPU_LOWER_PRECISION) <= autocast_cpu_ops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _dropout_model():
    return nn.Sequential(nn.Linear(64, 64, bias=False), nn.Dropout(0.25), nn.Linear(64, 1, bias=False))


def _activations(emulate: bool) -> int:
    with FakeTensorMode():
        model = _dropout_model()
        with dropout_as_cuda() if emulate else memfit.emulation.contextlib.nullcontext():
            with track(model, device="cpu") as tracker:
                model(torch.randn(8, 64)).sum().backward()
    return tracker.report().peak_by_category["activations"]


def test_cuda_dropout_saves_a_bool_mask_where_cpu_saves_fp32_noise():
    # CUDA (native_dropout): the 1-byte mask and the output the next Linear saves: 8*64 + 8*64*4.
    assert _activations(emulate=True) == 512 + 2048
    # CPU (_dropout_impl): input * noise saves the fp32 noise (mul saves the other factor of each input that
    # needs a gradient, derivatives.yaml), and the next Linear saves the product: 3 bytes more per element.
    assert _activations(emulate=False) == 2048 + 2048


def test_estimate_for_cuda_counts_dropouts_bool_mask():
    workload = memfit.Workload(model=_dropout_model, batch=lambda n: (torch.randn(n, 64),),
                               loss=lambda m, b: m(b[0]).sum(), optimizer=None)
    cpu = memfit.estimate(workload, memfit.Config(micro_batch=8), device="cpu")
    cuda = memfit.estimate(workload, memfit.Config(micro_batch=8), device="cuda")
    assert cpu.report.peak_by_category["activations"] == 4096
    assert cuda.report.peak_by_category["activations"] == 2560  # every figure a multiple of CUDA's 512-byte block


def test_emulated_dropout_is_dropout_on_real_tensors():
    torch.manual_seed(0)
    x = torch.rand(4000) + 1.0
    with dropout_as_cuda(), _Ops() as ops:
        y = nn.functional.dropout(x, 0.25, training=True)
        same = nn.functional.dropout(x, 0.25, training=False)
        none = nn.functional.dropout(x, 1.0, training=True)
    assert "native_dropout.default" in ops.names
    kept = y != 0
    assert 0.7 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert same is x and torch.equal(none, torch.zeros_like(x))
    with dropout_as_cuda(), pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        torch.dropout(x, 1.5, True)
    with _Ops() as ops:  # outside the context, CPU's own path is back
        nn.functional.dropout(x, 0.25, training=True)
    assert "native_dropout.default" not in ops.names and "bernoulli_.float" in ops.names


def _softmax_step(dtype: torch.dtype, emulate: bool):
    with FakeTensorMode():
        model = nn.Linear(64, 64, bias=False)
        with cuda_autocast_policy() if emulate else memfit.emulation.contextlib.nullcontext():
            with track(model, device="cpu") as tracker:
                with torch.autocast("cpu", dtype=dtype):
                    probs = model(torch.randn(8, 64)).softmax(-1)
                probs.sum().backward()
    return probs.dtype, tracker.report()


def test_softmax_under_cuda_16_mixed_is_fp32_without_a_copy_of_its_input():
    dtype, report = _softmax_step(torch.float16, emulate=True)
    assert dtype == torch.float32
    forward = [e.op for e in report.timeline if e.phase == "forward"]
    assert "aten._softmax.default" in forward
    assert forward.count("aten._to_copy.default") == 2  # input and weight down to fp16; no fp32 copy of the logits
    # Saved for backward: the fp16 cast of the input (8*64*2; mm keeps its weight only for an input's
    # gradient, and the input needs none) and softmax's fp32 output (8*64*4).
    assert report.peak_by_category["activations"] == 1024 + 2048
    # CPU autocast keeps softmax in fp16: an fp16 output (8*64*2).
    dtype, report = _softmax_step(torch.float16, emulate=False)
    assert dtype == torch.float16 and report.peak_by_category["activations"] == 1024 + 1024


def test_softmax_under_cuda_bf16_mixed_converts_its_input_first():
    # SoftMax.cpp: only a half input takes the fused half_to_float path; bf16 is copied to fp32 first.
    dtype, report = _softmax_step(torch.bfloat16, emulate=True)
    assert dtype == torch.float32 and report.peak_by_category["activations"] == 1024 + 2048
    forward = [e for e in report.timeline if e.phase == "forward"]
    to_copies = [e for e in forward if e.op == "aten._to_copy.default"]
    assert len(to_copies) == 3  # input and weight down to bf16, the logits up to fp32


def test_cuda_policy_casts_as_cuda_and_leaves_cpu_autocast_as_it_was():
    x, target = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    w = torch.randn(8, 8, requires_grad=True)
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ w
        assert h.dtype == torch.bfloat16
        assert nn.functional.layer_norm(h, (8,)).dtype == torch.float32
        assert h.exp().dtype == torch.float32 and h.sum().dtype == torch.float32
        assert h.norm().dtype == torch.float32
        assert torch.addcmul(x, h, h).dtype == torch.float32  # promote to the widest
        # cross_entropy_loss has no CUDA autocast kernel: its log_softmax and nll_loss follow their own (fp32).
        assert nn.functional.cross_entropy(h, target).dtype == torch.float32
        with pytest.raises(UsageError, match="binary_cross_entropy_with_logits"):
            nn.functional.binary_cross_entropy(torch.sigmoid(h), torch.rand(4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ w
        assert h.softmax(-1).dtype == torch.bfloat16 and nn.functional.layer_norm(h, (8,)).dtype == torch.bfloat16
        nn.functional.binary_cross_entropy(torch.sigmoid(h).float(), torch.rand(4, 8))  # CPU autocast allows it


def test_cuda_emulation_combines_dropout_and_autocast():
    with FakeTensorMode(), cuda_emulation(), _Ops() as ops:
        x = torch.randn(4, 8)
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.functional.dropout(x.half(), 0.1).softmax(-1)
    assert out.dtype == torch.float32 and {"native_dropout.default", "_softmax.default"} <= set(ops.names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_dtypes_equal_cudas(dtype):
    def run(device):
        x = torch.randn(4, 8, device=device)
        w = torch.randn(8, 8, device=device, requires_grad=True)
        with torch.autocast(device, dtype=dtype):
            h = x @ w
            outs = [h, h.softmax(-1), torch.log_softmax(h, -1), nn.functional.layer_norm(h, (8,)), h.exp(), h.sum(),
                    torch.cat([h, x]), nn.functional.cross_entropy(h, torch.tensor([0, 1, 2, 3], device=device)),
                    torch.addcmul(x, h, h), h.norm(), nn.functional.gelu(h)]
        return [o.dtype for o in outs]

    with FakeTensorMode(), cuda_emulation():
        emulated = run("cpu")
    assert emulated == run("cuda")


def test_promote_casts_the_lower_precision_arguments_up_as_cuda_does():
    # promote (autocast_mode.h): every eligible argument goes to the widest dtype among them, by a cast
    # (a copy), where a plain addcmul would promote inside the kernel without one.
    x, h = torch.randn(4, 8), torch.randn(4, 8).to(torch.bfloat16)
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
        out = torch.addcmul(x, h, h)
    assert out.dtype == torch.float32 and ops.names.count("_to_copy.default") == 2
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
        torch.addcmul(x, h, h)
    assert "_to_copy.default" not in ops.names

