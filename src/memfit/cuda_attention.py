"""``scaled_dot_product_attention`` on fake CPU tensors as CUDA would run it: the kernel CUDA picks, what it keeps.

CUDA picks, in order (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, torch 2.13;
cuDNN's kernel is after the math one, so never picked by default):

* **flash**: fp16 or bf16 inputs, compute capability 8.0 or newer, no attention mask,
  the three head dims equal and at most 256, and a causal mask only on square
  attention. Its output is ``empty_like(q)`` (flash_api.cpp ``mha_fwd``): laid out as
  the query is, as the CPU flash kernel's is, so the CPU kernel's op stands for it.
* **memory-efficient**: fp32, fp16 or bf16 (bf16 from 8.0), capability 5.0 or newer,
  any mask, head dims divisible by 8 (16-bit) or 4 (fp32). Its output is
  allocated ``{B, M, num_heads, Kv}`` (attention.cu, ``_efficient_attention_forward``):
  laid out (batch, seq, heads, dim) whatever the query's layout. A caller that
  permutes it back (``nn.MultiheadAttention``'s ``attn_output.permute(2, 0, 1, 3)
  .contiguous()``) copies it, and the layer after keeps the copy; one that wants
  (batch, seq, heads, dim) (transformers' ``attn_output.transpose(1, 2).contiguous()``)
  copies nothing. Its log-sum-exp is fp32, (B, H, M rounded up to 32).
* **math** otherwise: the composite kernel, which keeps the seq x seq matrices, as
  the CPU's fallback does.

A boolean mask is first made a float mask in the query's dtype (0 where True, -inf where
False: ``convert_boolean_attn_mask``, attention.cpp), so it rules out flash only; the
memory-efficient kernel keeps the float mask for its backward.

On CPU, ``scaled_dot_product_attention`` takes its flash kernel where it can (output
laid out as the query), and the math kernel for dropout. :func:`fused_attention_emulation`
sends each call where CUDA's choice differs in memory: the memory-efficient kernel's
layout, and the fused kernels' dropout (CUDA keeps no seq x seq matrix).

Known limitations: grouped-query attention with unequal head counts, and 3-d or nested
inputs, run unchanged; the memory-efficient backward's scratch (its ``delta``, fp32
B x H x M) is not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memfit import _torch_private

__all__ = ["fused_attention_emulation", "cuda_kernel"]

_HALF = (torch.float16, torch.bfloat16)


def cuda_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, capability: tuple[int, int]) -> str:
    """``"flash"``, ``"efficient"`` or ``"math"``: the kernel CUDA runs for these inputs (see the module docstring)."""
    dtype, head, value_head = query.dtype, query.shape[-1], value.shape[-1]
    same_heads = head == key.shape[-1] == value_head
    square = query.shape[-2] == key.shape[-2]
    if (dtype in _HALF and capability >= (8, 0) and attn_mask is None and same_heads and head <= 256
            and (square or not is_causal)):
        return "flash"
    alignment = 8 if dtype in _HALF else 4
    if (capability >= (5, 0) and (dtype in (torch.float32, torch.float16) or (dtype == torch.bfloat16 and capability >= (8, 0)))
            and head == key.shape[-1] and head % alignment == 0 and value_head % alignment == 0):
        return "efficient"
    return "math"


class _EfficientAttention(torch.autograd.Function):
    """The memory-efficient kernel's memory: an output laid out (B, S, H, d), kept with q, k, v, a padded
    fp32 log-sum-exp and the mask. The values are the CPU flash kernel's (fake tensors carry none)."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale):
        with _torch_private.autocast_cpu_excluded():
            out = _torch_private.cpu_flash_attention(query, key, value, dropout_p, is_causal, attn_mask, scale)
            out = out.transpose(1, 2).contiguous()  # CUDA writes (B, S, H, d); a copy only if CPU's layout differs
            b, h, m = query.shape[0], query.shape[1], query.shape[2]
            lse = query.new_empty((b, h, -(-m // 32) * 32), dtype=torch.float32)
        ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
        ctx.save_for_backward(query, key, value, out, lse, attn_mask)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        grads = _torch_private.cpu_flash_attention_backward(
            grad, query, key, value, out.transpose(1, 2), lse[..., :query.shape[2]], ctx.dropout_p, ctx.is_causal,
            attn_mask, ctx.scale)
        return (*grads, None, None, None, None)


@contextlib.contextmanager
def fused_attention_emulation(capability: tuple[int, int] = (9, 0)) -> Iterator[None]:
    """On fake CPU tensors standing for a CUDA card of ``capability``, run attention as CUDA would.

    It swaps ``torch.nn.functional.scaled_dot_product_attention`` for the context's duration
    (models look it up at call time), over the whole step: a TorchFunctionMode would be off
    during backward, where ``torch.utils.checkpoint`` recomputes the forward and must take
    the same path. Autocast's cast (the op is on CUDA's lower-precision list) is applied
    first, as the kernel choice depends on the dtype.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.dim() == 4 and query.shape[-3] == key.shape[-3] and not query.is_nested:
            if torch.is_autocast_enabled("cpu"):
                dtype = torch.get_autocast_dtype("cpu")
                query, key, value, attn_mask = (  # autocast's cast: floating tensors other than double
                    t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.dtype not in (torch.float64, dtype) else t for t in (query, key, value, attn_mask))
            kernel = cuda_kernel(query, key, value, attn_mask, is_causal, capability)
            if kernel == "efficient" and _torch_private.has_cpu_flash_attention():
                if attn_mask is not None and attn_mask.dtype == torch.bool:
                    # convert_boolean_attn_mask (attention.cpp): the kernel keeps a float mask
                    attn_mask = torch.zeros((), dtype=query.dtype).masked_fill(attn_mask.logical_not(), float("-inf"))
                return _EfficientAttention.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)
            if kernel == "flash" and dropout_p:  # CPU would fall back to the math kernel
                out = _torch_private.cpu_flash_attention(query, key, value, dropout_p, is_causal, attn_mask, scale)
                if out is not None:
                    return out
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
