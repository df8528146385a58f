"""Each strategy of the seed articles, measured by memfit on this machine: the seed CNN and GPT-2 small.

Batch size; precision (fp16/bf16, autocast and cast); gradient accumulation (the article's ``loss / N``
against memfit's exact weighting); gradient checkpointing; ``del outputs, loss``; ``empty_cache()`` every
step; DDP on 2 gloo processes. Every row of a memory table is real steps on this CPU under
``memfit.track`` (peak, and bytes by category at the peak); step times are medians of untracked steps
after the tracked ones. Not measured, and labelled so: ``empty_cache()`` (a CPU has no caching
allocator: the measured allocation trace is replayed through ``memfit.allocator``'s model of CUDA's) and
DataParallel (needs GPUs). Shapes for 2 shared cores: the CNN at batch 64 (the article's); GPT-2 small
(random weights, dropout 0, AdamW) at 2 x 32 tokens, two rows at 1 x 1024; its 16-bit rows run one
untimed step at 1 x 8 tokens (this CPU emulates 16-bit matrix products, several times slower than fp32).
About 3 minutes on 2 quiet cores, more when other jobs share them.

Fills the tables of docs/strategies.md between its ``<!-- seed_strategies:NAME -->`` markers and draws
docs/strategies_cnn.png and docs/strategies_gpt2.png. Last line:
``ratio: best strategy's peak / baseline peak = X (gpt2: ...)``.

    python benchmarks/seed_strategies.py [--no-doc] [--no-ddp] [--gpt2-timed 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import memfit
from memfit.allocator import _Allocator, cublas_workspace_bytes, simulate_caching_allocator
from memfit.presets import SeedCNN
from memfit.step import backward, forward, prepare, update
from memfit.strategies import Recipe
from memfit.workload import step_loss

DOCS = Path(__file__).resolve().parents[1] / "docs"
CNN_BATCH, CNN_TIMED = 64, 5
GPT2_SEQ, GPT2_BATCH, GPT2_PREC = 32, 2, (1, 8)  # GPT-2's precision rows: batch 1 x 8 tokens
GPT2_LONG = 1024  # two rows at GPT-2's full context, where activations outgrow AdamW's step
SEED = 1


@dataclass
class Row:
    strategy: str
    setting: str
    peak: int | None = None
    at_peak: dict[str, int] = field(default_factory=dict)
    act_max: int | None = None  # the activations' own maximum (not necessarily at the peak)
    ms: float | None = None  # median step time (one optimizer step), milliseconds
    ref: Row | None = None  # the row this one compares with (same effective batch and shape)
    note: str = ""
    broken: bool = False  # the step ruined the weights (inf/NaN): not a strategy to pick
    ends: list[int] = field(default_factory=list)  # event count after each tracked step (for the allocator model)
    tracker: object = None

    @property
    def vs(self) -> float | None:
        return None if self.ref is None or self.peak is None else self.peak / self.ref.peak


def run(row: Row, model, opt, step, make_batch, *, tracked: int, timed: int) -> Row:
    """``tracked`` steps under memfit.track (the same batches in every row: seeded), then ``timed`` untracked ones."""
    began = time.perf_counter()
    torch.manual_seed(SEED)
    with memfit.track(model, opt) as tracker:
        for _ in range(tracked):
            batch = make_batch()
            tracker.mark_inputs(batch)
            step(batch)
            del batch
            row.ends.append(tracker.position()[0])
    report, row.tracker = tracker.report(), tracker
    row.peak, row.at_peak, row.act_max = report.peak, dict(report.at_peak), report.peak_by_category["activations"]
    times = []
    for _ in range(timed):
        batch = make_batch()
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    row.ms = statistics.median(times) * 1e3 if times else None
    if row.strategy:
        print(f"  {row.strategy}: {row.setting}: peak {_b(row.peak)} ({time.perf_counter() - began:.0f} s)", flush=True)
    return row


def config_parts(wl, base, config: memfit.Config, capture: dict | None = None):
    """Model, optimizer and step as memfit.measure runs a Config (memfit.step's parts); ``capture`` keeps
    references to the first step's loss and gradients (no copy: the peak is unchanged)."""
    recipe = Recipe(config, "cpu")
    model = recipe.apply(copy.deepcopy(base)).train()
    opt = recipe.build_optimizer(wl.optimizer, model)
    scaler = recipe.scaler()

    def step(batch):
        batch = prepare(batch, None, recipe)
        loss = step_loss(forward(wl.loss, model, batch, recipe))
        backward(loss, scaler)
        if capture is not None and "grads" not in capture:
            capture["loss"], capture["grads"] = loss.detach(), [p.grad for p in model.parameters()]
        del batch, loss
        update(opt, scaler)  # GradScaler.step unscales the captured gradients in place first

    return model, opt, step


def config_row(strategy, setting, wl, base, config, make_batch, *, tracked, timed, ref=None, capture=None):
    try:
        model, opt, step = config_parts(wl, base, config, capture)
    except memfit.UsageError as exc:  # a strategy memfit refuses for this model: say so in the table
        return Row(strategy, setting, ref=ref, note="memfit refuses it: " + re.sub(r" \(.*?\)", "", str(exc).split(";")[0]))
    row = run(Row(strategy, setting, ref=ref), model, opt, step, make_batch, tracked=tracked, timed=timed)
    if capture is not None:
        capture["params"] = [p.detach() for p in model.parameters()]
    return row


def trainer_row(strategy, setting, wl, base, micro: int, make_batch, *, tracked, timed, ref=None):
    """memfit.Trainer under Config(micro_batch=micro): the logical batch in micro-batches, exact weights."""
    workload = memfit.Workload(model=base, batch=wl.batch, loss=wl.loss, optimizer=wl.optimizer, name=wl.name)
    trainer = memfit.Trainer(workload, memfit.Config(micro_batch=micro), device="cpu")
    return run(Row(strategy, setting, ref=ref), trainer.model, trainer.optimizer, trainer.step, make_batch,
               tracked=tracked, timed=timed)


def loop_row(strategy, setting, wl, base, outputs_and_loss, make_batch, kind: str, *, tracked, timed,
             micro: int | None = None, ref=None):
    """The seed article's hand-written loop. ``kind``: ``function`` (the step is a function: its locals die at
    return), ``kept`` (loop variables ``outputs, loss`` live until the next iteration rebinds them), ``del``
    (``del outputs, loss`` at the end), ``eval-kept`` (also a forward without ``torch.no_grad()`` whose result is
    kept until the next step, as a logging or validation line would). ``micro``: accumulate in micro-batches
    of this size, each loss divided by their number (the article's ``loss / accumulation_steps``)."""
    model = copy.deepcopy(base).train()
    opt = wl.optimizer(model.parameters())
    held: dict = {}

    def step(batch):
        n = len(batch[0]) if isinstance(batch, tuple) else len(batch["input_ids"])
        size = micro or n
        for start in range(0, n, size):
            part = _slice(batch, start, start + size)
            outputs, loss = outputs_and_loss(model, part)
            if kind != "function":
                held["outputs"], held["loss"] = outputs, loss  # rebinding frees the last step's only now
            (loss / -(-n // size)).backward()
            del outputs, loss, part
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "del":
            held.clear()
        if kind == "eval-kept":
            held["eval"] = outputs_and_loss(model, _slice(batch, 0, n))[0]

    return run(Row(strategy, setting, ref=ref), model, opt, step, make_batch, tracked=tracked, timed=timed)


def _slice(batch, a, b):
    return tuple(t[a:b] for t in batch) if isinstance(batch, tuple) else {k: v[a:b] for k, v in batch.items()}


def cnn_outputs_and_loss(model, batch):
    x, y = batch
    outputs = model(x)
    return outputs, F.cross_entropy(outputs, y)


def gpt2_outputs_and_loss(model, batch):
    outputs = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    return outputs, F.cross_entropy(outputs[:, :-1].reshape(labels.numel(), -1), labels, ignore_index=-100)


# ----------------------------------------------------------------------------------- precision accuracy


def rel_error(pairs) -> float:
    """``||a - b|| / ||b||`` over all the (a, b) tensor pairs, in float32 (plenty for errors above 1e-7)."""
    num = den = 0.0
    for a, b in pairs:
        num += float(torch.linalg.vector_norm(a.float() - b.float())) ** 2
        den += float(torch.linalg.vector_norm(b.float())) ** 2
    return (num / den) ** 0.5


def accuracy(ref: dict, got: dict, base) -> dict:
    """The first step against fp32's from the same weights and batch: loss, gradient and update errors."""
    total = sum(p.numel() for p in got["params"])
    flushed = sum(int(((g == 0) & (r != 0)).sum()) for g, r in zip(got["grads"], ref["grads"]))
    return {"loss": float(got["loss"]), "grad": rel_error(zip(got["grads"], ref["grads"])),
            "update": rel_error((p.float() - s, r - s) for p, r, s in zip(got["params"], ref["params"],
                                                                          [p.detach() for p in base.parameters()])),
            "nonfinite": sum(int((~torch.isfinite(p)).sum()) for p in got["params"]) / total,
            "zero_grads": flushed / max(1, sum(int((r != 0).sum()) for r in ref["grads"]))}


def first_step(wl, base, config, make_batch) -> dict:
    """One step from ``base``'s weights on the seeded first batch: its loss, gradients and updated weights."""
    capture = {}
    config_row("", "", wl, base, config, make_batch, tracked=1, timed=0, capture=capture)
    return capture


def precision_rows(wl, base, batch: int, make_batch, ref_row: Row, ref_capture: dict, *, tracked: int, timed: int):
    """The four 16-bit precisions at the shape of ``ref_row`` (fp32, whose first step ``ref_capture`` holds).
    A row of one step and no timing gives its first step's figures itself; others take a separate step."""
    rows, acc = [], {"32-true": {"loss": float(ref_capture["loss"]), "grad": 0.0, "update": 0.0, "nonfinite": 0.0,
                                 "zero_grads": 0.0}}
    for name, label in (("16-mixed", "fp16 autocast + GradScaler"), ("bf16-mixed", "bf16 autocast"),
                        ("16-true", "model.half()"), ("bf16-true", "model.to(torch.bfloat16)")):
        config = memfit.Config(micro_batch=batch, precision=name)
        one_step = tracked == 1 and timed == 0
        capture = {} if one_step else first_step(wl, base, config, make_batch)
        rows.append(config_row("precision", f"{name}: {label}", wl, base, config, make_batch, tracked=tracked,
                               timed=timed, ref=ref_row, capture=capture if one_step else None))
        acc[name] = accuracy(ref_capture, capture, base)
        if acc[name]["nonfinite"] > 0:
            rows[-1].broken = True
            rows[-1].note = f"{acc[name]['nonfinite']:.0%} of the weights inf or NaN after one step"
    return rows, acc


# ------------------------------------------------------------------------------ accumulation: the math


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def accumulation_math(base, loss_fn, batch, micro: int, *, mean_of_micro) -> dict:
    """Gradients of one logical batch three ways, from the same weights: the full batch at once (the reference),
    the article's loop (each micro-batch's mean loss / number of micro-batches), memfit's Trainer."""
    n = len(batch[0]) if isinstance(batch, tuple) else len(batch["input_ids"])
    model = copy.deepcopy(base)
    step_loss(loss_fn(model, batch)).backward()
    ref = grads_of(model)
    model = copy.deepcopy(base)
    k = -(-n // micro)
    for start in range(0, n, micro):
        (mean_of_micro(model, _slice(batch, start, start + micro)) / k).backward()
    article = grads_of(model)
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}

    def keep(*_):  # the gradients the optimizer step sees: the Trainer's final ones
        seen["grads"] = grads_of(model)

    opt.register_step_pre_hook(keep)
    trainer = memfit.Trainer.from_parts(model, opt, loss_fn, memfit.Config(micro_batch=micro), device="cpu")
    sizes = trainer.step(batch).micro_batches
    return {"sizes": sizes, "article": rel_error(zip(article, ref)), "memfit": rel_error(zip(seen["grads"], ref))}


def padded_tokens(n: int, seq: int, lengths, vocab: int = 50257) -> dict:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for i, length in enumerate(lengths):
        labels[i, length:] = -100  # padding: no loss on these positions
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------- empty_cache: the allocator model


def allocator_replay(events, ends, *, empty_cache: bool) -> dict:
    """Replay a measured trace through memfit's model of CUDA's caching allocator; with ``empty_cache``,
    every wholly free segment goes back to the driver after each step, as torch.cuda.empty_cache() does."""
    alloc, live, steps, i = _Allocator(), {}, [], 0
    for _ in range(2):
        alloc.malloc(cublas_workspace_bytes())  # as simulate_caching_allocator: two cuBLAS workspaces
    for end in ends:
        mallocs0, frees, freed = alloc.segments, 0, 0
        for _, sid, delta in events[i:end]:
            current = live.pop(sid, None)
            if current is not None:
                alloc.free(current[0])
            size = (current[1] if current is not None else 0) + delta
            if size > 0 and (delta > 0 or current is not None):
                live[sid] = (alloc.malloc(size), size)
        i = end
        if empty_cache:
            for size, seg, off in list(alloc.large.free) + list(alloc.small.free):
                if off == 0 and (seg, size) not in alloc.blocks:  # the free block is its whole segment
                    pool = alloc.blocks.pop((seg, 0))[2]
                    pool.free.remove((size, seg, 0))
                    del alloc.ends[(seg, size)]
                    alloc.reserved -= size
                    frees, freed = frees + 1, freed + size
        steps.append({"mallocs": alloc.segments - mallocs0, "frees": frees, "freed": freed,
                      "reserved_after": alloc.reserved})
    return {"peak_reserved": alloc.peak_reserved, "peak_allocated": alloc.peak_allocated, "steps": steps}


def empty_cache_model(row: Row) -> dict:
    events = row.tracker.allocation_events()
    plain, emptied = (allocator_replay(events, row.ends, empty_cache=e) for e in (False, True))
    check = simulate_caching_allocator(events)
    assert plain["peak_reserved"] == check.reserved, "the replay disagrees with memfit.allocator"
    return {"plain": plain, "emptied": emptied}


# --------------------------------------------------------------------------------------- DDP, 2 ranks


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        wl, result = memfit.presets.load("cifar-cnn"), {}
        for name, bucket_view in (("DDP (defaults)", False), ("DDP, gradient_as_bucket_view=True", True)):
            torch.manual_seed(0)
            model = SeedCNN()
            opt = wl.optimizer(model.parameters())  # DDP keeps the model's parameters: the optimizer holds them
            held = {}

            def step(batch, model=model, opt=opt, held=held, bucket_view=bucket_view):
                if not held:  # made in the first tracked step, so that DDP's gradient buckets are counted
                    held["ddp"] = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
                F.cross_entropy(held["ddp"](batch[0]), batch[1]).backward()  # all-reduces the buckets
                opt.step()
                opt.zero_grad(set_to_none=True)

            row = run(Row("", name), model, opt, step, lambda: wl.batch(CNN_BATCH), tracked=2, timed=CNN_TIMED)
            result[name] = {"peak": row.peak, "at_peak": row.at_peak, "act_max": row.act_max, "ms": row.ms}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ddp_rows(single64: Row, single128: Row) -> list[Row]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(ddp_worker, args=(2, port, out), nprocs=2)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    rows = []
    for name in ranks[0]:
        worst = max(ranks, key=lambda r: r[name]["peak"])[name]
        rows.append(Row("data parallel", f"{name}: 2 ranks x {CNN_BATCH}", worst["peak"], worst["at_peak"],
                        act_max=worst["act_max"], ms=max(r[name]["ms"] for r in ranks), ref=single64,
                        note=f"the larger rank's peak, the slower rank's time; one process at {2 * CNN_BATCH}: "
                             f"{_b(single128.peak)}, {single128.ms:.0f} ms"))
    return rows


# ----------------------------------------------------------------------------------------- the sections


def article_cnn_error() -> str:
    """Run the article's CNN as printed (``nn.Linear(64 * 8 * 8, 10)`` after one 2x2 pool) on a CIFAR-sized batch."""
    torch.manual_seed(0)
    net = SeedCNN()
    net.fc = torch.nn.Linear(64 * 8 * 8, 10)  # the article's declaration; SeedCNN keeps the rest of its layers
    try:
        net(torch.randn(CNN_BATCH, 3, 32, 32))
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error (the article's shape ran: this benchmark's claim is out of date)"


def cnn_section(args) -> dict:
    wl = memfit.presets.load("cifar-cnn")
    torch.manual_seed(0)
    base = SeedCNN()

    def batches(n):
        return lambda: wl.batch(n)

    kw = {"tracked": 2, "timed": CNN_TIMED}
    config = memfit.Config(micro_batch=CNN_BATCH)
    baseline = config_row("baseline", f"batch {CNN_BATCH}, fp32 (the article's)", wl, base, config, batches(64), **kw)
    sizes = {n: config_row("batch size", f"batch {n}", wl, base, memfit.Config(micro_batch=n), batches(n), **kw)
             for n in (16, 128, 256)}
    prec, acc = precision_rows(wl, base, CNN_BATCH, batches(64), baseline, first_step(wl, base, config, batches(64)),
                               tracked=2, timed=3)  # 16-bit steps are slow on this CPU: 3 timed
    accum = [trainer_row("accumulation", "batch 256 as 4 x 64: memfit.Trainer", wl, base, 64, batches(256),
                         ref=sizes[256], **kw),
             loop_row("accumulation", "batch 256 as 4 x 64: the article's loop (loss / 4)", wl, base,
                      cnn_outputs_and_loss, batches(256), "function", micro=64, ref=sizes[256], **kw)]
    ckpt = [config_row("checkpointing", f"checkpoint={glob!r}", wl, base, memfit.Config(micro_batch=CNN_BATCH,
                       checkpoint=glob), batches(64), ref=baseline, **kw)
            for glob in ("all", ("pool",), ("conv1", "relu", "pool"))]
    function = loop_row("freeing", "article loop in a function, no del", wl, base, cnn_outputs_and_loss, batches(64),
                        "function", ref=baseline, **kw)
    freeing = [function] + [loop_row("freeing", setting, wl, base, cnn_outputs_and_loss, batches(64), kind,
                                     ref=function, tracked=2, timed=0)
                            for kind, setting in (("kept", "loop variables outputs, loss kept to the next step"),
                                                  ("del", "del outputs, loss at the end of each step"),
                                                  ("eval-kept", "a forward without no_grad(), result kept"))]
    rows = [baseline, *sizes.values(), *prec, *accum, *ckpt, *freeing]
    if not args.no_ddp:
        rows += ddp_rows(baseline, sizes[128])
    g = torch.Generator().manual_seed(SEED)
    short = (torch.randn(100, 3, 32, 32, generator=g), torch.randint(0, 10, (100,), generator=g))
    even = (torch.randn(256, 3, 32, 32, generator=g), torch.randint(0, 10, (256,), generator=g))
    math = {"batch 100 in micro-batches of 32 (the last has 4)": accumulation_math(base, wl.loss, short, 32,
                                                                                   mean_of_micro=wl.loss),
            "batch 256 in micro-batches of 64 (equal)": accumulation_math(base, wl.loss, even, 64, mean_of_micro=wl.loss)}
    return {"rows": rows, "accuracy": acc, "math": math, "empty_cache": empty_cache_model(baseline),
            "shape": article_cnn_error()}


def gpt2_section(args) -> dict:
    wl = memfit.presets.load("gpt2", seq_len=GPT2_SEQ, dropout=0.0)
    torch.manual_seed(0)
    base = wl.model()

    def batches(n, source=wl):
        return lambda: source.batch(n)

    timed = args.gpt2_timed
    baseline = config_row("baseline", f"batch {GPT2_BATCH} x {GPT2_SEQ} tokens, fp32", wl, base,
                          memfit.Config(micro_batch=GPT2_BATCH), batches(GPT2_BATCH), tracked=2, timed=timed)
    # Two tracked steps: AdamW makes its state in the first update, after the first backward; from the second
    # step on it is alive in backward too, with the activations (what measure() does for the same reason).
    sizes = {n: config_row("batch size", f"batch {n}", wl, base, memfit.Config(micro_batch=n), batches(n),
                           tracked=2, timed=timed) for n in (1, 4)}
    accum = trainer_row("accumulation", "batch 4 as 2 x 2: memfit.Trainer", wl, base, 2, batches(4), ref=sizes[4],
                        tracked=2, timed=timed)
    ckpt = config_row("checkpointing", "batch 4, checkpoint='all' (the 12 blocks)", wl, base,
                      memfit.Config(micro_batch=4, checkpoint="all"), batches(4), ref=sizes[4], tracked=2, timed=timed)
    wl_long = memfit.presets.load("gpt2", seq_len=GPT2_LONG, dropout=0.0)
    long = config_row("batch size", f"batch 1 x {GPT2_LONG} tokens (GPT-2's context)", wl_long, base,
                      memfit.Config(micro_batch=1), batches(1, wl_long), tracked=2, timed=0)
    long_ckpt = config_row("checkpointing", f"batch 1 x {GPT2_LONG} tokens, checkpoint='all'", wl_long, base,
                           memfit.Config(micro_batch=1, checkpoint="all"), batches(1, wl_long), ref=long,
                           tracked=2, timed=0)
    kept = loop_row("freeing", "article loop, outputs, loss kept to the next step", wl, base, gpt2_outputs_and_loss,
                    batches(GPT2_BATCH), "kept", ref=baseline, tracked=2, timed=0)
    n, seq = GPT2_PREC
    wl8 = memfit.presets.load("gpt2", seq_len=seq, dropout=0.0)
    # One step each, the first (its gradients and update are compared with fp32's): at 8 tokens the peak is in
    # AdamW's update, which holds in the first step all that later ones do (memfit.measure over two steps
    # differs by 136 bytes at this shape).
    ref_capture = {}
    fp32 = config_row("precision", f"32-true (fp32) at batch {n} x {seq} tokens", wl8, base,
                      memfit.Config(micro_batch=n), batches(n, wl8), tracked=1, timed=0, capture=ref_capture)
    prec, acc = precision_rows(wl8, base, n, batches(n, wl8), fp32, ref_capture, tracked=1, timed=0)
    lengths = (GPT2_SEQ, GPT2_SEQ * 5 // 8, GPT2_SEQ // 4, 3)
    padded = padded_tokens(4, GPT2_SEQ, lengths)
    math = {f"batch 4 x {GPT2_SEQ} tokens, {len(lengths)} sequences of {', '.join(map(str, lengths))} real tokens, "
            "micro-batches of 2": accumulation_math(base, wl.loss, padded, 2,
                                                    mean_of_micro=lambda m, b: step_loss(wl.loss(m, b)))}
    rows = [baseline, sizes[1], sizes[4], accum, ckpt, long, long_ckpt, kept, fp32, *prec]
    return {"rows": rows, "accuracy": acc, "math": math, "empty_cache": empty_cache_model(baseline)}


# -------------------------------------------------------------------------------------------- output


def _b(n: int | None) -> str:
    """MiB with one decimal from 1 MiB up (one unit down a column), memfit's formatter below."""
    if n is None:
        return "-"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else memfit.format_bytes(n, precision=1)


def md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def memory_table(rows: list[Row]) -> str:
    cats = [c for c in memfit.CATEGORIES if any(r.at_peak.get(c) for r in rows)]
    return md(["strategy", "setting", "peak", "peak vs reference", *[c.replace("_", " ") for c in cats],
               "activations' own max", "step time"],
              [[r.strategy, r.setting + (f" ({r.note})" if r.note else ""), _b(r.peak),
                f"{r.vs:.2f} x ({r.ref.setting})" if r.vs is not None else "",
                *[_b(r.at_peak.get(c, 0) if r.peak is not None else None) for c in cats], _b(r.act_max),
                f"{r.ms:,.0f} ms" if r.ms is not None else "-"] for r in rows])


def accuracy_table(sections: dict) -> str:
    return md(["model", "precision", "loss, step 1", "gradient error vs fp32", "update error vs fp32",
               "gradients flushed to 0", "non-finite weights after the update"],
              [[model, name, f"{a['loss']:.4f}", f"{a['grad']:.2e}", f"{a['update']:.2e}", f"{a['zero_grads']:.2%}",
                f"{a['nonfinite']:.2%}"] for model, sec in sections.items() for name, a in sec["accuracy"].items()])


def math_table(sections: dict) -> str:
    return md(["model", "logical batch", "micro-batches", "article's loop (loss / N): gradient error",
               "memfit.Trainer: gradient error"],
              [[model, name, " + ".join(map(str, m["sizes"])), f"{m['article']:.2e}", f"{m['memfit']:.2e}"]
               for model, sec in sections.items() for name, m in sec["math"].items()])


def empty_cache_table(sections: dict) -> str:
    rows = []
    for model, sec in sections.items():
        for name, key in (("never", "plain"), ("every step", "emptied")):
            m = sec["empty_cache"][key]
            first, second = m["steps"]
            rows.append([model, name, _b(m["peak_reserved"]), first["mallocs"], second["mallocs"],
                         f"{first['frees']} ({_b(first['freed'])})", _b(first["reserved_after"])])
    return md(["model", "empty_cache() after each step", "peak reserved (modelled)", "segments cudaMalloc'd in step 1",
               "in step 2", "segments (bytes) freed after each step", "reserved between steps"], rows)


def plot(rows: list[Row], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.peak is not None]
    cats = [c for c in memfit.CATEGORIES if any(r.at_peak.get(c) for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    for c in cats:
        widths = [r.at_peak.get(c, 0) / 2**20 for r in rows]
        ax.barh(range(len(rows)), widths, left=left, label=c.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r.peak / 2**20:,.1f} MiB" + (" (weights inf/NaN)" if r.broken else ""),
                va="center", fontsize=7)
    ax.set_xlim(0, max(left) * 1.22)
    ax.set_yticks(range(len(rows)), [f"{r.strategy}: {r.setting}"[:70] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB at the peak, by category (measured by memfit.track on CPU)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(path: Path, blocks: dict[str, str]) -> None:
    if not path.is_file():
        raise SystemExit(f"{path} not found: it holds the prose around the tables; restore it from git, or pass --no-doc")
    text = path.read_text()
    for key, body in blocks.items():
        pattern = re.compile(rf"(<!-- seed_strategies:{key} -->\n).*?(<!-- /seed_strategies:{key} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no <!-- seed_strategies:{key} --> ... <!-- /seed_strategies:{key} --> "
                             "markers; add them where the table belongs, or pass --no-doc")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ as it is")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP rows")
    parser.add_argument("--gpt2-timed", type=int, default=1, help="untracked GPT-2 steps timed per row (default 1)")
    args = parser.parse_args()
    start = time.perf_counter()
    sections = {"cnn": cnn_section(args)}
    print(f"cnn done in {time.perf_counter() - start:.0f} s", flush=True)
    sections["gpt2"] = gpt2_section(args)
    took = time.perf_counter() - start
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), no GPU; whole run {took:.0f} s on cores shared with other jobs")
    blocks = {"machine": machine, "cnn-shape": "```\n" + sections["cnn"]["shape"] + "\n```",
              "cnn": memory_table(sections["cnn"]["rows"]),
              "gpt2": memory_table(sections["gpt2"]["rows"]), "precision": accuracy_table(sections),
              "accumulation": math_table(sections), "empty-cache": empty_cache_table(sections)}
    for key, body in blocks.items():
        print(f"\n## {key}\n{body}")
    if not args.no_doc:
        write_doc(DOCS / "strategies.md", blocks)
        plot(sections["cnn"]["rows"], f"Seed CNN, batch {CNN_BATCH} unless said: peak by category",
             DOCS / "strategies_cnn.png")
        plot(sections["gpt2"]["rows"], f"GPT-2 small, {GPT2_SEQ} tokens per sequence unless said: peak by category",
             DOCS / "strategies_gpt2.png")
    same_math = [r for r in sections["gpt2"]["rows"] if r.vs is not None and r.strategy != "batch size" and not r.broken]
    best = min(same_math, key=lambda r: r.vs)
    print(f"ratio: best strategy's peak / baseline peak = {best.vs:.2f} "
          f"(gpt2: {best.setting} vs {best.ref.setting})")


if __name__ == "__main__":
    main()
