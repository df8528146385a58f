"""CUDA's choices on fake CPU tensors: which kernel runs, what it saves, and autocast's cast policy.

An estimate for ``device="cuda"`` runs on fake CPU tensors: fake CUDA tensors abort
a CPU-only torch build at the first op that needs a device guard, and
``torch.autocast("cuda")`` disables itself there. Where the CPU and CUDA paths
differ in memory, :func:`cuda_emulation` makes the CPU path do what CUDA would.
Each rule is PyTorch's own, read from its source (torch 2.13):

* **Dropout** (``aten::dropout``, aten/src/ATen/native/Dropout.cpp). When training
  with 0 < p < 1 on CUDA, ``is_fused_kernel_acceptable`` sends it to
  ``native_dropout``, which saves a bool mask (1 byte per element). The CPU path
  multiplies by a noise tensor in the input's dtype and saves that (4 bytes per
  element in fp32, 2 in bf16). In-place and feature dropout are not fused on CUDA
  either, so they run unchanged.
* **Attention** (``scaled_dot_product_attention``): the kernel CUDA picks for the card
  (flash, memory-efficient or math) and what it keeps: :mod:`memfit.cuda_attention`.
* **Autocast.** CUDA's op lists replace CPU's. They are the macros
  AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE,
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE and AT_FORALL_PROMOTE in
  torch/include/ATen/autocast_mode.h, registered on the Autocast key in
  aten/src/ATen/autocast_mode.cpp; ``tests/test_emulation.py`` checks the tables
  below against the installed header. CPU autocast keeps running, so its
  weight-cast cache and checkpoint recomputation behave as on CUDA. Each op whose
  policy differs gets a kernel on the ``AutocastCPU`` key that applies CUDA's
  policy: softmax, log_softmax, layer_norm, group_norm, sum, exp, pow and the
  losses run in fp32, and the ops only CPU casts (cross_entropy_loss, cat, stack,
  the pooling and padding ops) run uncast. With a half input, softmax and
  log_softmax take CUDA's ``half_to_float`` path (SoftMax.cpp): an fp32 output and
  no fp32 copy of the input. binary_cross_entropy raises CUDA's error.

Known limitations:

* The lower-precision ops that only CUDA casts (mv, addmv, addr, einsum as a
  whole, the RNN cells) cast their weights on every call, without autocast's
  weight-cast cache.
* cuDNN and cuBLAS workspaces and attention's backward scratch are outside any
  tensor, so they are not counted here.
* Code that calls ``aten::dropout`` with other device types, or that checks
  ``x.is_cuda`` itself, takes its CPU branch.
* The kernels are registered for the process while an estimate runs: CPU autocast
  in another thread at that moment would follow CUDA's lists too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memfit import _torch_private
from memfit._tree import map_tensors, tensors
from memfit.cuda_attention import fused_attention_emulation
from memfit.errors import UsageError

__all__ = ["cuda_emulation", "fused_attention_emulation", "cuda_autocast_policy", "dropout_as_cuda",
           "CUDA_LOWER_PRECISION", "CUDA_FP32", "CUDA_FP32_SET_OPT_DTYPE", "CUDA_FP32_APPEND_DTYPE", "CUDA_PROMOTE",
           "CPU_LOWER_PRECISION"]

log = logging.getLogger("memfit")

# CUDA's autocast lists, as "op" or "op.overload" (torch/include/ATen/autocast_mode.h, torch 2.13).
CUDA_LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d",
    "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
CUDA_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
CUDA_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
CUDA_PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
)
CUDA_BANNED = {"binary_cross_entropy": (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast on CUDA (it raises "
    "this error there); use torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss")}
# CPU autocast's lower-precision list (aten/src/ATen/autocast_mode.cpp, TORCH_LIBRARY_IMPL(aten, AutocastCPU)):
# where CUDA casts the same op down too, CPU's C++ kernel stays (with its weight-cast cache).
CPU_LOWER_PRECISION = (
    "conv1d", "conv1d.padding", "conv2d", "conv2d.padding", "conv3d", "conv3d.padding", "bmm", "mm",
    "linalg_vecdot", "baddbmm", "addmm", "_addmm_activation", "addbmm", "linear", "_convolution.deprecated",
    "matmul", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d", "conv_transpose2d.input",
    "conv_transpose3d.input", "prelu", "scaled_dot_product_attention", "_native_multi_head_attention",
)


@contextlib.contextmanager
def cuda_emulation(capability: tuple[int, int] = (9, 0)) -> Iterator[None]:
    """All of CUDA's rules at once, for a whole estimated run on fake CPU tensors standing for a card of
    compute ``capability`` (see the module docstring)."""
    with fused_attention_emulation(capability), dropout_as_cuda(), cuda_autocast_policy():
        yield


# ------------------------------------------------------------------------- dropout


@contextlib.contextmanager
def dropout_as_cuda() -> Iterator[None]:
    """``aten::dropout`` as on CUDA: the fused ``native_dropout`` (bool mask) when training with 0 < p < 1.

    The kernel takes the ``AutogradCPU`` slot of ``aten::dropout`` (a composite op, so
    every caller reaches it: ``nn.Dropout``, ``F.dropout``, ``torch.dropout``).
    """
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("dropout", _dropout, "AutogradCPU")
        yield
    finally:
        _torch_private.drop_library(lib)


def _dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    # at::dropout and _dropout_impl (Dropout.cpp), with is_fused_kernel_acceptable true as for a CUDA tensor.
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if train and 0 < p < 1 and input.numel() > 0:
        return torch.native_dropout(input, p, True)[0]
    if p == 0 or not train or input.numel() == 0:
        return input
    return input.mul(torch.zeros((), dtype=input.dtype, device=input.device))  # p == 1


# ------------------------------------------------------------------------- autocast


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While CPU autocast is on, cast as CUDA's autocast would (see the module docstring)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            # Replacing CPU autocast's kernels is the point; torch warns once that it happened.
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            for name, kernel in _policy_kernels().items():
                lib.impl(name, kernel, "AutocastCPU")
        yield
    finally:
        _torch_private.drop_library(lib)


@functools.cache
def _policy_kernels() -> dict[str, Callable[..., Any]]:
    """``op -> kernel`` for every op whose CUDA policy differs from what CPU autocast does.

    Built once per process (the kernels hold no state; the ops are this torch's): a plan
    registers them for each of its estimates."""
    kernels: dict[str, Callable[..., Any]] = {}
    keep = set(CUDA_LOWER_PRECISION) & set(CPU_LOWER_PRECISION)
    for name in _torch_private.autocast_cpu_ops() - keep:
        # Cast on CPU only: CUDA has no Autocast kernel for it, so the key falls through
        # and the ops inside it (cross_entropy_loss's log_softmax) follow their own policy.
        kernels[name] = torch.library.fallthrough_kernel
    for name in set(CUDA_LOWER_PRECISION) - keep:
        kernels[name] = _kernel(name, _lower)
    for name in CUDA_FP32:
        kernels[name] = _kernel(name, _fp32)
    for name in CUDA_FP32_SET_OPT_DTYPE:
        kernels[name] = _set_opt_dtype_kernel(name)
    for name, target in CUDA_FP32_APPEND_DTYPE.items():
        kernels[name] = _append_dtype_kernel(name, target)
    for name in CUDA_PROMOTE:
        kernels[name] = _kernel(name, _promote)
    for name, message in CUDA_BANNED.items():
        kernels[name] = _banned(message)
    missing = [name for name in kernels if _op(name) is None]
    if missing:  # pragma: no cover - another torch release's op set
        log.debug("memfit: this torch has no %s; CUDA's autocast rules for them are not emulated", missing)
    return {name: kernel for name, kernel in kernels.items() if name not in missing}


def _op(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    return getattr(packet, overload or "default", None) if packet is not None else None


def _eligible(t: Any) -> bool:
    # is_eligible and is_autocast_eligible (autocast_mode.h) for the CPU key: a floating, non-double CPU tensor.
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


def _cast(values: Any, dtype: torch.dtype) -> Any:
    return map_tensors(values, lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t)


def _kernel(name: str, policy: Callable[[tuple, dict], tuple[tuple, dict]]) -> Callable[..., Any]:
    op = _op(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = policy(args, kwargs)
        with _torch_private.autocast_cpu_excluded():  # as the C++ wrappers redispatch
            return op(*args, **kwargs)

    return kernel


def _lower(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast((args, kwargs), torch.get_autocast_dtype("cpu"))


def _fp32(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast((args, kwargs), torch.float32)


def _promote(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # promote_type (autocast_mode.h): the lower-precision type promoted with every eligible argument's.
    dtype = torch.get_autocast_dtype("cpu")
    for t in tensors((args, kwargs)):
        if _eligible(t):
            dtype = torch.promote_types(dtype, t.dtype)
    return _cast((args, kwargs), dtype)


def _set_opt_dtype_kernel(name: str) -> Callable[..., Any]:
    """fp32_set_opt_dtype: if the first argument is eligible, an unset ``dtype`` becomes float32."""
    op = _op(name)
    position = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype" and not a.kwarg_only), None)
    half_to_float = _torch_private.softmax_half_to_float(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with _torch_private.autocast_cpu_excluded():
            if not args or not _eligible(args[0]):
                return op(*args, **kwargs)
            if position is not None and position < len(args):
                if args[position] is None:
                    args = (*args[:position], torch.float32, *args[position + 1:])
                dtype = args[position]
            else:
                dtype = kwargs.get("dtype") or torch.float32
                kwargs = {**kwargs, "dtype": dtype}
            if (half_to_float is not None and args[0].dtype == torch.float16 and dtype == torch.float32
                    and _torch_private.is_fake(args[0])):  # CPU's kernel refuses half_to_float; fake tensors don't
                # SoftMax.cpp: a CUDA half input with dtype=float runs _softmax(input, dim, half_to_float=true).
                dim = args[1] if len(args) > 1 else kwargs["dim"]
                return half_to_float(args[0], dim, True)
            return op(*args, **kwargs)

    return kernel


def _append_dtype_kernel(name: str, target: str) -> Callable[..., Any]:
    """fp32_append_dtype (norm): the overload with a dtype, called with float32, if the first argument is eligible."""
    op, with_dtype = _op(name), _op(target)
    defaults = [(a.name, a.default_value) for a in op._schema.arguments]

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with _torch_private.autocast_cpu_excluded():
            if not args or not _eligible(args[0]):
                return op(*args, **kwargs)
            full = [kwargs.get(n, d) if i >= len(args) else args[i] for i, (n, d) in enumerate(defaults)]
            return with_dtype(*full, dtype=torch.float32)

    return kernel


def _banned(message: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        raise UsageError(message)

    return kernel
