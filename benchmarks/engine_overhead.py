"""A memfit Trainer step over the seed article's hand-written loop with the same micro-batching, on CPU.

The hand-written loop is the article's: for each micro-batch, forward, the loss
divided by the number of micro-batches, backward; then ``optimizer.step()`` and
``zero_grad``. The Trainer does the same arithmetic (equal micro-batches, so
the weights agree: printed) plus its bookkeeping: splitting the batch, the
exact-accumulation weights, the OOM guard's snapshot, the detached loss.

Two workloads: the seed article's CNN on 3x32x32 images (batch 256 in 4
micro-batches of 64), and a small MLP whose steps take well under a millisecond,
which shows the fixed per-step cost at its most visible. The two runs
alternate, each going first in every other repeat, after a warm-up; each repeat times ``--steps`` steps, and the median
of the repeats' paired ratios is reported. Target: CNN <= 1.03x.

    python benchmarks/engine_overhead.py [--repeats 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.presets import SeedCNN


def hand_written(model, optimizer, batches, micro: int, after_step=None) -> None:
    """The seed article's accumulation loop (loss / accumulation_steps), one optimizer step per batch."""
    for x, y in batches:
        steps = len(y) // micro
        for i in range(steps):
            loss = F.cross_entropy(model(x[i * micro:(i + 1) * micro]), y[i * micro:(i + 1) * micro]) / steps
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()  # the seed article calls torch.cuda.empty_cache() here


def with_trainer(trainer, batches, micro: int) -> None:
    for batch in batches:
        trainer.step(batch)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def compare(name: str, make_model, make_batch, batch: int, micro: int, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    base_model = make_model()
    trainer_model = copy.deepcopy(base_model)
    base_opt = torch.optim.SGD(base_model.parameters(), lr=0.01, momentum=0.9)
    trainer = memfit.Trainer.from_parts(trainer_model, torch.optim.SGD(trainer_model.parameters(), lr=0.01, momentum=0.9),
                                        _loss, memfit.Config(micro_batch=micro))
    batches = [make_batch(batch) for _ in range(steps)]
    hand_written(base_model, base_opt, batches[:2], micro)  # warm-up (and the same number of updates for both)
    with_trainer(trainer, batches[:2], micro)
    base_times, trainer_times = [], []
    runs = [(lambda: hand_written(base_model, base_opt, batches, micro), base_times),
            (lambda: with_trainer(trainer, batches, micro), trainer_times)]
    for repeat in range(repeats):
        for run, times in runs[::-1] if repeat % 2 else runs:  # alternate which goes first: no order bias
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / steps)
    with torch.no_grad():
        drift = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(trainer_model.parameters(), base_model.parameters()))
    base, ours = statistics.median(base_times), statistics.median(trainer_times)
    # Each repeat's two runs sit side by side in time: the median of their ratios cancels the
    # machine's slow drifts, which on a shared 2-core host move single medians by several percent.
    ratio = statistics.median(t / b for t, b in zip(trainer_times, base_times))
    print(f"{name}: batch {batch} as {batch // micro} x {micro}; hand-written {base * 1e3:.2f} ms/step, "
          f"Trainer {ours * 1e3:.2f} ms/step, paired ratio {ratio:.3f}x "
          f"(best-of ratio {min(trainer_times) / min(base_times):.3f}x; weights agree to {drift:.1e} relative)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
    mlp = compare("small MLP", lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)),
                  lambda n: (torch.randn(n, 32), torch.randint(0, 10, (n,))), 64, 16, args.steps * 5, args.repeats)
    cnn = compare("seed CNN", lambda: SeedCNN(10, 32),
                  lambda n: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), 256, 64, args.steps, args.repeats)
    print(f"ratio: Trainer step / hand-written loop = {cnn:.3f}x on the seed CNN (target <= 1.03x); "
          f"{mlp:.3f}x on a sub-millisecond MLP step")


if __name__ == "__main__":
    main()
