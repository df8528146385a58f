"""Ready-made workloads: ``memfit.presets.load("cifar-cnn")``.

Models are built from code or from transformers config classes with random
weights; nothing is ever downloaded. Language-model presets take ``seq_len``
and ``attention`` ("sdpa", the default, a fused kernel that keeps no attention
matrix, or "eager", which keeps the seq x seq scores and probabilities).
Each preset's keyword overrides are listed by :func:`describe`. The large ones
(Llama 70B) are meant for :func:`memfit.estimate`, which builds them on fake
tensors; building them for real needs the memory they describe.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.checks import positive_int
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


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise UsageError("the language-model presets need transformers: pip install 'memfit[presets]'") from exc
    return transformers


_ATTENTION = ("sdpa", "eager")


def _check_attention(name: str, attention: str) -> None:
    if attention not in _ATTENTION:
        raise UsageError(f"preset {name!r}: attention must be one of {', '.join(_ATTENTION)}, got {attention!r}")


def _gpt2_workload(name: str, *, seq_len: int, vocab_size: int, n_embd: int, n_layer: int, n_head: int,
                   n_positions: int, dropout: float, lr: float, attention: str = "sdpa") -> Workload:
    transformers = _transformers()
    _check_attention(name, attention)
    if seq_len > n_positions:
        raise UsageError(f"preset {name!r}: seq_len {seq_len} exceeds GPT-2's {n_positions} learned positions")
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's token ids (50256) must lie inside the vocabulary.
        bos_token_id=min(50256, vocab_size - 1),
        eos_token_id=min(50256, vocab_size - 1),
        use_cache=False,  # training keeps no key/value cache
        attn_implementation=attention,
    )
    return Workload(
        model=lambda: transformers.GPT2LMHeadModel(config),
        batch=_token_batch(vocab_size, seq_len),
        loss=causal_lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        name=name,
    )


def _gpt2_tiny(
    *,
    seq_len: int = 64,
    vocab_size: int = 1024,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    dropout: float = 0.1,
    lr: float = 3e-4,
    attention: str = "sdpa",
) -> Workload:
    return _gpt2_workload("gpt2-tiny", seq_len=seq_len, vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, n_positions=max(seq_len, 64), dropout=dropout, lr=lr, attention=attention)


# Published GPT-2 shapes (Radford et al. 2019; the released checkpoints): width, layers, heads.
_GPT2_SHAPES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}


def _gpt2_family(name: str):
    n_embd, n_layer, n_head = _GPT2_SHAPES[name]

    def build(*, seq_len: int = 1024, dropout: float = 0.1, lr: float = 3e-4, attention: str = "sdpa") -> Workload:
        return _gpt2_workload(name, seq_len=seq_len, vocab_size=50257, n_embd=n_embd, n_layer=n_layer,
                              n_head=n_head, n_positions=1024, dropout=dropout, lr=lr, attention=attention)

    return build


# Llama 2 shapes (Touvron et al. 2023, the released configs): width, MLP width, layers, heads, key/value heads.
_LLAMA_SHAPES = {
    "llama-7b": (4096, 11008, 32, 32, 32),
    "llama-13b": (5120, 13824, 40, 40, 40),
    "llama-70b": (8192, 28672, 80, 64, 8),
}


def _llama_family(name: str):
    hidden, intermediate, layers, heads, kv_heads = _LLAMA_SHAPES[name]

    def build(*, seq_len: int = 4096, lr: float = 3e-4, attention: str = "sdpa") -> Workload:
        transformers = _transformers()
        _check_attention(name, attention)
        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            # Rotary positions have no parameters: any length is allowed.
            max_position_embeddings=max(4096, seq_len),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            use_cache=False,
            attn_implementation=attention,
        )
        return Workload(
            model=lambda: transformers.LlamaForCausalLM(config),
            batch=_token_batch(32000, seq_len),
            loss=causal_lm_loss,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
            name=name,
        )

    return build


@dataclass(frozen=True, slots=True)
class _Preset:
    build: Callable[..., Workload]
    description: str

    @property
    def options(self) -> dict[str, object]:
        return {
            name: p.default
            for name, p in inspect.signature(self.build).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }


_PRESETS: dict[str, _Preset] = {
    "cifar-cnn": _Preset(_cifar_cnn, "The seed article's CIFAR-10 CNN on 3x32x32 images, cross-entropy, SGD with momentum 0.9."),
    "gpt2-tiny": _Preset(_gpt2_tiny, "A 2-layer GPT-2 (transformers GPT2LMHeadModel, random weights), token-level loss, AdamW."),
    "gpt2": _Preset(_gpt2_family("gpt2"), "GPT-2 small, 124M parameters (12 layers, width 768), AdamW."),
    "gpt2-medium": _Preset(_gpt2_family("gpt2-medium"), "GPT-2 medium, 355M parameters (24 layers, width 1024), AdamW."),
    "gpt2-large": _Preset(_gpt2_family("gpt2-large"), "GPT-2 large, 774M parameters (36 layers, width 1280), AdamW."),
    "gpt2-xl": _Preset(_gpt2_family("gpt2-xl"), "GPT-2 XL, 1.56B parameters (48 layers, width 1600), AdamW."),
    "llama-7b": _Preset(_llama_family("llama-7b"), "Llama 2 7B shapes, 6.74B parameters (32 layers, width 4096), AdamW."),
    "llama-13b": _Preset(_llama_family("llama-13b"), "Llama 2 13B shapes, 13.0B parameters (40 layers, width 5120), AdamW."),
    "llama-70b": _Preset(_llama_family("llama-70b"), "Llama 2 70B shapes, 69.0B parameters (80 layers, width 8192, 8 KV heads), AdamW."),
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
        if isinstance(default, int):
            positive_int(value, f"preset {name!r}: {key}")
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
