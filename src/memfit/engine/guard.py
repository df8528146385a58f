"""OOMGuard: runs a trainer's attempts at a logical batch and recovers from what goes wrong in them.

A ``torch.OutOfMemoryError`` in any micro-step discards the batch's partial
gradients, restores what the attempt changed (BatchNorm statistics, the RNG,
optimizer state created by the attempt), releases the exception's frames and the
allocator cache, re-plans (the plan's next alternative predicted to need less
memory, else half the micro-batch), and redoes the same logical batch: every
sample counts exactly once. Any other exception (Ctrl-C too) is undone the same
way before it propagates: a step is atomic.

Known limitations:
* An OOM inside ``optimizer.step()`` after it has updated a tensor in place
  cannot be undone without a second copy of the model states, which is the
  memory the user does not have. The guard checks the tensors' version counters:
  an OOM before the first in-place write (the common case: creating the state
  in the first step, or a foreach temporary) is retried with the per-tensor
  implementation; after one, :class:`memfit.OutOfMemory` says so and asks to
  reload the last :meth:`memfit.Trainer.state_dict`.
* BatchNorm statistics depend on the micro-batch (they are per forward pass),
  so no accumulation is exact for them; dropout masks are drawn per
  micro-batch, so runs with different splits differ by their randomness.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
import weakref
from typing import Any

import torch

from memfit import _torch_private, rng
from memfit.config import Config, accumulation_steps
from memfit.engine.comm import FAILED, OK, OOM, STOP, CommTimeout, PeerFailed, PeerOutOfMemory, PeerStopped
from memfit.engine.advice import OOMAdvice
from memfit.engine.probe import optimizer_state_tensors
from memfit.engine.results import OOMEvent, StepResult
from memfit.errors import OutOfMemory

__all__ = ["OOMGuard"]

log = logging.getLogger("memfit")


class OOMGuard(OOMAdvice):
    """The out-of-memory guard and step atomicity of one :class:`memfit.Trainer`; see the module docstring.

    It works on the trainer it is given (typed ``Any``: the trainer imports the guard, not the other
    way): its model, optimizer, counters, and the step it attempts (``trainer._attempt``).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        super().__init__(trainer)

    def run(self, batch: Any, n: int) -> StepResult:
        """Attempts ``batch`` (``n`` samples) until it fits, re-planning after each OOM; counts the step."""
        t, attempt = self.trainer, self.trainer._attempt
        retries = 0
        events: list[OOMEvent] = []

        def event(action: str, config: Config | None = None) -> tuple[OOMEvent, ...]:
            events.append(OOMEvent(step=step, phase=phase, micro_batch=min(failed.micro_batch, n), message=message,
                                   action=action, config=config))
            return tuple(events)

        while True:
            restore = None
            attempt.phase, attempt.agreed = "forward", False
            try:
                restore = self.snapshot()  # inside the guard: saving the state may itself run out
                result = attempt(batch, n, t.config, t.step_count + 1, retries, restore)
            except torch.OutOfMemoryError as exc:
                if isinstance(exc, OutOfMemory):  # memfit's own (a nested guard gave up): not retried here
                    self.abandon(restore, n, exc)
                    raise
                message = str(exc).split("\n")[0]
                own = not isinstance(exc, PeerOutOfMemory)  # a peer's message says whose memory ran out
                # Past the update's agreement the other ranks apply (or have applied) the update: no retry of
                # this rank alone could pair with them, so every rank stops (they learn it at their next agreement).
                stop = attempt.agreed and attempt.comm.world_size > 1
                if not isinstance(exc, PeerOutOfMemory) and (stop or not attempt.agreed):
                    # The other ranks are waiting at an agreement: tell them to drop the attempt, or to stop.
                    told = self._tell_peers(STOP if stop else OOM)
                    if told is not None:  # they cannot be told: this rank's OOM first, then why it stops
                        self.abandon(restore, n, exc, signalled=True)
                        raise OutOfMemory(f"out of memory on rank {attempt.comm.rank} at step {t.step_count + 1} "
                                          f"({message}); no retry: {told}", micro_batch=t.config.micro_batch,
                                          retries=retries) from None
                # The frames hold the attempt's activations: clear them before anything else.
                traceback.clear_frames(exc.__traceback__)
                del exc
            except PeerStopped as exc:  # another rank ran out where no retry is possible: every rank stops
                self.abandon(restore, n, exc)
                raise OutOfMemory(f"{exc}; rank {attempt.comm.rank} undid its attempt at step {t.step_count + 1} "
                                  "and stops too. If a rank's update was applied and another's was not, the ranks' "
                                  "models differ: resume from the last save", micro_batch=t.config.micro_batch,
                                  retries=retries) from None
            except BaseException as exc:  # any error, KeyboardInterrupt too: undo, then let it propagate
                self.abandon(restore, n, exc)
                raise
            else:
                t._count(n, result)
                return dataclasses.replace(result, oom_events=tuple(events)) if events else result
            failed, phase, step = t.config, attempt.phase, t.step_count + 1
            where = f" on rank {attempt.comm.rank}" if attempt.comm.world_size > 1 and own else ""
            if phase == "committed":  # the update was applied: the batch counts, nothing to redo
                t._count(n, None)
                t.model.zero_grad(set_to_none=True)
                raise OutOfMemory(f"out of memory{where} after optimizer.step() had updated the model at step "
                                  f"{t.step_count} ({message}); the batch counted and is not redone",
                                  micro_batch=failed.micro_batch, retries=retries, report=self.report(failed),
                                  events=event("raised")) from None
            if stop:  # past the update's agreement on several ranks (the reduce, clipping, optimizer.step())
                self.discard(restore)  # no rebuild: DDP's constructor is a collective the others will not join
                untouched = _optimizer_untouched(restore)
                raise OutOfMemory(
                    f"out of memory{where} in the {phase} phase at step {step}, after the ranks had agreed on the "
                    f"update ({message}); the other ranks " + ("apply it and stop at their next agreement: "
                    "the ranks' models now differ by this step; resume from the last save" if untouched else
                    "stop too; optimizer.step() had updated tensors in place here: resume from the last save"),
                    micro_batch=failed.micro_batch, retries=retries, report=self.report(failed),
                    events=event("raised")) from None
            self.discard(restore)
            t._rebuild()  # DDP's reducer or FSDP's gathered parameters, as a fresh step expects them
            t._probe.release_cached_memory()  # after an OOM only: hand cached blocks back before the retry
            retries += 1
            t.retries += 1
            if phase == "optimizer" and not _optimizer_untouched(restore):
                raise OutOfMemory(
                    f"out of memory inside optimizer.step() at step {step}, after it had updated "
                    "tensors in place; the model and optimizer cannot be restored without a second copy of them. "
                    "Reload the last trainer.state_dict().",
                    micro_batch=failed.micro_batch, retries=retries, report=self.report(failed),
                    fixes=self.fixes(failed), events=event("raised"),
                ) from None
            if phase == "optimizer" and _uses_foreach(t.optimizer, t.device):
                _disable_foreach(t.optimizer)
                event("per-tensor optimizer")
                log.warning("memfit: out of memory in optimizer.step() at step %d (%s); retrying the batch with the "
                            "per-tensor optimizer implementation, which needs fewer temporaries", step, message)
                continue
            # Every rank decides alike: from the most samples any rank had (each rank's own where unknown).
            most = attempt.comm.most_samples(max(n, attempt.most_samples or n))
            if min(failed.micro_batch, most) == 1 or retries > t.max_retries:
                why = "micro-batch 1 does not fit" if min(failed.micro_batch, most) == 1 else \
                    f"{t.max_retries} re-plans did not fit"
                error = OutOfMemory(
                    f"out of memory{where} at step {step} in the {phase} phase: {why} ({message})",
                    micro_batch=min(failed.micro_batch, n), retries=retries, report=self.report(failed),
                    fixes=self.fixes(failed), events=event("raised"),
                )
                error.explain_with(lambda: self.explanation(failed, n, error.report))
                raise error from None
            self.replan(failed, most)
            event("re-planned", t.config)
            log.warning(
                "memfit: out of memory at step %d with micro-batch %d (%s); retrying the same batch of %d "
                "with %s (%d micro-steps)", step, min(failed.micro_batch, n), message, n,
                t.config.describe(), len(accumulation_steps(n, t.config.micro_batch)),
            )

    def settle(self, where: str) -> None:
        """Every rank reached ``where`` (the end of fit, a save): one that stopped after its last step's
        agreement (out of memory in ``optimizer.step()``) tells the others here, who stop with OutOfMemory too."""
        comm = self.trainer._attempt.comm
        if comm.world_size == 1:
            return
        try:
            comm.agree(OK, where=where)
        except PeerStopped as exc:
            raise OutOfMemory(f"{exc}; rank {comm.rank} stops too: the ranks' models may differ by the last step, "
                              "resume from the last save", micro_batch=self.trainer.config.micro_batch,
                              retries=0) from None

    def _tell_peers(self, status: int) -> str | None:
        """Signal ``status`` to the other ranks; None once told, else why they could not be (one died)."""
        try:
            self.trainer._attempt.comm.signal(status)
        except CommTimeout as exc:
            return str(exc)
        return None

    def abandon(self, restore: dict[str, Any] | None, n: int, exc: BaseException, *, signalled: bool = False) -> None:
        """An exception other than a retried OOM left an attempt: put back what it changed, or count a committed step.

        The other ranks are told at their next agreement: to stop (this rank failed), or nothing where they
        told this one. This rank's own error stays the one raised; a peer that cannot be told is a note on it.
        """
        t = self.trainer
        attempt = t._attempt
        peer = isinstance(exc, (PeerOutOfMemory, PeerFailed, PeerStopped, CommTimeout))
        if not signalled and not peer:  # one process: signal is a no-op
            why = self._tell_peers(FAILED)  # the other ranks stop at their next agreement instead of waiting
            if why is not None and hasattr(exc, "add_note"):
                exc.add_note(f"memfit: the other ranks could not be told of this error: {why}")
        if t._attempt.phase == "committed":  # optimizer.step() applied the update: the batch counts
            t._count(n, None)
            t.model.zero_grad(set_to_none=True)
            return
        in_optimizer = t._attempt.phase == "optimizer"
        self.discard(restore)
        if in_optimizer and not _optimizer_untouched(restore) and hasattr(exc, "add_note"):
            exc.add_note("memfit: this happened inside optimizer.step() after it had updated tensors in place; "
                         "the model and optimizer are not as before the step: reload the last save.")

    def snapshot(self) -> dict[str, Any]:
        """What an attempt may change before it can fail, to put back if it does."""
        t = self.trainer
        buffers = t._attempt.mutable_buffers
        learning = buffers is None  # first step: all buffers, to learn which ones forward updates
        if learning:
            buffers = list(t.model.buffers())
        # Gradients are None between steps; ones the caller left on the model are kept as they were.
        # With zero_grad="zeros" they are zeros (zeroed again, not copied); with "after-forward" they
        # are the last step's, freed before this step's backward in any case (nothing to keep).
        zero_grad = t._recipe.config.zero_grad
        grads = [(p, p.grad.detach().clone()) for p in t.model.parameters()
                 if p.grad is not None] if zero_grad == "set-to-none" else []
        optimizer = t.optimizer
        return {
            "buffers": [(b, b.detach().clone()) for b in buffers],
            "versions0": {id(b): b._version for b in buffers} if learning else None,
            "grads": grads,
            "zeros": zero_grad == "zeros",
            "rng": rng.capture(cuda=t.device.type == "cuda", portable=False),
            "has_state": {id(p) for p in optimizer.state},
            # Weak references: a strong one would keep a state tensor the optimizer replaces alive twice.
            "versions": [(weakref.ref(x), x._version) for x in _optimizer_tensors(optimizer)],
        }

    def discard(self, restore: dict[str, Any] | None) -> None:
        """Undo a failed attempt (what ``optimizer.step()`` wrote in place excepted: see _optimizer_untouched).

        ``restore`` is None when taking the snapshot itself failed: nothing had changed yet.
        The optimizer's parameters are the model's (checked at construction): one zero_grad frees them all.
        """
        t = self.trainer
        # The batch's partial gradients: freed, or zeroed where gradients live as zeros.
        t.model.zero_grad(set_to_none=restore is None or not restore["zeros"])
        if restore is not None:
            with torch.no_grad():
                for b, saved in restore["buffers"]:
                    b.copy_(saved)
            for p, grad in restore["grads"]:
                p.grad = grad
            rng.restore(restore["rng"])
            # State the attempt created (the first step's) goes; state it changed cannot be undone.
            for p in [p for p in t.optimizer.state if id(p) not in restore["has_state"]]:
                del t.optimizer.state[p]
        scaler = t._recipe.scaler()
        if scaler is not None:
            _torch_private.reset_grad_scaler_step(scaler)

    def replan(self, failed: Config, n: int) -> None:
        """The plan's cheapest alternative predicted to need less than ``failed``, else half its micro-batch."""
        t = self.trainer
        if t.plan is not None and t._required is not None:
            for alt in t.plan.alternatives:
                c = alt.config
                if (alt.fits and alt.required < t._required and c != failed and c.precision == failed.precision
                        and c.offload_activations == failed.offload_activations):
                    t._required = alt.required
                    t.use(c)
                    return
        t._required = None  # below the plan's predictions: halve from here on
        t.use(dataclasses.replace(failed, micro_batch=max(1, min(failed.micro_batch, n) // 2)))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor ``optimizer.step()`` may write: the parameters and the state."""
    return [p for group in optimizer.param_groups for p in group["params"]] + optimizer_state_tensors(optimizer)


def _optimizer_untouched(restore: dict[str, Any]) -> bool:
    """False if ``optimizer.step()`` wrote a parameter or state tensor in place since the snapshot.

    Called only for an attempt that reached the optimizer, so its snapshot exists.
    """
    # A tensor gone (replaced) or with a new version was written: the optimizer state moved on.
    return all((x := ref()) is not None and x._version == v for ref, v in restore["versions"])


def _uses_foreach(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    # foreach=None means "foreach on CUDA, the per-tensor loop elsewhere" (torch.optim's default).
    return any("foreach" in g and (g["foreach"] or (g["foreach"] is None and device.type == "cuda"))
               for g in optimizer.param_groups)


def _disable_foreach(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = False
