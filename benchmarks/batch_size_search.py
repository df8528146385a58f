"""Finding the largest micro-batch under a memory budget: memfit against Lightning's and Accelerate's searches.

On CPU, under one simulated budget (``memfit.simulate_budget``: the same
counted bytes, the same CUDA-like out-of-memory error for every method), for
two workloads: the seed article's CIFAR CNN and a 2-layer GPT-2
(``gpt2-tiny``, sequence 128). Each budget is the measured peak of two real
steps at a middling micro-batch (48 and 24), computed here and printed, so the
largest micro-batch that fits is known and neither tiny nor huge.

The methods, side by side in one process:

* memfit: ``memfit.find_batch_size(workload, budget, device="cpu")``: predicts
  on fake tensors, then verifies with two real steps (backing off on OOM).
* Lightning power / binsearch: ``Tuner(trainer).scale_batch_size`` on a small
  ``LightningModule`` around the workload (manual optimization: forward,
  ``manual_backward``, ``step``, ``zero_grad`` inside ``simulate_budget``),
  init_val=2, steps_per_trial=2. binsearch runs with margin=0 (its default
  0.05 would cut its size by 5% more: we compare searches, not safety margins).
* Accelerate: ``find_executable_batch_size`` (starting at 256 for the CNN, 128
  for GPT-2; 0.9x per OOM) around two real steps under ``simulate_budget``.

For each: real micro-steps run (counted in the workload's loss on non-fake
tensors, failed ones included), wall time (of the search call itself;
Lightning's Trainer and module construction are left out), the micro-batch
found, and whether it fits (``memfit.measure(...).peak <= budget``). Round 0
runs each method once first in the process ("cold"); the reported ("warm")
wall time is the median of the ``--repeats`` rounds after it, each round in a
rotated order. Targets: memfit's size >= every peer's, and it fits; memfit's
wall time <= 1/5 of the fastest peer's. The last line gives the largest
(worst) ratio over the workloads, of the warm medians.

    python benchmarks/batch_size_search.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl
from accelerate.utils import find_executable_batch_size
from lightning.pytorch.tuner import Tuner

import memfit
from memfit.step import run_steps
from memfit.workload import build_model, step_loss

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.ERROR)
try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # the GPT-2 workload needs it; the preset says so
    pass

_DATASET_LEN = 8192  # Lightning's max_val: longer than any batch a search tries


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in values:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


class _StepCounter:
    """Counts the workload's loss calls on real tensors: one per real micro-step, failed ones included."""

    def __init__(self) -> None:
        self.real = 0

    def wrap(self, workload: memfit.Workload) -> memfit.Workload:
        inner = workload.loss

        def loss(model, batch):
            if not isinstance(_first_tensor(batch), FakeTensor):
                self.real += 1
            return inner(model, batch)

        # Workload is a frozen dataclass: a new one with the counting loss.
        return dataclasses.replace(workload, loss=loss)


class _Samples(Dataset):
    """Samples of the workload's synthetic batches, one at a time (DataLoader's collate stacks them again)."""

    def __init__(self, workload: memfit.Workload, length: int) -> None:
        self.workload = workload
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return _take_first(self.workload.batch(1))


def _take_first(batch):
    if isinstance(batch, torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return {k: _take_first(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_first(b) for b in batch)
    return batch


class _LitWorkload(pl.LightningModule):
    """The workload as a LightningModule; every step runs inside ``simulate_budget``."""

    def __init__(self, workload: memfit.Workload, budget: int, batch_size: int = 2) -> None:
        super().__init__()
        self.workload = workload
        self.model = build_model(workload)
        self.budget = budget
        self.batch_size = batch_size
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)  # a trial that failed mid-backward can leave gradients behind
        with memfit.simulate_budget(self.budget, self.model, opt.optimizer) as sim:
            sim.mark_inputs(batch)  # made by the DataLoader before the block, as run_steps' are inside it
            loss = step_loss(self.workload.loss(self.model, batch))
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss

    def configure_optimizers(self):
        return self.workload.optimizer(self.model.parameters())

    def train_dataloader(self):
        return DataLoader(_Samples(self.workload, _DATASET_LEN), batch_size=self.batch_size, shuffle=False)


def _memfit(workload, budget, start):
    return memfit.find_batch_size(workload, budget=budget, device="cpu")


def _lightning(mode):
    def search(workload, budget, start):
        module = _LitWorkload(workload, budget)
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=2,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
            )
            tuner = Tuner(trainer)
            begin = time.perf_counter()
            found = tuner.scale_batch_size(
                module, mode=mode, steps_per_trial=2, init_val=2, max_trials=25,
                **({"margin": 0.0} if mode == "binsearch" else {}),
            )
            return found, time.perf_counter() - begin

    return search


def _accelerate(workload, budget, start):
    @find_executable_batch_size(starting_batch_size=start)
    def two_steps(batch_size):
        model = build_model(workload)
        optimizer = workload.optimizer(model.parameters())
        with memfit.simulate_budget(budget, model, optimizer) as sim:
            run_steps(workload, model, optimizer, batch_size, 2, tracker=sim, device="cpu")
        return batch_size

    return two_steps()


METHODS = {
    "memfit": _memfit,
    "Lightning power": _lightning("power"),
    "Lightning binsearch": _lightning("binsearch"),
    "Accelerate": _accelerate,
}


def _run(method, workload, budget, start):
    """(real micro-steps, wall seconds, size found) of one search."""
    counter = _StepCounter()
    counted = counter.wrap(workload)
    begin = time.perf_counter()
    result = METHODS[method](counted, budget, start)
    wall = time.perf_counter() - begin
    if isinstance(result, tuple):  # Lightning times its own search call
        result, wall = result
    return counter.real, wall, int(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the cold one")
    args = parser.parse_args()

    torch.manual_seed(0)
    cases = [
        ("cifar-cnn", memfit.presets.load("cifar-cnn"), 48, 256),
        ("gpt2-tiny seq 128", memfit.presets.load("gpt2-tiny", seq_len=128), 24, 128),
    ]
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} threads, "
          f"1 cold round + {args.repeats} timed rounds")
    names = list(METHODS)
    ratios, size_ok, fits_ok = [], True, True
    for label, workload, reference, start in cases:
        budget = memfit.measure(workload, micro_batch=reference, steps=2).peak
        print(f"\n{label}: budget = peak of 2 real steps at micro-batch {reference} = "
              f"{memfit.format_bytes(budget)} ({budget:,} bytes)")
        cold: dict[str, float] = {}
        times: dict[str, list[float]] = {name: [] for name in names}
        outcome: dict[str, tuple[int, int]] = {}
        for r in range(args.repeats + 1):
            for name in names[r % len(names):] + names[: r % len(names)]:
                steps, wall, found = _run(name, workload, budget, start)
                if name in outcome and outcome[name] != (steps, found):
                    print(f"  note: {name} gave {steps} steps / size {found} in round {r}, "
                          f"{outcome[name][0]} / {outcome[name][1]} before")
                outcome.setdefault(name, (steps, found))
                if r == 0:
                    cold[name] = wall
                else:
                    times[name].append(wall)
        warm = {name: statistics.median(ts) if ts else cold[name] for name, ts in times.items()}
        fits = {name: memfit.measure(workload, micro_batch=found, steps=2).peak <= budget
                for name, (_, found) in outcome.items()}
        print(f"  {'method':<20} {'real steps':>10} {'wall s (warm)':>14} {'wall s (cold)':>14} "
              f"{'batch size':>10} {'fits':>5}")
        for name in names:
            steps, found = outcome[name]
            print(f"  {name:<20} {steps:>10} {warm[name]:>14.3f} {cold[name]:>14.3f} {found:>10} {str(fits[name]):>5}")
        peers = [n for n in names if n != "memfit"]
        fastest = min(peers, key=lambda n: warm[n])
        fastest_cold = min(peers, key=lambda n: cold[n])
        ratio = warm["memfit"] / warm[fastest]
        ratios.append(ratio)
        bigger = all(outcome["memfit"][1] >= outcome[n][1] for n in peers)
        size_ok &= bigger
        fits_ok &= fits["memfit"]
        print(f"  memfit / fastest peer ({fastest}): {ratio:.2f}x warm; "
              f"cold {cold['memfit'] / cold[fastest_cold]:.2f}x (vs {fastest_cold}); "
              f"memfit size >= every peer: {bigger}; memfit size fits: {fits['memfit']}")
    print()
    print(f"ratio: memfit wall time / fastest peer = {max(ratios):.2f}x (target <= 0.20); "
          f"memfit size >= every peer: {size_ok}; all memfit sizes fit: {fits_ok}")


if __name__ == "__main__":
    main()
