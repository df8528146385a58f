"""CUDA's attention kernel choice on fake CPU tensors (memfit.cuda_attention): which kernel, and the bytes it keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memfit
from memfit import Config, estimate
from memfit.cuda_attention import cuda_kernel

B, S, E, H = 2, 64, 64, 4


def _qkv(dtype, head=16, heads=H, seq=S):
    return [torch.empty(B, heads, seq, head, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype, head, mask, causal_seqs, capability, kernel", [
    (torch.float16, 64, None, None, (8, 0), "flash"),
    (torch.bfloat16, 256, None, None, (9, 0), "flash"),
    (torch.float16, 64, None, None, (7, 0), "efficient"),  # V100: no flash kernel
    (torch.float32, 64, None, None, (9, 0), "efficient"),  # flash takes 16-bit inputs only
    (torch.float16, 64, torch.float16, None, (8, 0), "efficient"),  # a mask rules flash out
    (torch.float16, 64, None, (32, 64), (8, 0), "efficient"),  # causal, queries fewer than keys
    (torch.bfloat16, 64, None, None, (7, 5), "math"),  # bf16 needs 8.0 for both fused kernels
    (torch.float16, 260, None, None, (9, 0), "math"),  # over flash's 256, not a multiple of 8
    (torch.float32, 6, None, None, (9, 0), "math"),  # not a multiple of 4
    (torch.float16, 64, torch.bool, None, (7, 0), "efficient"),  # a boolean mask is made a float one first
    (torch.float32, 64, None, None, (3, 7), "math"),
])
def test_the_kernel_cuda_picks_follows_sdp_utils(dtype, head, mask, causal_seqs, capability, kernel):
    q, k, v = _qkv(dtype, head)
    is_causal = causal_seqs is not None
    if is_causal:
        q = torch.empty(B, H, causal_seqs[0], head, dtype=dtype)
    attn_mask = torch.zeros(S, S, dtype=mask) if mask is not None else None
    assert cuda_kernel(q, k, v, attn_mask, is_causal, capability) == kernel


class _TorchMHA(nn.Module):
    # nn.MultiheadAttention lays q out (seq, batch, heads, dim) and permutes the output back.
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _HFStyle(nn.Module):
    # transformers' layout: q is (batch, seq, heads, dim) transposed; the output is transposed back.
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        q, k, v = (t.view(B, S, H, E // H).transpose(1, 2) for t in self.qkv(x).split(E, dim=-1))
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).contiguous().view(B, S, E))


class _HFStyleMasked(_HFStyle):
    def forward(self, x):
        q, k, v = (t.view(B, S, H, E // H).transpose(1, 2) for t in self.qkv(x).split(E, dim=-1))
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).contiguous().view(B, S, E))


@pytest.mark.parametrize("model, precision, card, extra", [
    # The memory-efficient kernel writes (B, S, H, d): MultiheadAttention's permute-and-contiguous
    # copies it (B*S*E elements) and out_proj keeps the copy.
    (_TorchMHA, "32-true", "h100", B * S * E * 4),
    (_TorchMHA, "16-true", "v100", B * S * E * 2),
    # Flash writes as the query is laid out, as the CPU kernel does: no copy.
    (_TorchMHA, "bf16-true", "a100-40gb", 0),
    # transformers' layout is the memory-efficient kernel's already: no copy either.
    (_HFStyle, "32-true", "h100", 0),
    (_HFStyle, "16-true", "v100", 0),
    # A boolean mask becomes a float one in the query's dtype before either device's kernel,
    # and both kernels keep it: nothing differs.
    (_HFStyleMasked, "32-true", "h100", 0),
])
def test_a_cuda_target_keeps_the_memory_efficient_kernels_layout(model, precision, card, extra):
    # Every tensor here is a multiple of 512 bytes and the log-sum-exp's 64 rows need no padding
    # to 32, so the CUDA target differs from the CPU one by the copy alone.
    workload = memfit.Workload(model=model, batch=lambda n: (torch.randn(n, S, E),),
                               loss=lambda m, b: m(b[0]).square().mean(), optimizer=None)
    config = Config(micro_batch=B, precision=precision)
    cpu = estimate(workload, config, device="cpu", steps=1)
    cuda = estimate(workload, config, device="cuda", steps=1, profile=card)
    kept = [e.report.peak_by_category["activations"] for e in (cpu, cuda)]
    assert kept[1] - kept[0] == extra
