"""memfit demo: bundled data, the naive step's OOM, the plan, training under it, in a short mode."""

import io

import torch
from rich.console import Console

from memfit import demo
from memfit.cli import main


def test_digits_are_bundled_3x32x32_images_split_80_20():
    train_x, train_y, test_x, test_y = demo.digits()
    assert train_x.shape == (1438, 3, 32, 32) and test_x.shape == (359, 3, 32, 32)
    assert set(train_y.tolist()) == set(range(10))
    assert float(train_x.min()) >= -1.0 and float(train_x.max()) <= 1.0
    assert torch.equal(train_x, demo.digits()[0])  # the split is seeded


def test_demo_short_mode_fails_naively_then_trains_within_the_budget():
    out = io.StringIO()
    result = demo.run(Console(file=out, width=100), batch_size=64, epochs=1)
    text = out.getvalue()
    assert not result.naive_fits and "CUDA out of memory" in text
    assert sum(result.accumulation) == 64 and len(result.accumulation) > 1  # accumulation keeps the batch
    assert result.peak <= result.budget
    assert result.retries == 0  # the plan fitted: no out-of-memory during training
    assert result.steps == 23  # ceil(1438 / 64) logical batches in one epoch
    assert result.accuracy > 0.5  # ten classes: chance is 0.1
    assert "Plan for batch 64" in text and "Test accuracy" in text


def test_demo_help_lists_its_flags(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["demo", "-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--epochs", "--budget", "--seed"):
        assert flag in out


def test_demo_command_runs_and_rejects_bad_flags(capsys):
    assert main(["demo", "--batch-size", "32", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "Test accuracy" in out and "Peak memory" in out
    assert main(["demo", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs takes a positive whole number" in err
    assert main(["demo", "--budget", "lots"]) == 2
    assert "bad byte quantity 'lots'" in capsys.readouterr().err


def test_demo_on_two_processes_under_torchrun_splits_the_batch_and_trains(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "memfit", "demo", "--nproc", "2", "--batch-size", "64",
                             "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = " ".join(result.stdout.split())
    assert "effective batch 64 over 2 processes (DDP, gloo; 32 samples each)" in out
    assert "the global batch of 64 over 2 ranks: 32 samples each; DDP" in out
    assert out.count("Test accuracy") == 1  # rank 0 speaks for the run


def test_demo_refuses_more_processes_than_samples(capsys):
    assert main(["demo", "--nproc", "3", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a batch of 2 cannot give each of 3 processes a sample" in err
