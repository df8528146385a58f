"""Presets: shapes, parameter counts, overrides, spec resolution; nothing downloaded."""

import textwrap

import pytest
import torch

import memfit
from memfit import UsageError, presets


def test_names():
    assert {"cifar-cnn", "gpt2-tiny"} <= set(presets.names())
    for name in presets.names():
        assert presets.describe(name).startswith(name + ": ")


def test_cifar_cnn_is_the_seed_network_with_its_shape_fixed():
    wl = presets.load("cifar-cnn")
    model = wl.model()
    # conv 3->64 3x3 with bias, linear 64*16*16 -> 10 with bias.
    assert sum(p.numel() for p in model.parameters()) == 3 * 64 * 9 + 64 + 64 * 16 * 16 * 10 + 10
    images, labels = wl.batch(4)
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert model(images).shape == (4, 10)
    optimizer = wl.optimizer(model.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


def test_gpt2_tiny_is_a_two_layer_gpt2_with_a_token_level_loss():
    from transformers import GPT2LMHeadModel

    wl = presets.load("gpt2-tiny", seq_len=32)
    model = wl.model()
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_layer == 2
    batch = wl.batch(3)
    assert batch["input_ids"].shape == (3, 32)
    loss_sum, n_items = wl.loss(model, batch)
    assert loss_sum.dim() == 0 and int(n_items) == 3 * 31
    assert isinstance(wl.optimizer(model.parameters()), torch.optim.AdamW)


def test_bad_names_and_overrides():
    with pytest.raises(UsageError, match="unknown preset 'gpt5'; the presets are: cifar-cnn, gpt2, gpt2-large, gpt2-medium, gpt2-tiny, gpt2-xl, llama-13b"):
        presets.load("gpt5")
    with pytest.raises(UsageError, match="takes no option 'seq_len'"):
        presets.load("cifar-cnn", seq_len=4)
    with pytest.raises(UsageError, match="seq_len must be a positive int, got 0"):
        presets.load("gpt2-tiny", seq_len=0)


def test_resolve_file_and_module_specs(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import torch
        import memfit

        def make(seq_len=4):
            return memfit.Workload(
                lambda: torch.nn.Linear(seq_len, 2),
                lambda n: torch.randn(n, seq_len),
                lambda m, b: m(b).sum(),
                None,
                name="mine",
            )

        def wrong():
            return 42
        """
    )
    (tmp_path / "my_workloads.py").write_text(source)
    assert presets.resolve(f"{tmp_path}/my_workloads.py:make").name == "mine"
    assert presets.resolve(f"{tmp_path}/my_workloads.py:make", seq_len=8).model().in_features == 8
    monkeypatch.syspath_prepend(str(tmp_path))
    assert presets.resolve("my_workloads:make").name == "mine"
    with pytest.raises(UsageError, match="returned int, expected a memfit.Workload"):
        presets.resolve("my_workloads:wrong")
    with pytest.raises(UsageError, match="has no function 'nope'; it defines: make, wrong"):
        presets.resolve("my_workloads:nope")
    with pytest.raises(UsageError, match="not found"):
        presets.resolve(f"{tmp_path}/missing.py:make")
    with pytest.raises(UsageError, match="unknown workload 'gpt5'"):
        presets.resolve("gpt5")
    with pytest.raises(UsageError, match="cannot import module 'no_such_module_xyz'"):
        presets.resolve("no_such_module_xyz:make")
