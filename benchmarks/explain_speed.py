"""`memfit explain` on Llama 2 7B: its time from the command line, and each fix checked against its own estimate.

The case of issue 14: ``memfit explain llama-7b -b 4 --seq-len 4096 --budget 80GB`` (fp32 AdamW,
a step that needs about 270 GB). Timed as a user runs it, a fresh process, imports included,
beside the baseline of ``memfit estimate`` of the same step (one estimate; explain adds the
fixes' estimates, run in worker processes). Then each fix the explanation lists is estimated
again in this process, apart from the explanation, and its required bytes and saving compared
to the byte.

Last line: ``ratio: explain / estimate wall time = X (explain N s, target < 20 s)``.

Run: ``.venv/bin/python benchmarks/explain_speed.py``
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

ARGS = ["llama-7b", "-b", "4", "--seq-len", "4096"]
BUDGET = "80GB"


def _cli(*args: str) -> tuple[float, str]:
    memfit = os.path.join(os.path.dirname(sys.executable), "memfit")
    start = time.perf_counter()
    out = subprocess.run([memfit, *args], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out


def main() -> None:
    estimate_s, _ = _cli("estimate", *ARGS, "--budget", BUDGET, "--json")
    explain_s, out = _cli("explain", *ARGS, "--budget", BUDGET, "--json")
    data = json.loads(out)
    print(f"memfit estimate {' '.join(ARGS)}: {estimate_s:.1f} s")
    print(f"memfit explain  {' '.join(ARGS)} --budget {BUDGET}: {explain_s:.1f} s, needs {data['required']:,} B, "
          f"{len(data['fixes'])} fixes, combined: {data['combined']['lever'] if data['combined'] else None}")

    import memfit
    from memfit import presets

    workload = presets.load("llama-7b", seq_len=4096)
    base = memfit.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
    worst = 0
    for fix in data["fixes"] + ([data["combined"]] if data["combined"] else []):
        change = {k: tuple(v) if isinstance(v, list) else v for k, v in fix["change"].items()}
        config = dataclasses.replace(base, **change)
        w = workload
        if fix["lever"].startswith("bitsandbytes.optim."):
            import bitsandbytes
            import torch

            probe = workload.optimizer([torch.nn.Parameter(torch.zeros(1))])
            cls = getattr(bitsandbytes.optim, fix["lever"].rpartition(".")[2])
            hyper = {k: probe.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
            w = dataclasses.replace(workload, optimizer=lambda p, cls=cls, hyper=hyper: cls(p, **hyper))
        share = -(-data["batch_size"] // fix["world_size"])
        est = memfit.estimate(w, config, device="cuda", world_size=fix["world_size"],
                              accumulation=2 if config.micro_batch < share else 1)
        off = abs(est.required - fix["required"]) + abs((data["required"] - est.required) - fix["saves"])
        worst = max(worst, off)
        print(f"  {fix['lever']}: saves {memfit.format_bytes(fix['saves'])}, needs {memfit.format_bytes(fix['required'])}"
              f", fits {fix['fits']}; separate estimate {est.required:,} B ({'exact' if off == 0 else f'off by {off:,} B'})")
    print(f"fixes against separate estimates: worst difference {worst:,} bytes")
    print(f"ratio: explain / estimate wall time = {explain_s / estimate_s:.2f} (explain {explain_s:.1f} s, "
          "target < 20 s)")


if __name__ == "__main__":
    main()
