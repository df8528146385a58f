"""Step time with ``torch.cuda.empty_cache()`` after every step (the seed article's loop) over without it.

The seed article calls ``empty_cache()`` after each optimizer step "to free
memory". It frees nothing PyTorch could use: the caching allocator already
reuses those blocks, and handing them back to the driver means the next step
pays ``cudaMalloc`` for them again (and ``cudaFree`` synchronises the device).
memfit's Trainer calls it only after an out-of-memory error, before the retry.
The transformers Trainer once called it every step and measured the slowdown
(huggingface/transformers#31372; removed in #31530).

Needs CUDA: on a machine without one it says so and prints no ratio.

    python benchmarks/empty_cache.py [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_overhead import hand_written  # the seed article's loop (benchmarks/ is on sys.path when run as a script)

from memfit.presets import SeedCNN


def run(model, optimizer, batches, micro: int, empty_cache: bool) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    hand_written(model, optimizer, batches, micro, after_step=torch.cuda.empty_cache if empty_cache else None)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("ratio: not measured: this benchmark needs a CUDA device (torch.cuda.is_available() is False)")
        return
    model = SeedCNN(10, 32).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(256, 3, 32, 32, device="cuda"), torch.randint(0, 10, (256,), device="cuda"))
               for _ in range(args.steps)]
    run(model, optimizer, batches[:3], 64, False)  # warm-up: cuDNN choices, the allocator's cache
    plain, emptied = [], []
    for _ in range(args.repeats):
        plain.append(run(model, optimizer, batches, 64, False))
        emptied.append(run(model, optimizer, batches, 64, True))
    a, b = statistics.median(plain), statistics.median(emptied)
    print(f"{torch.cuda.get_device_name()}: {a * 1e3:.2f} ms/step without, {b * 1e3:.2f} ms/step with empty_cache()")
    print(f"ratio: step time with empty_cache() every step / without = {b / a:.3f}x")


if __name__ == "__main__":
    main()
