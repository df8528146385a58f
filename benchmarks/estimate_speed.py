"""Wall time of memfit.estimate() over a plain FakeTensorMode run of the same steps, and over torch's MemTracker.

Workload: the ``llama-7b`` preset (Llama 2 7B shapes, 6.74B parameters) at
sequence 2048, micro-batch 1, ``bf16-true``, AdamW, estimated for CUDA, two
training steps. Timed in one process, each from scratch (model built on fake
tensors, cast, optimizer built, steps run):

* (a) ``memfit.estimate(..., steps=2, device="cuda")``: everything included
  (fake build, the first step under memfit's tracker, the second derived from
  its trace, the report, the caching-allocator model);
* (b) the plain fake run: the same build, cast and foreach AdamW, then two
  ``run_steps`` without any tracking (one plain step's time is printed too);
* (c) torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) over the
  same plain build and two steps (``reset_mod_stats()`` before each);
* (d) ``memfit.estimate(..., run_all_steps=True)``: both steps run on fake tensors.

Both Llamas have a run of identical layers, so (a) is extrapolated by depth
(``memfit/depth.py``: traced cut to 1 and 2 layers, checked at 3); (b) and (c)
run the whole model. Then ``llama-70b`` (same config) is estimated once, and once
more with ``extrapolate=False`` (the full trace): every figure, the timeline and
the allocator's replay must be identical. ``llama-13b`` checks that
the derived second step is exact: the default estimate and ``run_all_steps=True``
must agree on peak, at_peak, peak_by_category, by_module, phases and reserved.
A tiny Llama is run through every path first, so lazy imports are not timed.

Targets: memfit estimate <= 2x the plain fake run; llama-70b estimate < 3 s (issue 12)
and identical to its full trace. Every timed estimate starts with ``memfit.traces.clear()``.

(a), (b) and (d) are repeated (``--repeats``, 3 by default, order rotated) and
their medians compared; MemTracker, about a minute, runs once.

    python benchmarks/estimate_speed.py [--quick] [--repeats 3]   # --quick skips llama-70b and llama-13b
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memfit
from memfit.strategies import cast_module
from memfit.step import run_steps
from memfit.workload import Workload

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # the llama presets say what to install
    transformers = None

warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\._tools")

SEQ_LEN = 2048
STEPS = 2
CONFIG = memfit.Config(micro_batch=1, precision="bf16-true")


def _tiny_llama() -> Workload:
    """A 2-layer Llama for the warm-up: the same code paths as llama-7b, at no cost."""
    base = memfit.presets.load("llama-7b", seq_len=64)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, use_cache=False,
    )

    def batch(n: int) -> dict:
        ids = torch.randint(0, 256, (n, 64))
        return {"input_ids": ids, "labels": ids.clone()}

    return Workload(model=lambda: transformers.LlamaForCausalLM(config), batch=batch, loss=base.loss,
                    optimizer=base.optimizer, name="tiny-llama")


def _fake_build(workload: Workload):
    """Model, cast to bf16, foreach AdamW: what memfit.estimate builds for a CUDA target (call under the fake mode)."""
    model = workload.model()
    model.train()
    cast_module(model, torch.bfloat16)
    optimizer = workload.optimizer(model.parameters())
    for group in optimizer.param_groups:
        group["foreach"] = True
    return model, optimizer


def plain_run(workload: Workload) -> dict[str, float]:
    """(b) Build and run STEPS steps under FakeTensorMode without any tracking; seconds per part."""
    times = {}
    start = time.perf_counter()
    with FakeTensorMode():
        model, optimizer = _fake_build(workload)
        times["build"] = time.perf_counter() - start
        for i in range(STEPS):
            t0 = time.perf_counter()
            run_steps(workload, model, optimizer, CONFIG.micro_batch, 1)
            times[f"step{i + 1}"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - start
    return times


def memtracker_run(workload: Workload) -> tuple[float, dict]:
    """(c) The plain run under torch's MemTracker; seconds and its peak snapshot."""
    from torch.distributed._tools.mem_tracker import MemTracker

    start = time.perf_counter()
    with FakeTensorMode():
        model, optimizer = _fake_build(workload)
        mt = MemTracker()
        mt.track_external(model, optimizer)
        with mt:
            for _ in range(STEPS):
                mt.reset_mod_stats()  # MemTracker refuses a second iteration otherwise
                run_steps(workload, model, optimizer, CONFIG.micro_batch, 1)
        peak = mt.get_tracker_snapshot("peak")
    return time.perf_counter() - start, peak


def timed_estimate(workload: Workload, **kwargs) -> tuple[float, memfit.Estimate]:
    memfit.traces.clear()  # every estimate from scratch: no history reused from an earlier one
    start = time.perf_counter()
    est = memfit.estimate(workload, CONFIG, steps=STEPS, device="cuda", **kwargs)
    return time.perf_counter() - start, est


def _fmt_snapshot(snapshot: dict) -> str:
    parts = []
    for dev, by_type in snapshot.items():
        total = by_type.get("Total", sum(v for k, v in by_type.items()))
        kinds = ", ".join(
            f"{getattr(k, 'value', k)} {memfit.format_bytes(v)}" for k, v in by_type.items() if v and k != "Total"
        )
        parts.append(f"{dev}: Total {memfit.format_bytes(total)} ({kinds})")
    return "; ".join(parts)


def check_derivation(name: str) -> bool:
    """Default estimate (second step derived) vs run_all_steps=True: identical figures?"""
    workload = memfit.presets.load(name, seq_len=SEQ_LEN)
    t_derived, derived = timed_estimate(workload)
    gc.collect()
    t_run, run = timed_estimate(workload, run_all_steps=True)
    fields = {
        "peak": (derived.peak, run.peak),
        "at_peak": (derived.at_peak, run.at_peak),
        "peak_by_category": (derived.report.peak_by_category, run.report.peak_by_category),
        "by_module": (derived.by_module, run.by_module),
        "phases": (derived.phases, run.phases),
        "reserved": (derived.reserved, run.reserved),
    }
    exact = all(a == b for a, b in fields.values())
    print(f"{name}: estimate (derived) {t_derived:.2f} s, run_all_steps=True {t_run:.2f} s")
    for label, (a, b) in fields.items():
        if isinstance(a, int):
            print(f"  {label:>16}: derived {a} B ({memfit.format_bytes(a)}), run {b} B -> {'same' if a == b else 'DIFFERENT'}")
        else:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            print(f"  {label:>16}: {len(a)} entries -> {'same' if a == b else 'DIFFERENT in ' + ', '.join(map(str, diff[:8]))}")
    # Not one of the figures above, but estimate()'s docstring promises identical timelines.
    timeline_same = [(e.op, e.module, e.phase, e.step, e.live) for e in derived.report.timeline] == [
        (e.op, e.module, e.phase, e.step, e.live) for e in run.report.timeline
    ]
    line = f"  {'timeline':>16}: derived {len(derived.report.timeline)} ops, run {len(run.report.timeline)} ops -> "
    if timeline_same:
        line += "same (op, module, phase, step, live bytes)"
    else:
        ops_d = Counter(e.op for e in derived.report.timeline)
        ops_r = Counter(e.op for e in run.report.timeline)
        extra = ", ".join(f"{op} x{n}" for op, n in sorted((ops_d - ops_r).items()))
        missing = ", ".join(f"{op} x{n}" for op, n in sorted((ops_r - ops_d).items()))
        line += f"DIFFERENT (only in derived: {extra or 'none'}; only in run: {missing or 'none'})"
    print(line)
    print(f"derivation exact on {name}: {exact} (peak {derived.peak} B, reserved {derived.reserved} B)")
    return exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip llama-70b and the llama-13b derivation check")
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a), (b), (d) on llama-7b (median kept)")
    args = parser.parse_args()
    if transformers is None:
        raise SystemExit("this benchmark needs transformers (the llama presets)")

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")

    # Warm-up: lazy imports (transformers' Llama, optimizers, MemTracker) out of the timings.
    tiny = _tiny_llama()
    plain_run(tiny)
    memtracker_run(tiny)
    timed_estimate(tiny)
    timed_estimate(tiny, run_all_steps=True)
    gc.collect()

    workload = memfit.presets.load("llama-7b", seq_len=SEQ_LEN)
    print(f"workload: llama-7b, seq_len {SEQ_LEN}, {CONFIG.describe()}, AdamW (foreach), {STEPS} steps, target cuda")

    # (a), (b) and (d) take a few seconds each and a shared 2-core machine makes one
    # sample noisy: repeat them, rotating the order, and keep each one's median.
    # MemTracker (c) takes about a minute, so it runs once.
    samples: dict[str, list] = {"a": [], "b": [], "d": []}
    for r in range(args.repeats):
        order = ["a", "b", "d"]
        for key in order[r % 3 :] + order[: r % 3]:
            if key == "a":
                samples["a"].append(timed_estimate(workload))
            elif key == "b":
                samples["b"].append(plain_run(workload))
            else:
                samples["d"].append(timed_estimate(workload, run_all_steps=True))
            gc.collect()
    t_mt, mt_peak = memtracker_run(workload)
    gc.collect()
    est, est_all = samples["a"][0][1], samples["d"][0][1]
    t_memfit = statistics.median(t for t, _ in samples["a"])
    t_all = statistics.median(t for t, _ in samples["d"])
    plain = {k: statistics.median(p[k] for p in samples["b"]) for k in samples["b"][0]}

    def spread(ts) -> str:
        return "" if len(ts) < 2 else f" [{', '.join(f'{t:.2f}' for t in ts)}]"

    print(f"times are medians of {args.repeats} runs [each run] except MemTracker's (one run)")
    print(f"(a) memfit.estimate (step 2 derived):   {t_memfit:7.2f} s  peak {memfit.format_bytes(est.peak)}, "
          f"reserved {memfit.format_bytes(est.reserved)}, {est.parameters / 1e9:.2f}B parameters"
          f"{spread([t for t, _ in samples['a']])}")
    print(f"(b) plain FakeTensorMode run, 2 steps:  {plain['total']:7.2f} s  (build {plain['build']:.2f} s, "
          f"step 1 {plain['step1']:.2f} s, step 2 {plain['step2']:.2f} s){spread([p['total'] for p in samples['b']])}")
    print(f"    plain FakeTensorMode, one step:     {plain['step1']:7.2f} s{spread([p['step1'] for p in samples['b']])}")
    print(f"(c) torch MemTracker, 2 steps:          {t_mt:7.2f} s  peak {_fmt_snapshot(mt_peak)}")
    print(f"(d) memfit.estimate, run_all_steps:     {t_all:7.2f} s  peak {memfit.format_bytes(est_all.peak)} "
          f"({'same as' if est_all.peak == est.peak else 'DIFFERENT from'} (a)), "
          f"{t_all / plain['total']:.2f}x the plain run{spread([t for t, _ in samples['d']])}")
    mt_total = sum(by_type.get("Total", 0) for by_type in mt_peak.values())
    print(f"    peak bytes: memfit {est.peak} B, MemTracker {mt_total} B "
          f"({'same' if mt_total == est.peak else f'differ by {mt_total - est.peak:+} B'}; memfit rounds each "
          "storage up to 512 B for a CUDA target, MemTracker does not on CPU tensors)")
    one_step = plain["build"] + plain["step1"]
    print(f"    (a) over plain build + one step ({one_step:.2f} s, the work (a) runs on fake tensors): "
          f"{t_memfit / one_step:.2f}x")
    print("    memfit at peak: " + ", ".join(f"{k} {memfit.format_bytes(v)}" for k, v in est.at_peak.items() if v)
          + f" (peak in {est.report.peak_phase}, op {est.report.peak_op})")

    t70 = None
    if not args.quick:
        gc.collect()
        seventy_workload = memfit.presets.load("llama-70b", seq_len=SEQ_LEN)
        t70, est70 = timed_estimate(seventy_workload)
        print(f"llama-70b memfit.estimate:              {t70:7.2f} s  peak {memfit.format_bytes(est70.peak)}, "
              f"reserved {memfit.format_bytes(est70.reserved)}, {est70.parameters / 1e9:.2f}B parameters; "
              f"{est70.notes[0] if est70.notes else 'traced in full'}")
        gc.collect()
        t70_full, full70 = timed_estimate(seventy_workload, extrapolate=False)
        a, b = est70.to_dict(), full70.to_dict()
        a.pop("notes"), b.pop("notes")
        identical = a == b and est70.report.timeline == full70.report.timeline and est70.allocator == full70.allocator
        print(f"llama-70b full trace (extrapolate=False): {t70_full:5.2f} s; every figure, the timeline and the "
              f"allocator's replay {'identical' if identical else 'DIFFERENT'}")
        del est70, full70
        gc.collect()
        check_derivation("llama-13b")

    seventy = (f"{t70:.1f} s, {t70_full / t70:.1f}x faster than its full trace and "
               f"{'identical' if identical else 'DIFFERENT'}" if t70 is not None else "skipped (--quick)")
    print(
        f"ratio: memfit estimate / plain fake run (same 2 steps) = {t_memfit / plain['total']:.2f}x (target <= 2x); "
        f"MemTracker / plain = {t_mt / plain['total']:.2f}x; llama-70b estimate {seventy} (target < 3 s)"
    )


if __name__ == "__main__":
    main()
