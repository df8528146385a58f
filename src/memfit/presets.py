"""Ready-made workloads: ``memfit.presets.load("cifar-cnn")``.

Models are built from code or from transformers config classes with random
weights; nothing is ever downloaded. Each preset's keyword overrides are listed
by :func:`describe`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import UsageError
from memfit.workload import Workload

__all__ = ["load", "names", "describe", "resolve", "SeedCNN"]


class SeedCNN(nn.Module):
    """The seed article's CIFAR-10 network: conv 3->64 (3x3, padding 1), ReLU, 2x2 max-pool, linear -> 10.

    The article's linear layer takes 64*8*8 inputs, which cannot work: one 2x2
    pool of a 32x32 image leaves 64 channels of 16x16. We keep the article's
    layers and give the linear layer the 64*16*16 inputs it actually receives.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc = nn.Linear(64 * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = x.flatten(1)
        return self.fc(x)


def _cifar_cnn(*, num_classes: int = 10, image_size: int = 32, lr: float = 0.01, momentum: float = 0.9) -> Workload:
    """The seed article's CIFAR-10 CNN on 3x32x32 images, cross-entropy, SGD with momentum 0.9."""

    def batch(n: int):
        return torch.randn(n, 3, image_size, image_size), torch.randint(0, num_classes, (n,))

    def loss(model: nn.Module, b) -> torch.Tensor:
        images, labels = b
        return F.cross_entropy(model(images), labels)

    return Workload(
        model=lambda: SeedCNN(num_classes, image_size),
        batch=batch,
        loss=loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum),
        name="cifar-cnn",
    )


def causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level next-token loss: (sum over predicted tokens, number of them); labels of -100 are ignored.

    Returning the sum and the count, not their mean, lets gradient accumulation
    weight every token equally however the batch is split.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss_sum, (labels != -100).sum()


def _token_batch(vocab_size: int, seq_len: int):
    def batch(n: int) -> dict:
        ids = torch.randint(0, vocab_size, (n, seq_len))
        return {"input_ids": ids, "labels": ids.clone()}

    return batch


def _gpt2_tiny(
    *,
    seq_len: int = 64,
    vocab_size: int = 1024,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    dropout: float = 0.1,
    lr: float = 3e-4,
) -> Workload:
    """A 2-layer GPT-2 (transformers GPT2LMHeadModel, random weights), token-level loss, AdamW."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise UsageError("the gpt2 presets need transformers: pip install 'memfit[presets]'") from exc
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(seq_len, 1),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's token ids (50256) lie outside a small vocabulary; keep them inside it.
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    return Workload(
        model=lambda: GPT2LMHeadModel(config),
        batch=_token_batch(vocab_size, seq_len),
        loss=causal_lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        name="gpt2-tiny",
    )


@dataclass(frozen=True, slots=True)
class _Preset:
    build: Callable[..., Workload]

    @property
    def description(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0]

    @property
    def options(self) -> dict[str, object]:
        return {
            name: p.default
            for name, p in inspect.signature(self.build).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }


_PRESETS: dict[str, _Preset] = {
    "cifar-cnn": _Preset(_cifar_cnn),
    "gpt2-tiny": _Preset(_gpt2_tiny),
}


def names() -> list[str]:
    """The preset names, sorted."""
    return sorted(_PRESETS)


def describe(name: str) -> str:
    """One line: what the preset is and the overrides it takes, with their defaults."""
    preset = _get(name)
    options = ", ".join(f"{k}={v!r}" for k, v in preset.options.items())
    return f"{name}: {preset.description} Overrides: {options}."


def load(name: str, **overrides) -> Workload:
    """The preset ``name`` as a :class:`~memfit.workload.Workload`, with keyword overrides.

    Example:
        >>> wl = load("gpt2-tiny", seq_len=128)
    """
    preset = _get(name)
    unknown = sorted(set(overrides) - set(preset.options))
    if unknown:
        raise UsageError(
            f"preset {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(preset.options)}"
        )
    for key, value in overrides.items():
        default = preset.options[key]
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"preset {name!r}: {key} must be a positive int, got {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UsageError(f"preset {name!r}: {key} must be a non-negative number, got {value!r}")
    return preset.build(**overrides)


def _get(name: str) -> _Preset:
    preset = _PRESETS.get(name)
    if preset is None:
        raise UsageError(f"unknown preset {name!r}; the presets are: {', '.join(names())}")
    return preset


def resolve(spec: str, **overrides) -> Workload:
    """A workload from a spec: a preset name, ``path/to/file.py:function`` or ``package.module:function``.

    The function is called with the overrides as keyword arguments and must
    return a :class:`~memfit.workload.Workload`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"bad workload spec {spec!r}: {_SPEC_FORMS}")
    if spec in _PRESETS:
        return load(spec, **overrides)
    if ":" not in spec:
        raise UsageError(f"unknown workload {spec!r}: {_SPEC_FORMS}")
    target, _, func_name = spec.rpartition(":")
    if not target or not func_name.isidentifier():
        raise UsageError(f"bad workload spec {spec!r}: {_SPEC_FORMS}")
    module = _import_target(spec, target)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise UsageError(
            f"{target} has no function {func_name!r}"
            + (f"; it defines: {', '.join(defined)}" if defined else "")
        )
    try:
        workload = factory(**overrides)
    except TypeError as exc:
        if overrides and "unexpected keyword argument" in str(exc):
            raise UsageError(f"{spec} does not take {', '.join(overrides)}: {exc}") from exc
        raise
    if not isinstance(workload, Workload):
        raise UsageError(f"{spec} returned {type(workload).__name__}, expected a memfit.Workload")
    return workload


_SPEC_FORMS = "expected a preset (" + ", ".join(sorted(_PRESETS)) + "), path/to/file.py:function or package.module:function"


def _import_target(spec: str, target: str):
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"workload file {target!r} not found (from spec {spec!r})")
        name = f"_memfit_workload_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"cannot load {target!r} as Python: {_SPEC_FORMS}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise UsageError(f"cannot import module {target!r} (from spec {spec!r}): {exc}") from exc
        raise
