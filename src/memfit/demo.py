"""``memfit demo``: the project's job end to end, on data bundled with scikit-learn (nothing is downloaded).

The seed article's CNN trains on scikit-learn's 8x8 digits, resized to 3x32x32
(the article's CIFAR-10 shape), at an effective batch that does not fit a
simulated device in one piece. The demo shows the naive step failing with
CUDA's out-of-memory error, the plan memfit makes (micro-batch, accumulation,
precision, checkpointing), the training run under that plan with a progress
bar, and the test accuracy and peak memory against the budget.

``memfit demo --nproc N`` runs the same job on N CPU processes under torchrun
(gloo): the effective batch is the global one, each rank trains on its share of
it through a ``DistributedSampler`` under DDP, the plan is one rank's
(:func:`memfit.plan` with ``world_size``), and rank 0 prints.

Known limitations: the device is simulated on CPU (:func:`memfit.simulate_budget`
counts exactly what a tracker counts, not a CUDA allocator's fragmentation); the
CNN has no repeated blocks, so the distributed demo runs DDP, not FSDP.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfit import presets
from memfit.budget import simulate_budget
from memfit.checks import positive_int
from memfit.config import Config
from memfit.engine import Trainer
from memfit.errors import MemfitError, UsageError
from memfit.estimator import estimate
from memfit.planner import plan
from memfit.step import run_steps
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Workload

__all__ = ["DemoResult", "RankFailed", "digits", "digits_workload", "run", "launch"]

_IMAGE = 32
_TEST_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class DemoResult:
    budget: int
    """The simulated device's bytes."""
    naive_fits: bool
    """Whether the whole batch fitted in one step (it should not, with the default budget)."""
    config: Config
    accumulation: tuple[int, ...]
    peak: int
    """The highest step peak of the training run, bytes."""
    accuracy: float
    """Test-set accuracy after training, 0..1."""
    steps: int
    retries: int


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as 3x32x32 images in [-1, 1]: ``(train_x, train_y, test_x, test_y)``, 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the Makefile installs it
        raise UsageError("memfit demo needs scikit-learn for its bundled digits: pip install 'memfit[demo]'") from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), 0..1
    images = F.interpolate(images, size=(_IMAGE, _IMAGE), mode="bilinear", align_corners=False)
    images = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5  # three channels, as the article's CIFAR-10 input
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * _TEST_SHARE)
    test, train = order[:n_test], order[n_test:]
    return images[train].contiguous(), labels[train], images[test].contiguous(), labels[test]


def digits_workload() -> Workload:
    """The seed article's step: its CNN on 3x32x32 images, cross-entropy, SGD lr 0.01 momentum 0.9.

    The ``cifar-cnn`` preset: its batch factory makes random images of the digits'
    shape, for estimates; training batches come from the data loader.
    """
    return dataclasses.replace(presets.load("cifar-cnn", image_size=_IMAGE), name="digits-cnn")


def default_budget(workload: Workload, batch_size: int) -> int:
    """A device about a quarter of the batch fits on: the requirement of batch/4, rounded up to 1/8 MiB."""
    need = estimate(workload, Config(micro_batch=max(1, batch_size // 4))).required
    step = 1 << 17
    return -(-need // step) * step


def run(console, *, batch_size: int = 256, epochs: int = 8, budget: int | str | None = None, seed: int = 0) -> DemoResult:
    """Run the demo, printing to the rich ``console``; returns the figures it printed."""
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.rule import Rule

    from memfit.display import render_plan

    positive_int(batch_size, "batch size", noun="whole number")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if batch_size < world:
        raise UsageError(f"a batch of {batch_size} cannot give each of {world} processes a sample; give --batch-size "
                         f"{world} or more")
    if rank != 0:
        console = Console(file=io.StringIO())  # one process speaks for the run
    share = -(-batch_size // world)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits(seed)
    workload = digits_workload()
    budget = parse_bytes(budget) if budget is not None else default_budget(workload, share)
    console.print(Rule("memfit demo"))
    console.print(f"The seed article's CNN on scikit-learn's digits ({len(train_y)} training, {len(test_y)} test images, "
                  f"3x32x32), effective batch {batch_size}"
                  + (f" over {world} processes (DDP, gloo; {share} samples each)" if world > 1 else "")
                  + f", on a simulated device of {format_bytes(budget)}" + (" each." if world > 1 else "."))

    console.print(Rule("1. The naive step: " + ("the whole batch at once" if world == 1 else "a rank's whole share at once")))
    naive_fits = _naive_step(workload, share, budget, console)

    console.print(Rule("2. The plan"))
    chosen = plan(workload, budget, batch_size, device="cpu", world_size=world,
                  strategies=("ddp",) if world > 1 else None)
    console.print(render_plan(chosen, width=min(console.width, 100)), end="", markup=False, highlight=False)

    console.print(Rule("3. Training under the plan"))
    dataset = torch.utils.data.TensorDataset(train_x, train_y)
    if world > 1:  # each rank its share of every batch, reshuffled each epoch (fit calls set_epoch)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                                      drop_last=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=share, sampler=sampler)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(workload, chosen, device="cpu", budget=budget)
    logger = logging.getLogger("memfit")
    handler = RichHandler(console=console, show_time=False, show_path=False)
    logger.addHandler(handler)
    try:
        fit = trainer.fit(loader, epochs=epochs, log_every=len(loader), console=console)
    finally:
        logger.removeHandler(handler)

    console.print(Rule("4. Result"))
    accuracy = _accuracy(trainer, test_x, test_y)
    console.print(f"Test accuracy {accuracy:.1%} after {epochs} epoch{'s' if epochs > 1 else ''} "
                  f"({fit.steps} steps of {batch_size}, {fit.seconds:.1f} s).")
    console.print(f"Peak memory {format_bytes(fit.peak)} of the {format_bytes(budget)} budget "
                  f"({fit.peak / budget:.0%}); the plan predicted {format_bytes(chosen.required)}; "
                  f"{fit.retries} out-of-memory retries.")
    return DemoResult(budget=budget, naive_fits=naive_fits, config=trainer.config, accumulation=chosen.accumulation,
                      peak=fit.peak, accuracy=accuracy, steps=fit.steps, retries=fit.retries)


def launch(nproc: int, argv: list[str]) -> int:
    """``memfit demo --nproc N``: the demo on ``nproc`` CPU processes under torchrun; 0 once every rank finished.

    Raises:
        UsageError: ``nproc`` is not 1 to this host's CPU cores.
        RankFailed: a rank failed; the message is one line naming it and its exit code or signal.
    """
    cores = os.cpu_count() or 1
    positive_int(nproc, "--nproc", hint="CPU processes to train on")
    if nproc > cores:
        raise UsageError(f"--nproc {nproc}: this host has {cores} CPU core{'s' if cores > 1 else ''} "
                         f"(os.cpu_count()); give --nproc {cores} or fewer")
    _torchrun(nproc, ["-m", "memfit", "demo", *argv])
    return 0


class RankFailed(MemfitError):
    """A process of ``memfit demo --nproc N`` failed (an exit code, a signal); torchrun stopped the others."""


def _torchrun(nproc: int, program: list[str]) -> None:
    """``python program`` on ``nproc`` processes under torchrun (standalone, one node), its stderr kept: passed on
    once every rank finished, summed up in one line (:class:`RankFailed`) where one failed, instead of torchrun's
    traceback and the other ranks' consequent errors."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *program]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(command, env=env, check=False, stderr=subprocess.PIPE, text=True, errors="replace")
    if done.returncode == 0:
        sys.stderr.write(done.stderr)
        return
    raise RankFailed(_failure(done.stderr, done.returncode, nproc))


# torchrun's ChildFailedError report names the first failure as "Root Cause": its rank and exit code (negative:
# the signal that ended it), checked on torch 2.13.
_ROOT_CAUSE = re.compile(r"Root Cause.*?\brank\s*:\s*(\d+).*?\bexitcode\s*:\s*(-?\d+)(?:\s*\(pid:\s*(\d+)\))?",
                         re.DOTALL)


def _failure(stderr: str, returncode: int, nproc: int) -> str:
    """One line for a failed torchrun: the rank that failed first, with its signal or exit code and, where it said
    why (memfit's one-line error), its reason."""
    said = [line.partition("memfit: error: ")[2].strip() for line in stderr.splitlines() if "memfit: error: " in line]
    match = _ROOT_CAUSE.search(stderr)
    if match is None:  # torchrun itself failed (its rendezvous, its arguments): its last words
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no message")
        return f"--nproc {nproc}: torchrun failed with exit code {returncode}: {last}"
    rank, code, pid = int(match.group(1)), int(match.group(2)), match.group(3)
    who = f"rank {rank}" + (f" (pid {pid})" if pid else "")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        outside = " (from outside the run: the kernel's out-of-memory killer sends it)" if name == "SIGKILL" else ""
        return f"--nproc {nproc}: {who} was killed by {name}{outside}; torchrun stopped the other ranks"
    return (f"--nproc {nproc}: {who} exited with code {code}" + (f": {said[0]}" if said else "")
            + "; torchrun stopped the other ranks")


def _naive_step(workload: Workload, batch_size: int, budget: int, console) -> bool:
    """The seed article's step on the whole batch under the budget; prints CUDA's error if it does not fit."""
    from memfit.workload import build_model

    model = build_model(workload)
    optimizer = workload.optimizer(model.parameters())
    try:
        with simulate_budget(budget, model, optimizer) as sim:
            run_steps(workload, model, optimizer, batch_size, 1, tracker=sim)
    except torch.OutOfMemoryError as exc:
        console.print(f"[red]torch.OutOfMemoryError:[/] {str(exc).split(' Simulated')[0]}", highlight=False)
        console.print(f"A batch of {batch_size} needs more than the {format_bytes(budget)} device has.")
        return False
    console.print(f"The whole batch fits in {format_bytes(budget)} (peak {format_bytes(sim.peak)}): nothing to fix.")
    return True


@torch.no_grad()
def _accuracy(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    model = trainer.model
    model.eval()
    correct = 0
    step = trainer.config.micro_batch  # evaluation in micro-batches too: no graph, smaller still
    for i in range(0, len(y), step):
        correct += int((model(x[i:i + step].to(trainer.device)).argmax(1) == y[i:i + step].to(trainer.device)).sum())
    model.train()
    return correct / len(y)
