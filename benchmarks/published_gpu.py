"""memfit's CUDA estimates against published, measured single-GPU training figures.

Each row is a training run someone measured on a CUDA card and published, with the
script or the exact settings beside the figure. memfit estimates the same setup on
fake tensors (models from config classes, random weights, nothing downloaded) and
the row compares like with like:

* ``nvidia-smi`` (the card's used memory, the process alone on it) with
  ``est.required``: reserved memory plus the CUDA context;
* ``reserved`` (``torch.cuda.max_memory_reserved``) with ``est.reserved``;
* ``allocated`` (``torch.cuda.max_memory_allocated``) with ``est.peak``.

Sources:

A. Hugging Face Transformers, "Efficient training on a single GPU" (docs,
   perf_train_gpu_one.md, January 2022; the first row is also in
   model_memory_anatomy.md). bert-large-uncased for sequence classification
   (2 labels), sequences of 512 random tokens, the Trainer's defaults (AdamW with
   weight decay 0, gradient clipping at 1.0), one Tesla V100-SXM2 16 GB, driver
   460.91, CUDA 11.2. Figure: NVML's used memory after ``trainer.train()``, in MiB
   (``info.used // 1024**2``). The same page measures the CUDA context on that
   stack: 1343 MiB after ``torch.ones((1, 1)).to("cuda")``, of which the
   allocator's first 2 MiB segment holds the tensor; the profile of these rows
   takes the other 1341 MiB as the context. The Trainer of the time
   (transformers 4.15, torch 1.10) called ``model.zero_grad()``, which kept the
   gradients as zeros (``set_to_none`` became the default in torch 2.0): every
   row uses ``zero_grad="zeros"``. Its default optimizer was transformers' own
   AdamW, removed since; :class:`HFAdamW` is its update, line for line. Its
   gradient checkpointing recomputed each BertLayer (reentrant;
   memfit's is non-reentrant, which keeps the same tensors).
B. Sebastian Raschka, "Optimizing Memory Usage for Training LLMs and Vision
   Transformers in PyTorch" (July 2023), scripts and logs in
   github.com/rasbt/pytorch-memory-optim (logs.md). torchvision's ViT-L/16 with a
   10-class head, 224x224 inputs, Adam (lr 5e-5; the foreach implementation,
   torch's default on CUDA), torch 2.1 (a June 2023 nightly, CUDA 11.8), one
   A100, through Lightning Fabric for the 16-mixed and bf16-true rows. Figure:
   ``torch.cuda.max_memory_reserved() / 1e9`` after one epoch. The scripts call
   ``optimizer.zero_grad()`` between the forward and the backward
   (``zero_grad="after-forward"``: last step's gradients live through the
   forward), except the accumulation script, which calls it after the step.
   torchvision's CPU wheel cannot be installed here (the registry's wheel is
   built against CUDA torch), so :class:`TorchvisionViT` restates its
   VisionTransformer (torchvision/models/vision_transformer.py) with the same
   modules: nn.MultiheadAttention, LayerNorm(eps=1e-6), GELU MLP, dropout 0.

Columns: ``memfit`` is the estimate as shipped, which follows torch 2.13's kernels;
``old torch`` adds the one rule the row's torch had that 2.13 changed (:func:`old_torch`),
to show whether the residual is that difference. The last line is the shipped estimate's.

What no row can say: the torch versions differ from the one memfit runs (2.13),
so each op is the installed torch's; the cuBLAS workspace of torch 1.10 was
cuBLAS's own (outside the allocator but inside nvidia-smi), modelled as memfit's
two handles of 8.125 MiB.

    python benchmarks/published_gpu.py [--rows A1 B2 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

import memfit
from memfit.devices import DeviceProfile

warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad=True.*")

MiB = 2**20

HF_DOCS = "huggingface.co/docs/transformers/v4.16.0/en/performance (perf_train_gpu_one.md)"
RASCHKA = "github.com/rasbt/pytorch-memory-optim logs.md (Raschka, 2023)"

V100_2022 = DeviceProfile(
    name="Tesla V100-SXM2-16GB, driver 460.91, CUDA 11.2",
    capability=(7, 0),
    total=16160 * MiB,
    context=1341 * MiB,
    source="Hugging Face docs, model_memory_anatomy.md: 1343 MiB used after a first 1x1 tensor, "
           "less the allocator's 2 MiB segment that holds it",
)
A100 = memfit.devices.load_profile("a100-40gb")


class HFAdamW(torch.optim.Optimizer):
    """transformers.AdamW (transformers 4.16, src/transformers/optimization.py), the Trainer's default then.

    One parameter at a time; its one temporary is ``denom``, a parameter-sized tensor.
    """

    def __init__(self, params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return None


class _MLPBlock(nn.Sequential):
    # torchvision.ops.MLP(in_dim, [mlp_dim, in_dim], activation_layer=nn.GELU, dropout=dropout)
    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout))


class _EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = _MLPBlock(hidden, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class _Encoder(nn.Module):
    def __init__(self, seq: int, layers: int, heads: int, hidden: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", _EncoderBlock(heads, hidden, mlp_dim)) for i in range(layers)))
        self.ln = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TorchvisionViT(nn.Module):
    """torchvision.models.VisionTransformer's modules and forward (torchvision 0.16), random weights."""

    def __init__(self, image_size=224, patch_size=16, layers=24, heads=16, hidden=1024, mlp_dim=4096,
                 num_classes=10):
        super().__init__()
        self.patch_size, self.hidden = patch_size, hidden
        self.conv_proj = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)
        seq = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.encoder = _Encoder(seq, layers, heads, hidden, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden, (h // self.patch_size) * (w // self.patch_size)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


# ------------------------------------------------------------------ the published runs' torch

# The rows ran older torch versions, whose kernels saved other tensors than torch 2.13's.
# memfit follows the installed torch; these two rules, each from the older torch's source,
# show (in the "old torch" column) whether the residual is that difference.


class _SoftmaxSavingInput(torch.autograd.Function):
    """torch < 1.11: softmax's backward node kept its input as well as its output.

    derivatives.yaml had ``self: _softmax_backward_data(grad, result, dim, self)``, so the
    input (the autocast-cast one) was saved although only its dtype was read (pytorch
    issue #49600; fixed by pull request #65242, released in 1.11, March 2022).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        y = torch.softmax(x, dim)  # autocast's policy applies as for the plain call
        ctx.dim, ctx.x_dtype = dim, x.dtype
        ctx.save_for_backward(x if x.dtype == y.dtype else x.to(y.dtype), y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, y = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, ctx.dim, ctx.x_dtype), None


class _AttentionBSHDOutput(torch.autograd.Function):
    """torch 2.0-2.1 on CUDA: scaled_dot_product_attention's fused kernels returned a (B, S, H, d) output.

    The flash kernel ran its variable-length interface on ``q.transpose(1, 2).reshape(B*S,
    H, d)`` (a copy when q is not laid out (B, S, H, d), as nn.MultiheadAttention's is not)
    and returned ``attention.view(B, S, H, d).transpose(1, 2)``
    (aten/src/ATen/native/transformers/cuda/attention.cu, 2.0 and 2.1); the
    memory-efficient kernel allocated its output as ``{B, M, num_heads, Kv}``. So
    nn.MultiheadAttention's ``attn_output.permute(2, 0, 1, 3).contiguous()`` copied it, and
    out_proj saved the copy. torch 2.13's flash kernel allocates ``empty_like(q)`` instead
    (flash_api.cpp), so there is no copy, as on CPU.
    """

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale):
        b, h, s, d = q.shape
        flat = [t.transpose(1, 2).reshape(b * t.shape[2], h, d) for t in (q, k, v)]  # transient, as in 2.1
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        del flat
        out = out.transpose(1, 2).contiguous()  # (B, S, H, d) storage
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out.transpose(1, 2), lse, 0.0, ctx.is_causal, scale=ctx.scale)
        return (*grads, None, None)


@contextlib.contextmanager
def old_torch(rule: str):
    """Run the row's estimate under its torch's rule (see the two classes above)."""
    module, name = torch.nn.functional, {"softmax-input": "softmax", "sdpa-bshd": "scaled_dot_product_attention"}[rule]
    original = getattr(module, name)

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None or dim is None or not input.requires_grad:
            return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
        return _SoftmaxSavingInput.apply(input, dim)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or query.dim() != 4 or query.shape[1] != key.shape[1]:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(dtype) for t in (query, key, value))
        return _AttentionBSHDOutput.apply(query, key, value, is_causal, scale)

    setattr(module, name, softmax if rule == "softmax-input" else sdpa)
    try:
        yield
    finally:
        setattr(module, name, original)


def vit_l_16_cifar10() -> memfit.Workload:
    return memfit.Workload(
        model=TorchvisionViT,
        batch=lambda n: (torch.rand(n, 3, 224, 224), torch.randint(0, 10, (n,))),
        loss=lambda model, b: nn.functional.cross_entropy(model(b[0]), b[1]),
        optimizer=lambda params: torch.optim.Adam(params, lr=5e-5),
        name="torchvision vit_l_16, 10 classes",
    )


def bert_large_classifier(optimizer: str) -> memfit.Workload:
    import transformers

    # bert-large-uncased's config.json; BERT had only eager attention in transformers 4.16.
    config = transformers.BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                                     num_attention_heads=16, intermediate_size=4096, num_labels=2,
                                     attn_implementation="eager")
    factories: dict[str, Callable] = {
        "adamw_hf": lambda params: HFAdamW(params, lr=5e-5),
        # Trainer(optim="adafactor"): Adafactor(params, scale_parameter=False, relative_step=False, lr=...)
        "adafactor": lambda params: transformers.optimization.Adafactor(
            params, lr=5e-5, scale_parameter=False, relative_step=False),
        "adam8bit": _adam8bit,
    }

    def batch(n: int):
        return {"input_ids": torch.randint(100, 30000, (n, 512)), "labels": torch.zeros(n, dtype=torch.long)}

    return memfit.Workload(
        model=lambda: transformers.BertForSequenceClassification(config),
        batch=batch,
        loss=lambda model, b: model(**b).loss,
        optimizer=factories[optimizer],
        name=f"bert-large-uncased classifier, {optimizer}",
    )


def _adam8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)


@dataclass(frozen=True)
class Row:
    key: str
    source: str
    gpu: str
    setup: str
    measured: str
    """What the source measured: "nvidia-smi", "reserved" or "allocated"."""
    published: int
    """The published figure, in bytes."""
    workload: Callable[[], memfit.Workload]
    config: memfit.Config
    accumulation: int
    profile: DeviceProfile
    old_rule: str
    """The published run's torch rule that torch 2.13 changed (see :func:`old_torch`)."""
    missing: str = ""
    """What memfit cannot express of the setup (the row is then shown, not estimated)."""


def _hf(key, setup, mib, optimizer="adamw_hf", micro_batch=4, accumulation=1, precision="32-true", checkpoint=()):
    config = memfit.Config(micro_batch=micro_batch, precision=precision, checkpoint=checkpoint, zero_grad="zeros")
    return Row(key, HF_DOCS, "V100 16GB", "bert-large, s=512, " + setup, "nvidia-smi", mib * MiB,
               partial(bert_large_classifier, optimizer), config, accumulation, V100_2022, "softmax-input")


def _raschka(key, setup, gb, micro_batch=64, accumulation=1, precision="32-true", zero_grad="after-forward"):
    config = memfit.Config(micro_batch=micro_batch, precision=precision, zero_grad=zero_grad,
                           optimizer_impl="foreach")
    return Row(key, RASCHKA, "A100", "vit_l_16, 224px, " + setup, "reserved", round(gb * 1e9),
               vit_l_16_cifar10, config, accumulation, A100, "sdpa-bshd")


ROWS = [
    _hf("A1", "b=4, fp32, AdamW", 14949),
    _hf("A2", "b=1 x 4 accumulated, fp32, AdamW", 8681, micro_batch=1, accumulation=4),
    _hf("A3", "b=1 x 4, checkpointing, fp32, AdamW", 6775, micro_batch=1, accumulation=4, checkpoint=("all",)),
    _hf("A4", "b=4, fp16 mixed, AdamW", 13939, precision="16-mixed"),
    _hf("A5", "b=1 x 4, checkpointing, fp16 mixed, AdamW", 7275, micro_batch=1, accumulation=4,
        precision="16-mixed", checkpoint=("all",)),
    _hf("A6", "b=4, fp32, Adafactor", 12295, optimizer="adafactor"),
    _hf("A7", "b=1 x 4, checkpointing, fp16 mixed, Adafactor", 4847, optimizer="adafactor", micro_batch=1,
        accumulation=4, precision="16-mixed", checkpoint=("all",)),
    _hf("A8", "b=4, fp32, bnb Adam8bit", 13085, optimizer="adam8bit"),
    _hf("A9", "b=1 x 4, checkpointing, fp16 mixed, bnb Adam8bit", 5363, optimizer="adam8bit", micro_batch=1,
        accumulation=4, precision="16-mixed", checkpoint=("all",)),
    _raschka("B1", "b=64, fp32, Adam", 26.79),
    _raschka("B2", "b=64, 16-mixed, Adam", 18.21, precision="16-mixed"),
    _raschka("B3", "b=64, bf16-true, Adam", 13.82, precision="bf16-true"),
    _raschka("B4", "b=16, bf16-true, Adam", 5.69, micro_batch=16, precision="bf16-true"),
    _raschka("B5", "b=4 x 4 accumulated, bf16-true, Adam", 3.91, micro_batch=4, accumulation=4,
             precision="bf16-true", zero_grad="set-to-none"),
]


def predicted(est: memfit.Estimate, measured: str) -> int:
    return {"nvidia-smi": est.required, "reserved": est.reserved, "allocated": est.peak}[measured]


def estimate(row: Row, steps: int) -> memfit.Estimate:
    torch.manual_seed(0)
    return memfit.estimate(row.workload(), row.config, steps=steps, device="cuda", accumulation=row.accumulation,
                           profile=row.profile)


def summary(ratios: list[tuple[float, str]]) -> str:
    median = statistics.median(r for r, _ in ratios)
    worst, key = max(ratios, key=lambda rk: abs(rk[0] - 1))
    return f"median estimate/published = {median:.3f}; worst = {worst:.3f} ({key}) over {len(ratios)} rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[r.key for r in ROWS], choices=[r.key for r in ROWS])
    parser.add_argument("--steps", type=int, default=2, help="training steps estimated (the first creates "
                        "the optimizer state; later ones show the steady state)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; sources: A = {HF_DOCS}; B = {RASCHKA}")
    print("memfit: the estimate as shipped (torch 2.13's kernels); old torch: with the rule the published run's "
          "torch had (A: softmax saved its input; B: attention output laid out (B, S, H, d))")
    header = (f"{'row':<4} {'gpu':<10} {'setup':<52} {'measured':<10} {'published':>10} {'memfit':>10} "
              f"{'ratio':>6} {'old torch':>10} {'ratio':>6} {'peak in':>9} {'s':>5}")
    print(header)
    print("-" * len(header))
    shipped, old = [], []
    for row in ROWS:
        if row.key not in args.rows:
            continue
        published = f"{row.published / 2**30:>8.2f}Gi"
        if row.missing:
            print(f"{row.key:<4} {row.gpu:<10} {row.setup:<52} {row.measured:<10} {published} "
                  f"cannot express: {row.missing}")
            continue
        start = time.perf_counter()
        est = estimate(row, args.steps)
        with old_torch(row.old_rule):
            figure_old = predicted(estimate(row, args.steps), row.measured)
        figure = predicted(est, row.measured)
        shipped.append((figure / row.published, row.key))
        old.append((figure_old / row.published, row.key))
        print(f"{row.key:<4} {row.gpu:<10} {row.setup:<52} {row.measured:<10} {published} "
              f"{figure / 2**30:>8.2f}Gi {figure / row.published:>6.3f} {figure_old / 2**30:>8.2f}Gi "
              f"{figure_old / row.published:>6.3f} {est.report.peak_phase:>9} {time.perf_counter() - start:>5.0f}",
              flush=True)
    if not shipped:
        raise SystemExit("no row estimated")
    print(f"with the published runs' torch rules: {summary(old)}")
    print(f"ratio: {summary(shipped)} (target: every row within 5%)")


if __name__ == "__main__":
    main()
