"""TrainStep: one attempt at a logical batch, micro-batch by micro-batch, with the large batch's math.

The batch is split into the config's micro-batches; each runs forward and backward;
the optimizer steps once and the gradients are set to None. The math is the large
batch's:

* a mean loss is weighted by its micro-batch's share of the batch's samples
  (``n_i / N``), not divided by the number of micro-batches as the seed
  article's loop does, which is wrong whenever the last micro-batch is short;
* a ``(loss_sum, n_items)`` loss is divided by the items of the whole logical
  batch (token-exact for language models with padding; the transformers
  Trainer divided per micro-batch until late 2024). The total is known only
  after the last micro-batch, so each micro-batch backpropagates
  ``loss_sum * c`` with ``c = 1 / (items of the first * micro-batches)``, close
  to the final scale so fp16 gradients stay in range, and the gradients are
  multiplied by ``1 / (total * c)`` once before the optimizer step.

Memory hygiene, as the seed articles ask but done right: the loss is accumulated
detached on the device and read once a step (NaN/inf and item counts are checked
before the update); every reference to a micro-batch's graph is dropped before the next.

An attempt changes the model only through the optimizer step: :attr:`TrainStep.phase`
says how far it got (``forward``, ``backward``, ``optimizer``, ``committed``), which the
guard (:mod:`memfit.engine.guard`) reads to undo a failed attempt or to count a committed one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memfit._tree import map_tensors
from memfit.config import Config, accumulation_steps, rank_micro_batches
from memfit.engine.comm import OK, Comm, LocalComm
from memfit.engine.leak import LeakCheck
from memfit.engine.probe import Probe
from memfit.engine.results import StepResult
from memfit.errors import MemfitError, NonFiniteLoss, NonFiniteLossWarning, UsageError, warn
from memfit.sharding import is_fsdp, issues_collectives
from memfit.step import backward, forward, prepare, release_before_backward, update
from memfit.strategies import Recipe

__all__ = ["TrainStep", "NONFINITE"]

log = logging.getLogger("memfit")

NONFINITE = "non-finite loss"
"""The skip reason of a step whose loss was NaN or inf."""


class TrainStep:
    """Runs attempts at logical batches for one model, optimizer and loss; see the module docstring.

    Args:
        loss: ``loss(model, micro_batch)`` returning a scalar mean or ``(loss_sum, n_items)``.
        recipe: the precision's autocast and GradScaler, and activation offload.
        probe: where the attempt's peak is measured (and, under a simulated budget, the device it runs on).
        leak: marks the first micro-batch's graph while fit watches for leaks.
        on_nonfinite: ``"skip"`` a NaN/inf loss's update (warned once), or ``"raise"`` NonFiniteLoss.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[[nn.Module, Any], Any],
                 recipe: Recipe, device: torch.device, probe: Probe, leak: LeakCheck, *, scheduler: Any,
                 clip_grad_norm: float | None, on_nonfinite: str, comm: Comm | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.recipe = recipe
        self.device = device
        self.probe = probe
        self.leak = leak
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        self.on_nonfinite = on_nonfinite
        self.comm = comm if comm is not None else LocalComm()
        self.agreed = False  # this attempt has passed the ranks' agreement (no OOM anywhere before the update)
        self.running = False  # an attempt is under way (FSDP's per-block agreements run only then)
        self.most_samples: int | None = None  # the most samples any rank has in this attempt (agreed)
        self.phase = "forward"  # where the current attempt is: forward, backward, optimizer, committed
        # Buffers forward updates (BatchNorm statistics): learned from the first step's snapshot.
        self.mutable_buffers: list[torch.Tensor] | None = None
        self._nonfinite_warned = False

    def __call__(self, batch: Any, n: int, config: Config, step: int, retries: int,
                 restore: dict[str, Any]) -> StepResult:
        """One attempt at ``batch`` (``n`` samples) as ``step`` with ``config``; ``restore`` is the guard's snapshot.

        In a distributed run ``batch`` is this rank's part of the logical batch: the ranks agree on
        every rank's sample count first, and the math is the whole logical batch's (see _Ranks).
        """
        self.phase = "forward"
        self.agreed = False
        self.most_samples = None
        self.leak.begin_attempt(step)  # the first micro-batch's graph is marked
        self.running = True
        try:
            return self._attempt(batch, n, config, step, retries, restore)
        finally:
            self.running = False

    def agree_while_running(self, where: str) -> None:
        """Right before each collective FSDP issues (:class:`memfit.sharding.Sharding`'s ``agree``): within an
        attempt the ranks agree that nobody failed; outside one (an evaluation forward) nothing is agreed."""
        if self.running:
            self.comm.agree(OK, where=where)

    def _attempt(self, batch: Any, n: int, config: Config, step: int, retries: int,
                 restore: dict[str, Any]) -> StepResult:
        comm = self.comm
        comm.samples = float(n)  # every exchange tells the others (a re-plan after a failure is alike on every rank)
        ranks = _Ranks(comm, n, config, self.model) if comm.world_size > 1 else None
        lockstep = ranks is not None and ranks.lockstep
        summed = ranks is not None and ranks.summed  # each rank backpropagates sums; the reduce divides by the total
        self.most_samples = ranks.most if lockstep else n
        sizes = ranks.sizes if lockstep else accumulation_steps(n, config.micro_batch)
        recipe, scaler, device = self.recipe, self.recipe.scaler(), self.device
        simulated = self.probe.sim is not None
        with self.probe.measure() as peak:
            total = None  # detached running loss, float32 (float64 for a float64 loss); no sync until read
            token_scale = items = low = None
            start = 0
            last = len(sizes) - 1
            for i, size in enumerate(sizes):
                if ranks is not None and i > 0 and ranks.forward_collectives:
                    comm.agree(OK, where=f"micro-step {i + 1}'s forward")  # DDP's buffer broadcast
                # Gradients are reduced across ranks once, after the last micro-batch (DDP decides in the
                # forward whether its backward reduces: the whole micro-step runs in the context).
                with comm.no_sync(self.model) if i < last and not config.sync_every_micro_step else _NO_CONTEXT:
                    micro = _slice(batch, start, start + size)
                    start += size
                    # Copies to CUDA may be asynchronous (stream-ordered); a copy to the host may not: it would be read early.
                    micro = prepare(micro, device, recipe, non_blocking=device.type == "cuda")
                    if simulated:
                        micro = map_tensors(micro, torch.clone)  # on a simulated device the micro-batch is a copy
                    out = forward(self.loss, self.model, micro, recipe)
                    _check_loss(out)
                    token = ranks is not None and not summed and i == 0 and isinstance(out, (tuple, list))
                    if token:
                        # The first token loss's items summed over the ranks: the provisional scale, alike on
                        # every rank (FSDP averages the gradients before the exact rescale).
                        first = comm.agree(OK, float(out[1]), where=f"micro-step {i + 1}'s backward")[0]
                    if isinstance(out, torch.Tensor):
                        if token_scale is not None or out.dim() != 0:
                            raise _loss_error(out, mixed=token_scale is not None)
                        if total is None:
                            total = torch.zeros((), device=device, dtype=_accumulator(out))
                        # A mean over this micro-batch: its share of the logical batch's samples. Across ranks
                        # FSDP averages the gradients (divides by the world size): the share is multiplied back;
                        # under DDP each rank backpropagates sums and the reduce divides by the total (_Ranks).
                        if ranks is None:
                            share = size / n
                            scaled = out * share
                            total += scaled.detach()
                        elif not summed:
                            share = size / ranks.total
                            scaled = out * (share * comm.world_size)
                            total += (out * share).detach()
                        else:  # the micro-batch's sum over a constant of every rank: the reduce divides by the total
                            scaled = out * (size / config.micro_batch)
                            total += (out * size).detach()
                    elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor):
                        if items is None and start != size:
                            raise _loss_error(out, mixed=True)
                        loss_sum, n_items = out
                        if loss_sum.dim() != 0:
                            raise _loss_error(loss_sum, mixed=False)
                        dtype = _accumulator(loss_sum)
                        n_items = torch.as_tensor(n_items, device=device).detach().to(dtype)
                        if token_scale is None:
                            # Provisional 1/total (the true total is known after the last micro-batch), in the
                            # loss's precision (float64 for a float64 model), so the gradients keep theirs.
                            # Across ranks it must be the same on every rank (the gradients are averaged before
                            # the exact rescale): the first micro-batches' items summed over the ranks.
                            if ranks is None:
                                token_scale = 1.0 / (n_items.clamp(min=1.0) * len(sizes))
                            elif summed:  # a constant of every rank: the reduce divides by the total
                                token_scale = torch.tensor(1.0 / config.micro_batch, device=device, dtype=dtype)
                            else:
                                token_scale = torch.tensor(comm.world_size / (max(first, 1.0) * len(sizes)),
                                                           device=device, dtype=dtype)
                            total = torch.zeros((), device=device, dtype=dtype)
                            items = torch.zeros((), device=device, dtype=dtype)
                            low = n_items
                        items += n_items
                        low = torch.minimum(low, n_items)
                        scaled = loss_sum * token_scale
                        total += loss_sum.detach()
                    else:
                        raise _loss_error(out, mixed=False)
                    self.leak.watch_loss(out if isinstance(out, torch.Tensor) else out[0])
                    if i == 0:
                        release_before_backward(self.model, self.optimizer, recipe.config.zero_grad)
                    self.phase = "backward"
                    backward(scaled, scaler)
                    self.phase = "forward"
                    # Release this micro-batch's graph and inputs now: only the gradients carry over.
                    del out, scaled, micro
            # Every rank got here, or one ran out of memory: all of them learn which before anyone updates.
            rescaled = False  # the reduce applied the exact token scale (no rescale of the gradients after it)
            if ranks is not None:
                # The loss and the item counts of the whole logical batch (one sync, as on one device);
                # then the gradients DDP left unreduced are reduced.
                loss_all, items_all, samples_all = comm.agree(OK, float(total), float(items) if items is not None
                                                              else 0.0, float(n), where="the update")
                self.agreed = True  # from here on a failure is this rank's alone: its peers are past the agreement
                if not summed:
                    scale = 1.0 / comm.world_size  # DDP's own average (FSDP reduce-scattered already)
                elif token_scale is None:  # the summed micro-batches' sums over the batch's samples
                    scale = config.micro_batch / samples_all
                    loss_all /= samples_all
                else:  # the exact 1/items of the whole batch
                    scale = config.micro_batch / items_all if items_all > 0 else 0.0
                    rescaled = True
                self.phase = "reduce"
                comm.reduce(self.model, scale)
                self.phase = "forward"
                total = torch.tensor(loss_all, device=device, dtype=total.dtype)
                if items is not None:
                    items = torch.tensor(items_all, device=device, dtype=items.dtype)
            self.agreed = True
            if self.mutable_buffers is None:
                # The first step shows which buffers forward updates, by value as well as by version:
                # native_batch_norm writes running_mean/var without bumping their version counters.
                self.mutable_buffers = [b for b, saved in restore["buffers"]
                                        if b._version != restore["versions0"][id(b)] or not torch.equal(b, saved)]
            # The one sync of the step: the loss (NaN/inf?) and the item counts are read before the update.
            if token_scale is not None:
                loss_value, total_items, fewest = torch.stack([total, items, low]).tolist()
            else:
                loss_value, total_items, fewest = float(total), float(n), 0.0
            if fewest < 0:
                raise UsageError(f"the loss returned n_items = {fewest:g} for a micro-batch at step "
                                 f"{step}; n_items counts the items loss_sum adds up, so it is >= 0")
            reason = None
            if not math.isfinite(loss_value):
                reason = NONFINITE
                if self.on_nonfinite == "raise":
                    raise NonFiniteLoss(f"the loss at step {step} is {loss_value}; the step was "
                                        "undone (model, optimizer, BatchNorm statistics as before it)")
            elif token_scale is not None and total_items == 0:
                reason = "no items"  # every item was padding: there is no mean to follow
            if token_scale is not None:
                fix = 1.0 / (items * token_scale) if total_items > 0 else None
                # grads = sum_i d(loss_sum_i)/dw * c (averaged over the ranks: c / world); the exact mean
                # needs 1/items: rescale once.
                if fix is not None and ranks is not None:
                    fix = fix * comm.world_size
                if fix is not None and len(sizes) > 1 and not rescaled:  # one micro-batch: c was 1/total already
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(fix)
                mean = total / items.clamp(min=1.0)
            else:
                items = torch.tensor(float(n if ranks is None else samples_all), device=device)
                mean = total
            if reason is None:
                self.phase = "optimizer"
                reason = self._optimizer_step(scaler)  # "committed" once the update is applied
            else:
                self._skip(restore, reason, loss_value, step)
        if reason is None and self.scheduler is not None:
            self.scheduler.step()
        return StepResult(step=step, samples=n, micro_batches=sizes, retries=retries, skipped=reason is not None,
                          peak=peak(), loss_tensor=mean, items_tensor=items, skip_reason=reason)

    def _skip(self, restore: dict[str, Any], reason: str, loss_value: float, step: int) -> None:
        """Leave the model as before the step: no update, BatchNorm statistics back (a NaN poisons them)."""
        self.model.zero_grad(set_to_none=not restore["zeros"])
        with torch.no_grad():
            for b, saved in restore["buffers"]:
                b.copy_(saved)
        for p, grad in restore["grads"]:
            p.grad = grad
        if reason != NONFINITE:
            log.warning("memfit: step %d had no items (every item was padding); its update was skipped", step)
            return
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            message = (f"memfit: the loss at step {step} is {loss_value}; its update was skipped and "
                       "the model left as it was. Later ones are counted (StepResult.skip_reason, "
                       "FitResult.nonfinite) without a warning; pass on_nonfinite='raise' to stop instead.")
            log.warning(message)
            warn(message, NonFiniteLossWarning)

    def _optimizer_step(self, scaler) -> str | None:
        def committed() -> None:
            self.phase = "committed"

        skipped = update(self.optimizer, scaler, clip_grad_norm=self.clip_grad_norm, params=self.model.parameters(),
                         committed=committed, detect_skip=True, zero_grad=self.recipe.config.zero_grad)
        return "grad scaler" if skipped else None


_NO_CONTEXT = contextlib.nullcontext()


class _Ranks:
    """A distributed attempt's shape.

    Where the wrapper issues collectives inside a micro-step (FSDP's gathers and reduce-scatters; DDP's
    buffer broadcast, and its bucket rebuild once per wrapper), every rank runs the same number of
    micro-steps (their collectives pair up): the ranks agree on every rank's samples before the first
    forward, and a rank with fewer samples spreads them evenly (:func:`memfit.config.rank_micro_batches`).
    Where it issues none (memfit's DDP, its reduction deferred, on a model without buffers, once its
    buckets are rebuilt) there is nothing to agree on before the update: each rank splits its own part.

    The math: under FSDP (and for fp16 gradients) a mean loss is weighted by its micro-batch's share of
    the samples of all ranks, the gradients averaged over the ranks; under DDP each rank backpropagates
    its micro-batches' sums over the config's micro-batch (a constant of every rank), and the reduce
    divides by the batch's total from the update's agreement: the same arithmetic in either shape, so a
    resumed run (a new wrapper) steps bit for bit as the uninterrupted one where the ranks' parts split alike.
    """

    def __init__(self, comm: Comm, n: int, config: Config, model: nn.Module) -> None:
        # The agreements a micro-step needs: before the collectives its wrapper issues that no agreement
        # of their own precedes (an OOM on one rank must reach the others before they wait in one).
        self.forward_collectives = issues_collectives(model, "forward")
        # Each rank backpropagates the micro-batches' sums (over a constant of every rank) and the reduce divides
        # by the batch's total, whatever the split: DDP, where its reduce is memfit's (FSDP's reduce-scatter
        # averages), except for fp16 gradients (16-true, or 16-mixed's scaled loss): a sum could overflow.
        half = config.precision in ("16-true", "16-mixed")
        self.summed = not is_fsdp(model) and not half
        self.lockstep = self.forward_collectives or issues_collectives(model, "backward") or not self.summed
        if self.lockstep:
            counts = comm.counts(float(n), where="the start of the step")
            self.total = int(sum(counts))
            self.most = int(max(counts))
            steps = max(-(-int(c) // config.micro_batch) for c in counts)
            self.sizes = rank_micro_batches(n, config.micro_batch, steps)


def _check_loss(out: Any) -> None:
    """The loss's output is a scalar that autograd can differentiate, or ``(loss_sum, n_items)`` with a count."""
    loss = out[0] if isinstance(out, (tuple, list)) and len(out) == 2 else out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        n_items = out[1]
        if isinstance(n_items, bool) or not (isinstance(n_items, (int, float)) or (
                isinstance(n_items, torch.Tensor) and n_items.dim() == 0 and not n_items.is_complex()
                and n_items.dtype != torch.bool)):
            bad = f"a tensor of shape {tuple(n_items.shape)}" if isinstance(n_items, torch.Tensor) else repr(n_items)
            raise UsageError(f"the loss returned (loss_sum, n_items) with n_items = {bad}; n_items is the number "
                             "of items loss_sum adds up: a Python number or a 0-dim tensor, e.g. "
                             "(labels != -100).sum()")
    if isinstance(loss, torch.Tensor) and not loss.requires_grad and torch.is_grad_enabled():
        raise UsageError("the loss does not require grad (it was detached, computed under torch.no_grad(), or "
                         "from parameters with requires_grad=False): return the loss tensor autograd built, "
                         "not loss.item() or loss.detach()")


def _accumulator(loss: torch.Tensor) -> torch.dtype:
    """The dtype losses are added up in: float32, or float64 for a float64 loss."""
    return torch.float64 if loss.dtype == torch.float64 else torch.float32


def _slice(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor (views, no copy); scalars and non-tensors as they are."""
    return map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 else t)


def _loss_error(out: Any, *, mixed: bool) -> MemfitError:
    if mixed:
        return MemfitError("the loss returned a mean for some micro-batches and (loss_sum, n_items) for others; "
                           "return one form for every batch")
    shape = f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""
    return MemfitError(f"the loss returned {type(out).__name__}{shape}; return a scalar mean over the batch "
                       "or (loss_sum, n_items) for token-level losses")
