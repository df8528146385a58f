"""Wall time of memfit.plan() against the exhaustive search it replaced (issue 12), and the plans they give.

Each case is planned twice in one process, with the trace cache cleared before
each (``memfit.traces.clear()``), so neither reuses the other's traces:

* ``plan(...)``: the search without checkpointing, the checkpoint set chosen from
  its estimates and the winner confirmed (``memfit/candidates.py``), on estimates
  extrapolated by depth (``memfit/depth.py``) and micro-batch (``memfit/traces.py``);
* ``plan(..., exhaustive=True)``: the search of every checkpoint set of the first
  k blocks (k up to 8, powers of two and all), every estimate a full trace: the
  planner before issue 12.

Cases: cifar-cnn (CPU, batch 256) and gpt2-tiny (CPU, batch 64) under a budget
of a third of what their whole batch needs; gpt2 (CUDA, sequence 1024, batch 64,
16 GiB, bf16-mixed); llama-7b (CUDA, sequence 2048, batch 32, 80 GiB, bf16-true
and bf16-mixed); gpt2-large (CUDA, sequence 1024, batch 256, 24 GiB, 32-true and
bf16-mixed: the command of issue 12). "same plan" means the same Config, or one
the cost model ranks cheaper. Then the two commands of issue 12 are timed as a
user runs them, ``memfit plan ...`` in a fresh process (Python's and torch's
imports included), against their targets on this machine (15 s and 20 s).

The last line: the sum of plan() times over the sum of exhaustive times (target
<= 0.1), and whether every plan is the same or better.

    python benchmarks/plan_speed.py [--quick]   # --quick: cifar-cnn, gpt2-tiny and gpt2 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import memfit
from memfit import Config, traces

GiB = 2**30


def _cases(quick: bool):
    cnn = memfit.presets.load("cifar-cnn")
    tiny = memfit.presets.load("gpt2-tiny")
    cases = [
        ("cifar-cnn", cnn, memfit.estimate(cnn, Config(micro_batch=256)).required // 3, 256, ("32-true",), "cpu"),
        ("gpt2-tiny", tiny, memfit.estimate(tiny, Config(micro_batch=64)).required // 3, 64, ("32-true",), "cpu"),
        ("gpt2", memfit.presets.load("gpt2", seq_len=1024), 16 * GiB, 64, ("bf16-mixed",), "cuda"),
    ]
    if not quick:
        cases += [
            ("llama-7b", memfit.presets.load("llama-7b", seq_len=2048), 80 * GiB, 32, ("bf16-true", "bf16-mixed"),
             "cuda"),
            ("gpt2-large", memfit.presets.load("gpt2-large", seq_len=1024), 24 * GiB, 256, ("32-true", "bf16-mixed"),
             "cuda"),
        ]
    return cases


def _timed(workload, budget, batch, precisions, device, exhaustive):
    traces.clear()
    start = time.perf_counter()
    result = memfit.plan(workload, budget, batch, precisions=precisions, device=device, exhaustive=exhaustive)
    return time.perf_counter() - start, result


def _describe(p) -> str:
    c = p.config
    ckpt = f", {len(c.checkpoint)} blocks checkpointed" if c.checkpoint else ""
    return f"{c.precision}, micro-batch {c.micro_batch} x {len(p.accumulation)}{ckpt}, cost {p.step_cost:.3f}"


def _cli(args: list[str]) -> tuple[float, str]:
    """Seconds of ``memfit plan ARGS`` in a fresh process, and its answer in a few words."""
    memfit_cli = Path(sys.executable).with_name("memfit")
    start = time.perf_counter()
    done = subprocess.run([str(memfit_cli), "plan", *args, "--json"], capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode == 1 and "nothing fits" in done.stderr:  # an answer too: what fits nowhere, and the levers
        return took, done.stderr.strip()[len("memfit: error: "):][:160] + "..."
    if done.returncode != 0:
        raise SystemExit(f"memfit plan {' '.join(args)} failed: {done.stderr.strip()}")
    config = json.loads(done.stdout)["config"]
    return took, (f"{config['precision']}, micro-batch {config['micro_batch']}, "
                  f"{len(config['checkpoint'])} blocks checkpointed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the three small cases only")
    args = parser.parse_args()
    # Warm-up: imports and lazy initialisation are not timed.
    memfit.plan(memfit.presets.load("gpt2-tiny"), "200MiB", 8, device="cpu")
    fast_total = slow_total = 0.0
    same = True
    print(f"{'case':<11} {'plan()':>8} {'exhaustive':>11} {'ratio':>6}  estimates  plans")
    for name, workload, budget, batch, precisions, device in _cases(args.quick):
        fast_s, fast = _timed(workload, budget, batch, precisions, device, exhaustive=False)
        slow_s, slow = _timed(workload, budget, batch, precisions, device, exhaustive=True)
        fast_total += fast_s
        slow_total += slow_s
        # step_cost is relative to the same ideal in both plans: comparable.
        ok = fast.config == slow.config or fast.step_cost <= slow.step_cost
        same &= ok
        print(f"{name:<11} {fast_s:7.1f}s {slow_s:10.1f}s {fast_s / slow_s:6.3f}  "
              f"{fast.extra['estimates']:>3} / {slow.extra['estimates']:<3}  "
              f"{'same' if fast.config == slow.config else ('better' if ok else 'WORSE')}: {_describe(fast)}"
              + ("" if fast.config == slow.config else f" | exhaustive: {_describe(slow)}"), flush=True)
    if not args.quick:
        for command, target in (("gpt2-large --budget 24GiB -b 256 --seq-len 1024 --precision 32-true bf16-mixed", 15),
                                ("llama-70b --budget 80GiB -b 64 --seq-len 4096 --precision bf16-true bf16-mixed",
                                 20)):
            took, answer = _cli(command.split())
            print(f"memfit plan {command}: {took:.1f} s wall in a fresh process (target < {target} s): {answer}",
                  flush=True)
    print(f"ratio: plan time / exhaustive = {fast_total / slow_total:.3f} (target <= 0.1); same plan: {same}")


if __name__ == "__main__":
    main()
