"""Step time with memfit's tracker, and with torch's MemTracker, over the step time without either.

A GPT-2-like model on CPU (4 layers, width 512, sequence 256, batch 4, AdamW),
shapes at which an aten op takes about a millisecond on average (printed), so
the ratio reflects the per-op bookkeeping a real step would pay. Each
configuration runs interleaved with the others, after a warm-up, and the median
of the repeats is compared. Target: memfit <= 1.3x.

    python benchmarks/tracker_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memfit
from memfit.step import run_steps


class _NoopMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _memtracker(model, optimizer):
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, optimizer)
    return mt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    workload = memfit.presets.load(
        "gpt2-tiny", n_layer=4, n_embd=512, n_head=8, seq_len=256, vocab_size=8192
    )
    model = workload.model()
    optimizer = workload.optimizer(model.parameters())
    batch = 4

    def plain():
        run_steps(workload, model, optimizer, batch, 1)

    def with_memfit():
        with memfit.track(model, optimizer) as tracker:
            run_steps(workload, model, optimizer, batch, 1, tracker=tracker)
        return tracker

    def with_memtracker():
        # A fresh MemTracker each step: one refuses a second iteration without reset_mod_stats().
        with _memtracker(model, optimizer):
            run_steps(workload, model, optimizer, batch, 1)

    def with_noop_mode():
        # Context: a TorchDispatchMode that does nothing. On torch 2.13 CPU a Python
        # mode alone changes step time (seen: 0.93x), so it separates memfit's own
        # bookkeeping (memfit / no-op mode) from the effect of any mode at all.
        with _NoopMode():
            run_steps(workload, model, optimizer, batch, 1)

    runs = {"plain": plain, "no-op mode": with_noop_mode, "memfit": with_memfit, "MemTracker": with_memtracker}
    for fn in runs.values():  # warm-up: optimizer state, allocator, lazy imports
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        # Rotate the order each round so that no configuration always runs first.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = runs[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    n_ops = len(with_memfit().report().timeline)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"ops per step: {n_ops}, mean op time without tracking: {1000 * median['plain'] / n_ops:.2f} ms")
    for name in runs:
        print(f"{name:>10}: median step {1000 * median[name]:8.1f} ms")
    print(f"memfit over the no-op mode (bookkeeping alone): {median['memfit'] / median['no-op mode']:.3f}x")
    print(
        f"overhead ratio: memfit {median['memfit'] / median['plain']:.3f}x, "
        f"torch MemTracker {median['MemTracker'] / median['plain']:.3f}x (target memfit <= 1.3x)"
    )


if __name__ == "__main__":
    main()
