"""Small workloads with the features estimate() must get right, shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memfit


class BlockCNN(nn.Module):
    """A CNN with BatchNorm and dropout, its blocks in an nn.ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2))
            for c_in in (3, 16, 16)
        )
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 256, width: int = 64, depth: int = 3, self_checkpoint: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.self_checkpoint = self_checkpoint

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            if self.self_checkpoint and torch.is_grad_enabled():
                x = x + checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return self.head(x)


def _lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1), reduction="sum"), batch[:, 1:].numel()


def block_cnn() -> memfit.Workload:
    return memfit.Workload(
        model=BlockCNN,
        batch=lambda n: (torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        name="block-cnn",
    )


def tied_lm(self_checkpoint: bool = False) -> memfit.Workload:
    return memfit.Workload(
        model=lambda: TiedLM(self_checkpoint=self_checkpoint),
        batch=lambda n: torch.randint(0, 256, (n, 33)),
        loss=_lm_loss,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        name="tied-lm-self-checkpoint" if self_checkpoint else "tied-lm",
    )


ZOO = {
    "block-cnn": block_cnn,
    "gpt2-tiny": lambda: memfit.presets.load("gpt2-tiny"),
    "tied-lm": tied_lm,
    "self-checkpoint": lambda: tied_lm(self_checkpoint=True),
}
