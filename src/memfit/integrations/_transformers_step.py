"""The Hugging Face ``Trainer``'s training step as a :class:`memfit.Workload` (:func:`training_workload`).

Apart from :mod:`memfit.integrations.transformers` for length: the batch, the loss as ``Trainer.compute_loss``
computes it and the optimizer as ``Trainer.create_optimizer`` makes it.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memfit.checks import positive_int
from memfit.errors import UsageError
from memfit.workload import Workload

import transformers  # noqa: E402 - the public module imported it first, with its install hint

__all__ = ["training_workload"]


def training_workload(model: nn.Module, args: Any, *, sample: Mapping[str, torch.Tensor] | None = None,
                      seq_len: int | None = None) -> Workload:
    """The HF Trainer's training step for ``model`` under ``args``, as a :class:`memfit.Workload`.

    Its loss is ``Trainer.compute_loss``'s (the model's own with ``labels``: its sum and the items the Trainer
    counts for ``num_items_in_batch``, where the model takes loss kwargs), its optimizer ``create_optimizer``'s,
    its batch ``sample``'s rows repeated (one batch as your collator yields it) or, for a causal LM, ``seq_len``
    random token ids as their own labels. ``workload.model`` is ``model`` (copied by memfit, never changed).
    """
    if not isinstance(args, transformers.TrainingArguments):
        raise UsageError(f"args must be transformers.TrainingArguments, got {type(args).__name__}")
    if args.deepspeed or args.fsdp or args.world_size > 1 or args.n_gpu > 1:
        raise UsageError(f"memfit plans one device, and these arguments train on several (deepspeed={args.deepspeed!r}, "
                         f"fsdp={args.fsdp!r}, world_size={args.world_size}, n_gpu={args.n_gpu}); plan on one "
                         "(CUDA_VISIBLE_DEVICES=0, without deepspeed and fsdp)")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module (a transformers PreTrainedModel), got {type(model).__name__}")
    return Workload(model=model, batch=_batch(model, sample, seq_len), loss=_loss(model, args),
                    optimizer=_optimizer(model, args), name=type(model).__name__)



def _batch(model: nn.Module, sample: Any, seq_len: Any):
    if sample is not None and seq_len is not None:
        raise UsageError("give sample= (a batch as your data collator yields it) or seq_len=, not both; got both")
    if sample is not None:
        values = list(sample.values()) if isinstance(sample, Mapping) else []
        if not values or not all(isinstance(v, torch.Tensor) and v.dim() for v in values) or len({len(v) for v in values}) > 1:
            raise UsageError("sample= must be one batch as the Trainer's data collator yields it: a dict of tensors "
                             f"with one batch size on dimension 0, such as {{'input_ids': ids, 'labels': ids}}; got {sample!r:.80}")
        if not len(values[0]):  # memfit repeats its rows to any batch size: it needs one at least
            shapes = ", ".join(str(tuple(v.shape)) for v in values)
            raise UsageError(f"sample= has 0 rows (its tensors' shapes: {shapes}); give one batch as your data "
                             "collator yields it, with at least one sample")
        if "labels" not in sample:
            raise UsageError(f"sample= has no 'labels' (its keys: {', '.join(sample)}); the HF Trainer trains on the "
                             "model's own loss, computed from labels: give the sample your collator makes")
        rows = {k: (v.tolist(), v.dtype) for k, v in sample.items()}  # values: estimates rebuild it on fake tensors
        return lambda n: {k: torch.tensor([r[i % len(r)] for i in range(n)], dtype=d) for k, (r, d) in rows.items()}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise UsageError(f"{type(model).__name__} is not a causal LM, whose batch memfit makes from its config: give "
                         "sample= (one batch as your data collator yields it)")
    if seq_len is None:
        raise UsageError("give seq_len= (the tokens per sample your collator makes; memory grows with it) or sample=")
    most = getattr(model.config, "max_position_embeddings", None)
    if positive_int(seq_len, "seq_len", hint="tokens per sample") > (most if isinstance(most, int) else seq_len):
        raise UsageError(f"seq_len {seq_len} exceeds the model's {most} positions (max_position_embeddings)")

    def batch(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, model.config.vocab_size, (n, seq_len))
        return {"input_ids": ids, "labels": ids.clone()}

    return batch


def _loss(model: nn.Module, args: Any):
    """Trainer.compute_loss (transformers 5), decided as the Trainer decides it in its ``__init__``."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    params = inspect.signature(model.forward).parameters
    takes_items = bool(model.accepts_loss_kwargs) if hasattr(model, "accepts_loss_kwargs") else any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # transformers 5's Trainer sets config.use_cache = args.use_cache (False: no key/value cache while training).
    fixed = {"use_cache": args.use_cache} if "use_cache" in params and hasattr(args, "use_cache") else {}
    # The Trainer counts labels[..., 1:] only for a loss_type mapped to ForCausalLMLoss: GPT2LMHeadModel's is None,
    # so it counts every label while the loss sums one fewer per row. memfit counts as the Trainer does.
    shifted = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False)

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """A mean; or (sum, items) where the Trainer divides by the accumulation window's num_items_in_batch."""
        items = takes_items and "labels" in batch  # then num_items_in_batch=1 returns the model's sum
        out = model(**batch, **fixed, **({"num_items_in_batch": 1} if items else {}))
        value = out["loss"] if isinstance(out, dict) else out[0]
        counted = batch.get("shift_labels", batch["labels"][..., 1:] if shifted else batch["labels"]) if items else None
        return (value, counted.ne(-100).sum()) if items else value  # memfit divides by the logical batch's items

    return loss


def _optimizer(model: nn.Module, args: Any):
    """Trainer.create_optimizer's optimizer, over the parameters memfit passes (a copy's, in the same order)."""
    from transformers import Trainer
    name = getattr(args.optim, "value", args.optim)  # an OptimizerNames, or its string
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"the HF Trainer cannot build optim={name!r} here: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise UsageError(f"optim={name!r} builds its optimizer from the model itself (GaLore, LOMO, layer-wise, "
                         "factories), which memfit cannot rebuild over a copy; plan with optim='adamw_torch_fused'")
    # get_decay_parameter_names reads nothing of a Trainer but its arguments: a stand-in carries them.
    decay = set(Trainer.get_decay_parameter_names(types.SimpleNamespace(args=args), model))
    flags = [n in decay for n, _ in model.named_parameters()]  # model.parameters() comes in this order

    def optimizer(params) -> torch.optim.Optimizer:
        # A copy cut to fewer blocks (memfit estimates deep models so) gets the rule's gist: decay on matrices.
        pairs = list(zip(params := list(params), flags if len(params) == len(flags) else [p.dim() > 1 for p in params]))
        return cls([{"params": [p for p, d in pairs if d is wd and p.requires_grad],
                     "weight_decay": args.weight_decay if wd else 0.0} for wd in (True, False)], **kwargs)

    return optimizer
