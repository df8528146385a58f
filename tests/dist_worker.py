"""What each rank of a distributed test runs (a module of its own: spawned processes import it by name).

Every function here is ``fn(rank, world_size, port, case, out)``: it joins a gloo process group on
``port``, trains or estimates as ``case`` says, and writes what the parent checks to ``out``
(one file per rank).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import memfit

VOCAB, DIM, SEQ = 11, 6, 5


class TinyLM(nn.Module):
    """An embedding, a ModuleList of blocks (what FSDP shards), a head: float64 so sums agree to 1e-12."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(blocks))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM().double()


def batches(sizes: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    """Logical batches of token sequences with padding (-100 labels) of varying length."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        keep = torch.randint(1, SEQ + 1, (n, 1), generator=g)
        labels[torch.arange(SEQ).expand(n, SEQ) >= keep] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out


def mean_loss(model: nn.Module, batch) -> torch.Tensor:
    """A mean over the batch's samples (every token counts: the labels' padding is ignored by nothing)."""
    logits = model(batch["tokens"])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch["tokens"].flatten())


def token_loss(model: nn.Module, batch):
    """(loss_sum, n_items) over the labels that are not padding."""
    logits = model(batch["tokens"])
    labels = batch["labels"].flatten()
    loss_sum = nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()


LOSSES = {"mean": mean_loss, "token": token_loss}


def optimizer(params):
    return torch.optim.AdamW(params, lr=0.05)


def reference(case: dict) -> dict[str, torch.Tensor]:
    """One process, each logical batch whole, the loss's own math: what every distributed run must equal."""
    net = model()
    opt = optimizer(net.parameters())
    for batch in batches(case["sizes"]):
        out = LOSSES[case["loss"]](net, batch)
        loss = out if isinstance(out, torch.Tensor) else out[0] / out[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def rank_part(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous part of a logical batch (the first ranks get one more where it does not divide)."""
    n = batch["tokens"].shape[0]
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return {k: v[start:stop] for k, v in batch.items()}


class InjectOOM(TorchDispatchMode):
    """CUDA's OOM once, at the ``at``-th op this rank runs in the step's ``phase`` (forward, backward, reduce,
    optimizer), counting only ops named ``op`` where given (FSDP's ``all_gather_copy_in``, the all-gather's
    copy into its buffer; ``chunk_cat``, the reduce-scatter's)."""

    def __init__(self, trainer, phase: str, at: int, op: str | None = None, kill: bool = False) -> None:
        super().__init__()
        self.trainer, self.phase, self.at, self.op, self.seen, self.fired = trainer, phase, at, op, 0, False
        self.kill = kill  # this process dies there instead (SIGKILL, as a pre-empted or OOM-killed job does)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        attempt = self.trainer._attempt
        if (not self.fired and attempt.running and attempt.phase == self.phase
                and (func.namespace == "aten" if self.op is None else func._opname == self.op)):
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                if self.kill:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected on one rank)")
        return func(*args, **(kwargs or {}))


def _broken(model, batch):
    raise ValueError("a bug in this rank's loss")


def join(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def train(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """Train ``case`` on this rank's part of each logical batch; save the full weights and what happened."""
    join(rank, world, port)
    try:
        workload = memfit.Workload(model=model, batch=lambda n: batches((n,))[0], loss=LOSSES[case["loss"]],
                                   optimizer=optimizer)
        config = memfit.Config(micro_batch=case["micro_batch"], strategy=case["strategy"],
                               reshard_after_forward=case.get("reshard", True),
                               sync_every_micro_step=case.get("sync", False))
        trainer = memfit.Trainer(workload, config, device="cpu", timeout=case.get("timeout", 60))
        inject = case.get("inject")
        results = []
        for i, batch in enumerate(batches(case["sizes"])):
            part = rank_part(batch, rank, world)
            if inject and rank == inject["rank"] and i == inject.get("step", 0):
                if inject["phase"] == "loss error":  # a bug on one rank: every rank must stop, none hang
                    trainer._attempt.loss = _broken
                    try:
                        trainer.step(part)
                    except Exception as exc:  # noqa: BLE001 - what the parent checks
                        torch.save({"error": type(exc).__name__}, os.path.join(out, f"rank{rank}.pt"))
                        return
                with InjectOOM(trainer, inject["phase"], inject["at"], inject.get("op")) as mode:
                    results.append(trainer.step(part))
                assert mode.fired, "the injected OOM never fired"
            else:
                try:
                    results.append(trainer.step(part))
                except memfit.MemfitError as exc:
                    torch.save({"error": type(exc).__name__, "message": str(exc)}, os.path.join(out, f"rank{rank}.pt"))
                    return
        state = trainer.full_state_dict()
        torch.save({"state": state, "retries": [r.retries for r in results],
                    "micro_batches": [r.micro_batches for r in results],
                    "loss": [float(r.loss_tensor) for r in results], "config": trainer.config.micro_batch},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def fit(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """``Trainer.fit`` over a DataLoader with a DistributedSampler; rank 0 alone writes the save."""
    join(rank, world, port)
    try:
        data = batches(case["sizes"])
        dataset = torch.utils.data.StackDataset(**{k: torch.cat([b[k] for b in data]) for k in data[0]})
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=case["sizes"][0] // world, sampler=sampler)
        workload = memfit.Workload(model=model, batch=lambda n: batches((n,))[0], loss=LOSSES[case["loss"]],
                                   optimizer=optimizer)
        trainer = memfit.Trainer(workload, memfit.Config(micro_batch=2, strategy=case["strategy"]), device="cpu")
        result = trainer.fit(loader, progress=False, save_to=os.path.join(out, "run.pt"))
        torch.save({"state": trainer.full_state_dict(), "steps": result.steps}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def workload(loss: str = "token") -> memfit.Workload:
    return memfit.Workload(model=model, batch=lambda n: batches((n,))[0], loss=LOSSES[loss], optimizer=optimizer)


def measure(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """Each of ``case["cases"]``: two plain steps of a DDP or FSDP2 model under memfit's tracker; this rank's report.

    The tracker sees what the step's ops allocate; DDP's buckets are allocated by its constructor, before
    the tracker starts: gradients set before wrapping become views of them (DDP's gradient_as_bucket_view),
    so the tracker counts them from the start, then they are dropped and the buckets stay.
    """
    from memfit.sharding import Sharding, no_sync
    from memfit.step import run_steps
    from memfit.strategies import Recipe

    join(rank, world, port)
    results = []
    try:
        for spec in [spec for spec in case["cases"] for _ in range(case.get("repeats", 1))]:
            config = memfit.Config(micro_batch=spec["micro_batch"], strategy=spec["strategy"],
                                   reshard_after_forward=spec.get("reshard", True),
                                   sync_every_micro_step=spec.get("sync", False))
            net = model()
            if config.strategy == "ddp":
                for p in net.parameters():
                    p.grad = torch.zeros_like(p)
                wrapped = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True)
            else:
                wrapped = Sharding(config, torch.device("cpu")).apply(net)
            opt = optimizer(wrapped.parameters())
            with memfit.track(wrapped, opt, device="cpu") as tracker:
                if config.strategy == "ddp":
                    tracker.add_category("ddp_buckets", strength=35)
                    tracker.mark([p.grad for p in net.parameters()], "ddp_buckets")
                    net.zero_grad(set_to_none=True)
                run_steps(workload(), wrapped, opt, config.micro_batch, 2, tracker=tracker, recipe=Recipe(config, "cpu"),
                          accumulation=spec["accumulation"],
                          no_sync=None if config.strategy == "ddp" or config.sync_every_micro_step
                          else lambda: no_sync(wrapped))
            report = tracker.report()
            results.append({"peak": report.peak, "at_peak": dict(report.at_peak)})
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def resume_run(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """``fit`` over 2 shuffled epochs saving every step to ``out/run``: ``case["phase"]`` is ``"kill"`` (this
    process kills itself with SIGKILL right after the save at step ``kill_at``, as a pre-empted job dies),
    ``"resume"`` (load that save, fit to the end) or ``"full"`` (no interruption); the final weights to ``out``."""
    import signal

    join(rank, world, port)
    try:
        torch.manual_seed(0)
        data = batches((24,))[0]
        dataset = torch.utils.data.StackDataset(**data)
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
        config = memfit.Config(micro_batch=2, strategy=case["strategy"])
        trainer = memfit.Trainer(workload(), config, device="cpu", timeout=60)
        path = os.path.join(out, "run")
        if case["phase"] == "resume":
            trainer.load(path)
        save = trainer.save

        def save_then_die(p):
            save(p)
            if case["phase"] == "kill" and trainer.step_count == case["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save = save_then_die
        result = trainer.fit(loader, 2, progress=False, save_to=path, save_every=1)
        torch.save({"state": trainer.full_state_dict(), "steps": result.steps, "step_count": trainer.step_count},
                   os.path.join(out, f"{case['phase']}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def matrix(rank: int, world: int, port: int, case: dict, out: str) -> None:
    """Each of ``case["cells"]`` on a fresh Trainer: an OOM injected on rank 1 in the first logical batch (as
    :class:`InjectOOM` says), then the rest of ``SIZES``; per cell the final weights and retries, or the error
    that stopped this rank and the seconds its step took to raise it."""
    import time

    join(rank, world, port)
    outcomes = []
    try:
        for cell in case["cells"]:
            workload = memfit.Workload(model=model, batch=lambda n: batches((n,))[0], loss=LOSSES[cell["loss"]],
                                       optimizer=optimizer)
            config = memfit.Config(micro_batch=cell.get("micro_batch", 4), strategy=cell["strategy"],
                                   reshard_after_forward=cell.get("reshard", True))
            budget = cell.get("budget") if rank == 1 else None  # rank 1's device is smaller
            trainer = memfit.Trainer(workload, config, device="cpu", timeout=cell.get("timeout", 20), budget=budget)
            retries, outcome = [], None
            for i, batch in enumerate(batches(cell.get("sizes", case["sizes"]))):
                part = rank_part(batch, rank, world)
                inject = i == cell.get("step", 0) and rank == 1 and "phase" in cell
                if i == 0 and rank == 0 and cell.get("bug_on_rank0"):  # a bug in rank 0's loss, as rank 1 dies
                    trainer._attempt.loss = _broken
                start = time.monotonic()
                try:
                    if inject:
                        with InjectOOM(trainer, cell["phase"], cell["at"], cell.get("op"), cell.get("kill", False)) as mode:
                            retries.append(trainer.step(part).retries)
                        assert mode.fired, f"the injected OOM never fired: {cell}"
                    else:
                        retries.append(trainer.step(part).retries)
                except Exception as exc:  # noqa: BLE001 - what the parent checks (any type: a raw one fails it)
                    outcome = {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start,
                               "oom": isinstance(exc, torch.OutOfMemoryError), "notes": getattr(exc, "__notes__", [])}
                    break
            if outcome is None:
                try:  # a rank that stopped after its peers' last agreement is met here, as fit meets it
                    trainer._guard.settle("the end of the cell")
                    outcome = {"state": trainer.full_state_dict(), "retries": retries}
                except memfit.MemfitError as exc:
                    outcome = {"error": type(exc).__name__, "message": str(exc), "seconds": 0.0,
                               "oom": isinstance(exc, torch.OutOfMemoryError)}
            outcomes.append(outcome)
        torch.save(outcomes, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
