"""A small training job with every kind of randomness, for the resume tests.

Run as a script (``python resume_job.py LOADER SAVE_PATH KILL_AT``) it trains,
saving after every step, and kills its own process with SIGKILL right after the
save at step KILL_AT, as a pre-empted job dies.
"""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from memfit import Config, Trainer

SAMPLES, BATCH, EPOCHS = 40, 8, 3  # five batches an epoch, fifteen steps


class NoisyDigits(Dataset):
    """Fixed data; each fetch adds NumPy noise and flips a Python coin: augmentations that draw from both."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, 8, generator=g)
        self.y = torch.randint(0, 4, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i):
        x = self.x[i] + torch.from_numpy(np.random.normal(0, 0.1, 8).astype("float32"))
        return (-x if random.random() < 0.5 else x), self.y[i]


class Wrapped:
    """A custom iterable around a DataLoader (its generator is one attribute down)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        for x, y in self.loader:
            yield x * 2, y

    def __len__(self) -> int:
        return len(self.loader)


def loader(kind: str):
    data = NoisyDigits()
    if kind == "generator":
        return DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    if kind == "global":
        return DataLoader(data, batch_size=BATCH, shuffle=True)
    if kind == "set_epoch":
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=5))
    if kind == "wrapped":
        return Wrapped(DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2)))
    raise ValueError(kind)


def trainer() -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Trainer.from_parts(model, optimizer, lambda m, b: F.cross_entropy(m(b[0]), b[1]), Config(micro_batch=3),
                              device="cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def main(kind: str, path: str, kill_at: int) -> None:
    seed_everything(1234)
    run = trainer()
    save = run.save

    def save_then_die(p):
        save(p)
        if run.step_count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run.save = save_then_die
    run.fit(loader(kind), EPOCHS, save_to=path, save_every=1, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
