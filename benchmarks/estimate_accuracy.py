"""How close memfit.estimate() (fake tensors) comes to memfit.measure() (real steps) on CPU.

For every preset small enough to train for real on CPU, and every precision
that runs on CPU (``32-true``, ``bf16-mixed``, ``bf16-true``), with and without
activation checkpointing, two training steps are estimated on fake tensors
(``estimate(..., steps=2, device="cpu").peak``) and run for real under memfit's
tracker (``measure(..., steps=2, device="cpu").peak``):

* ``cifar-cnn``, micro-batch 32; checkpointing ``("*",)``, every top-level module
  (conv1, relu, pool, fc: the model has no nn.ModuleList, so ``"all"`` does not apply);
* ``gpt2-tiny``, micro-batch 8; checkpointing ``("all",)`` (every transformer block);
* ``gpt2`` (124M parameters), sequence 128, micro-batch 2; checkpointing ``("all",)``.

``torch.manual_seed(0)`` runs before each estimate and each measurement. A row
per case gives the two peaks in bytes and the relative error; the last line the
worst. Also printed, for context: the phase of the estimated peak, and the error
on the activations' own maximum (``peak_by_category["activations"]``), where
checkpointing shows: gpt2's overall peak at sequence 128 comes at the end of
backward, when the tied embedding's gradient is summed and the activations are
gone, so it does not move with checkpointing or bf16-mixed.
Target: worst |estimate - measure| / measure <= 1%.

    python benchmarks/estimate_accuracy.py [--presets cifar-cnn gpt2-tiny gpt2] [--gpt2-precisions ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

import memfit

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None

warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad=True.*")

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")

# preset -> (load overrides, micro-batch, checkpoint globs)
CASES = {
    "cifar-cnn": ({}, 32, ("*",)),
    "gpt2-tiny": ({}, 8, ("all",)),
    "gpt2": ({"seq_len": 128}, 2, ("all",)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--gpt2-precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="precisions for gpt2 (124M), whose real steps are the slowest")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, device cpu")
    if args.gpt2_precisions != list(PRECISIONS) and "gpt2" in args.presets:
        print(f"note: gpt2 runs only {', '.join(args.gpt2_precisions)}")
    header = (f"{'preset':<10} {'precision':<10} {'checkpoint':<10} {'estimate B':>14} {'measured B':>14} "
              f"{'error %':>9} {'peak in':>9} {'activ. err %':>13} {'est s':>6} {'meas s':>7}")
    print(header)
    print("-" * len(header))

    worst = 0.0
    n = 0
    start_all = time.perf_counter()
    for name in args.presets:
        overrides, micro_batch, globs = CASES[name]
        precisions = args.gpt2_precisions if name == "gpt2" else PRECISIONS
        for precision in precisions:
            for checkpoint in ((), globs):
                workload = memfit.presets.load(name, **overrides)
                config = memfit.Config(micro_batch=micro_batch, precision=precision, checkpoint=checkpoint)
                torch.manual_seed(0)
                t0 = time.perf_counter()
                est_report = memfit.estimate(workload, config, steps=args.steps, device="cpu").report
                t1 = time.perf_counter()
                torch.manual_seed(0)
                meas_report = memfit.measure(workload, config=config, steps=args.steps, device="cpu")
                t2 = time.perf_counter()
                gc.collect()
                est, meas = est_report.peak, meas_report.peak
                error = (est - meas) / meas
                # Context: the activations' own maximum, which the overall peak hides when
                # it falls where activations are gone (gpt2 at sequence 128).
                act_est = est_report.peak_by_category["activations"]
                act_meas = meas_report.peak_by_category["activations"]
                act_error = (act_est - act_meas) / act_meas
                worst = max(worst, abs(error))
                n += 1
                ckpt = ",".join(checkpoint) if checkpoint else "none"
                print(f"{name:<10} {precision:<10} {ckpt:<10} {est:>14,} {meas:>14,} {100 * error:>+9.3f} "
                      f"{est_report.peak_phase or '-':>9} {100 * act_error:>+13.3f} {t1 - t0:>6.1f} {t2 - t1:>7.1f}", flush=True)
    print(f"total time {time.perf_counter() - start_all:.1f} s")
    print(f"ratio: worst |estimate - measure| / measure = {100 * worst:.3f}% over {n} cases (target <= 1%)")


if __name__ == "__main__":
    main()
