"""memfit demo: bundled data, the naive step's OOM, the plan, training under it, in a short mode."""

import io

import pytest
import torch
from rich.console import Console

import memfit
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


def test_demo_refuses_more_processes_than_samples(capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # 3 processes are within the host's cores, not the batch
    assert main(["demo", "--nproc", "3", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a batch of 2 cannot give each of 3 processes a sample" in err


def test_nproc_is_bounded_by_the_hosts_cores_at_parse_time(capsys, monkeypatch):
    import os

    cores = os.cpu_count() or 1
    assert main(["demo", "--nproc", "100000"]) == 2
    err = capsys.readouterr().err
    assert err == (f"memfit: error: argument --nproc: --nproc takes 1 to {cores}, this host's CPU cores "
                   "(os.cpu_count()), got '100000'\n")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert main(["demo", "--nproc", "2"]) == 2
    assert "--nproc takes 1 to 1, this host's CPU cores" in capsys.readouterr().err
    with pytest.raises(memfit.UsageError, match=r"--nproc 2: this host has 1 CPU core \(os.cpu_count\(\)\); give "
                                                r"--nproc 1 or fewer"):
        demo.launch(2, [])


_RANKS = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("memfit: error: rank 1 found no data", file=sys.stderr)
    sys.exit(3)
time.sleep(60)  # rank 0 waits: torchrun ends it once rank 1 failed
"""


def test_a_failed_rank_is_one_line_naming_it_and_its_signal_or_exit_code(tmp_path, capsys, monkeypatch):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    torchrun = demo._torchrun
    # Through the CLI, a rank killed (as the kernel's out-of-memory killer would): one line, exit 1, no traceback.
    monkeypatch.setattr(demo, "_torchrun", lambda nproc, program: torchrun(nproc, [str(script), "kill"]))
    assert main(["demo", "--nproc", "2", "--batch-size", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("memfit: error: --nproc 2: rank 1 (pid ") and "was killed by SIGKILL" in err
    # A rank that exits with a code says so, with its own error's reason.
    with pytest.raises(demo.RankFailed, match=r"^--nproc 2: rank 1 \(pid \d+\) exited with code 3: rank 1 found no "
                                              r"data; torchrun stopped the other ranks$"):
        torchrun(2, [str(script), "exit"])
