"""memfit's estimates against two published figures.

1. Model states of mixed-precision Adam: 16 bytes per parameter (Rajbhandari et
   al., ZeRO, 2020: fp16 weights 2 + fp16 gradients 2 + fp32 master weights 4 +
   momentum 4 + variance 4). PyTorch's autocast keeps the fp32 weights as the
   parameters and the gradients in fp32 (4 + 4 + 4 + 4): the same 16 bytes, split
   differently, plus a 4-byte step counter per parameter tensor.
2. Activations saved per transformer block: s*b*h*(34 + 5*a*s/h) bytes for 16-bit
   activations (Korthikanti et al., "Reducing Activation Recomputation in Large
   Transformer Models", 2022, eq. 1), where s is the sequence, b the batch, h the
   width and a the number of heads. memfit measures the activations each GPT-2
   block adds during the forward pass (bf16-mixed, on fake tensors), with eager
   attention (which keeps the s x s scores, as the paper assumes) and with SDPA
   (a fused kernel that keeps none: compare with 34*s*b*h).

    python benchmarks/published_figures.py [--seq-len 1024] [--batch 2]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import memfit


def model_states_per_parameter() -> float:
    workload = memfit.presets.load("gpt2", seq_len=64)
    est = memfit.estimate(workload, memfit.Config(micro_batch=1, precision="bf16-mixed"), steps=1)
    own = est.report.peak_by_category
    n_tensors = len(list(workload.model().parameters()))
    states = own["parameters"] + own["gradients"] + own["optimizer_state"]
    step_counters = 4 * n_tensors
    per_param = (states - step_counters) / est.parameters
    print(f"gpt2 ({est.parameters:,} parameters), bf16-mixed AdamW:")
    print(f"  parameters {own['parameters']:,} B, gradients {own['gradients']:,} B, "
          f"optimizer state {own['optimizer_state']:,} B (of which {step_counters:,} B of step counters)")
    print(f"  model states: {per_param:.3f} bytes per parameter (ZeRO: 16)")
    return per_param / 16


def activations_per_block(seq: int, batch: int, attention: str) -> tuple[float, float, float]:
    workload = memfit.presets.load("gpt2", seq_len=seq, attention=attention, dropout=0.1)
    est = memfit.estimate(workload, memfit.Config(micro_batch=batch, precision="bf16-mixed"), steps=1, device="cuda")
    n_layer, h, a = 12, 768, 12
    after_block = {}
    for entry in est.report.timeline:
        if entry.phase != "forward" or entry.step != 0 or not entry.module:
            continue
        parts = entry.module.split(".")
        if len(parts) >= 3 and parts[:2] == ["transformer", "h"]:
            after_block[int(parts[2])] = entry.live["activations"]
    per_block = (after_block[n_layer - 1] - after_block[0]) / (n_layer - 1)
    sbh = seq * batch * h
    paper = sbh * (34 + 5 * a * seq / h)
    print(f"gpt2 block, s={seq}, b={batch}, {attention} attention: {per_block / 2**20:.1f} MiB per block = "
          f"{per_block / sbh:.1f} sbh; Korthikanti: {paper / 2**20:.1f} MiB = {paper / sbh:.1f} sbh; "
          f"ratio {per_block / paper:.3f}; against 34 sbh alone: {per_block / (34 * sbh):.3f}")
    return per_block, paper, per_block / sbh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    states_ratio = model_states_per_parameter()
    eager, eager_paper, _ = activations_per_block(args.seq_len, args.batch, "eager")
    sdpa, _, _ = activations_per_block(args.seq_len, args.batch, "sdpa")
    print(
        f"ratio: model states / ZeRO's 16 B per parameter = {states_ratio:.3f}; "
        f"activations per block / Korthikanti's sbh(34 + 5as/h) = {eager / eager_paper:.3f} (eager), "
        f"{sdpa / eager_paper:.3f} (sdpa)"
    )


if __name__ == "__main__":
    main()
