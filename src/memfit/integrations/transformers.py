"""The Hugging Face ``Trainer`` under a memfit plan: its ``TrainingArguments``, and its memory counted.

:func:`plan_training_arguments` plans the Trainer's own step and returns your arguments as the plan (a copy that
keeps the effective batch, which ``auto_find_batch_size`` halves), with notes where the Trainer cannot run it:
equal micro-batches only, every layer or none checkpointed (or every n-th), no flag that casts the model.
:class:`MemfitTrainerCallback` counts the steps it runs, reports the peak against the plan, explains an OOM.

Known limitations: one device (DeepSpeed, FSDP, torchrun, DataParallel are refused). Not estimated: the Trainer's
prefetch of an accumulation window of batches; accelerate's fp32 copy of outputs under ``bf16``/``fp16``;
``torch_compile``, NEFTune, label smoothing, your own ``compute_loss``. The callback observes every op, slowing
each step, and counts tensor storages (``max_memory_allocated``'s figure): check a plan on a few steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.budget import simulate_budget
from memfit.checks import positive_int
from memfit.config import Config
from memfit.errors import OutOfMemory, UsageError
from memfit.estimator import Estimate
from memfit.explain import explain
from memfit.fixes import Fix
from memfit.planner import Plan, PlanError, plan
from memfit.searcher import Searcher
from memfit.tracker import track
from memfit.units import format_budget, format_bytes, parse_bytes
from memfit.workload import Workload

try:
    import transformers
except ImportError as _exc:  # pragma: no cover - transformers is in the dev extras
    raise ImportError("memfit.integrations.transformers needs transformers and accelerate: "
                      "pip install 'transformers>=4.46' accelerate") from _exc

__all__ = ["PlannedArguments", "plan_training_arguments", "training_workload", "training_config",
           "MemfitTrainerCallback", "explain_oom"]

from memfit.integrations._transformers_step import training_workload  # noqa: E402 - after transformers' check

_CAST = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


@dataclass(frozen=True, slots=True)
class PlannedArguments:
    """A plan as ``TrainingArguments`` (a result beside them: ``args`` stays the Trainer's own type).

    Example:
        >>> planned = plan_training_arguments(model, args, "24GiB", seq_len=1024)
        >>> trainer = transformers.Trainer(model, planned.args, train_dataset=dataset)
    """

    args: Any
    """A copy of your ``TrainingArguments``: micro-batch, accumulation, checkpointing and precision set."""
    config: Config
    """The memfit Config those arguments run (``plan.config`` where the Trainer can run the plan)."""
    estimate: Estimate
    """Its estimate: ``required`` bytes fit the budget; ``peak`` is what memfit's tracker counts."""
    plan: Plan
    """memfit's plan, before it was fitted to what the Trainer can run."""
    workload: Workload
    """The Trainer's step (your model, its loss and optimizer): ``memfit.Trainer`` runs the same math."""
    notes: tuple[str, ...] = ()
    """What the Trainer cannot run as planned, and what the arguments run instead, with both figures."""
    dtype: torch.dtype | None = None
    """For a ``*-true`` precision, the dtype to cast the model to before building the Trainer; else None."""


def plan_training_arguments(model: nn.Module, args: Any, budget: int | str, *, batch_size: int | None = None,
                            sample: Mapping[str, torch.Tensor] | None = None, seq_len: int | None = None,
                            precisions: tuple[str, ...] | list[str] | str | None = None,
                            allow_checkpoint: bool = True, device: str | None = None) -> PlannedArguments:
    """Plan the HF Trainer's step on ``model`` for ``budget`` (bytes or "24GiB"); return ``args`` as the plan.

    ``batch_size``: the effective batch (default ``per_device_train_batch_size * gradient_accumulation_steps``);
    ``sample``/``seq_len``: the batch (:func:`training_workload`); ``precisions``: those the plan may choose
    (default the arguments': ``bf16`` -> ``bf16-mixed``, ``fp16`` -> ``16-mixed``, else ``32-true``);
    ``device``: the target (default ``"cpu"`` with ``use_cpu``, else ``"cuda"``; a CUDA target reads the card's
    profile as :func:`memfit.plan` does). Raises UsageError for a bad argument, PlanError if nothing fits.
    """
    workload = training_workload(model, args, sample=sample, seq_len=seq_len)
    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps if batch_size is None else batch_size
    positive_int(batch_size, "batch_size", hint="the effective batch: samples per optimizer step")
    device = device or ("cpu" if args.use_cpu else "cuda")
    precisions = precisions or (("bf16-mixed",) if args.bf16 else ("16-mixed",) if args.fp16 else ("32-true",))
    layers, can = _layers(model), allow_checkpoint and bool(getattr(model, "supports_gradient_checkpointing", False))
    p = plan(workload, budget, batch_size, precisions=precisions, allow_checkpoint=can,
             checkpoint_candidates=(layers or None) if can else None, device=device)
    on, kwargs_field = _checkpoint_fields(args)  # transformers 5's activation_checkpointing takes every_n_layers
    config, est, every = _express(p, workload, layers, on == "activation_checkpointing", device)
    changes = {"per_device_train_batch_size": config.micro_batch, "gradient_accumulation_steps":
               batch_size // config.micro_batch, on: bool(config.checkpoint), "bf16": config.precision == "bf16-mixed",
               "fp16": config.precision == "16-mixed", "auto_find_batch_size": False}
    if config.checkpoint:
        changes[kwargs_field] = {"use_reentrant": False, **({"every_n_layers": every} if every > 1 else {})}
    try:
        new = dataclasses.replace(args, **changes)
    except ValueError as exc:  # TrainingArguments' own checks (bf16 on a machine without it)
        raise UsageError(f"TrainingArguments refused the planned values {changes}: {exc}") from exc
    return PlannedArguments(args=new, config=config, estimate=est, plan=p, workload=workload,
                            notes=_notes(args, p, config, est, every, len(layers)), dtype=_CAST.get(config.precision))


def training_config(args: Any, model: nn.Module) -> Config:
    """The memfit Config of the step the HF Trainer runs with ``args`` on ``model`` as it is now."""
    if args.bf16 or args.fp16:
        precision = "bf16-mixed" if args.bf16 else "16-mixed"
    else:  # no autocast: the model's own dtype (cast by you for a *-true plan)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        precision = {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")
    on, kwargs_field = _checkpoint_fields(args)
    layers, every = _layers(model), (getattr(args, kwargs_field) or {}).get("every_n_layers", 1)
    checkpoint = (tuple(layers[::every]) if layers else ("all",)) if getattr(args, on) else ()
    return Config(micro_batch=args.per_device_train_batch_size, precision=precision, checkpoint=checkpoint)


def _checkpoint_fields(args: Any) -> tuple[str, str]:
    # transformers 5 names it activation_checkpointing (and resets a copy setting only gradient_checkpointing to it).
    on = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    return on, on + "_kwargs"


def _layers(model: nn.Module) -> list[str]:
    """The layers the Trainer's checkpointing wraps, in order (transformers' GradientCheckpointingLayer)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # before 4.52: the model's own loop checkpoints its blocks (memfit's "all")
        return []
    return [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def _express(p: Plan, workload: Workload, layers: list[str], every_n: bool, device: str) -> tuple[Config, Estimate, int]:
    """What the Trainer runs for plan ``p``: (the Config, its estimate, every_n_layers). The fewest layers it can
    checkpoint, at least the plan's (``layers[::n]``), with the largest micro-batch that divides the batch and
    fits by an estimate (from the plan's largest down); failing that, every layer, from the whole batch down."""
    batch, planned, k = p.batch_size, p.config, len(p.config.checkpoint)
    n = next((n for n in range(len(layers), 0, -1) if every_n and len(layers[::n]) >= k), 1) if k else 0
    first = (tuple(layers[::n]) if layers else ("all",)) if n else ()
    if batch % planned.micro_batch == 0 and first == planned.checkpoint:
        return planned, p.estimate, n
    searcher = Searcher(workload, device, batch_size=batch)
    largest = max(p.alternatives[0].largest or 0, planned.micro_batch)
    for ckpt, every, top in ((first, n, largest), (tuple(layers) or ("all",), 1, batch)):
        for m in (m for m in range(top, 0, -1) if batch % m == 0):
            est = searcher.estimate(dataclasses.replace(planned, micro_batch=m, checkpoint=ckpt))
            if est.required <= p.budget:
                return est.config, est, every
    raise PlanError(f"the plan ({planned.describe()}) fits, but nothing the HF Trainer runs (equal micro-batches dividing "
                    f"{batch}) fits {format_budget(p.budget)}: use memfit.Trainer", floor=p.estimate.model_states, budget=p.budget)


def _notes(args: Any, p: Plan, config: Config, est: Estimate, every: int, n_layers: int) -> tuple[str, ...]:
    notes, batch, m, acc = [], p.batch_size, config.micro_batch, p.accumulation
    fits = f"predicted {format_bytes(est.required)} of {format_budget(p.budget)}"
    if len(set(acc)) > 1 or m != p.config.micro_batch:
        split = " + ".join(f"{s} x {acc.count(s)}" if acc.count(s) > 1 else str(s) for s in dict.fromkeys(acc))
        notes.append(f"the plan splits the batch of {batch} into {split}, which the HF Trainer cannot run (its "
                     "micro-batches are equal: per_device_train_batch_size x gradient_accumulation_steps); these "
                     f"arguments run {m} x {batch // m}: the same batch of {batch}, so the same math, in {batch // m} "
                     f"micro-steps instead of {len(acc)}, {fits}")
    if config.checkpoint != p.config.checkpoint:
        notes.append(f"the plan checkpoints {len(p.config.checkpoint)} of {n_layers} layers; the HF Trainer checkpoints "
                     f"every layer, every n-th or none: these arguments checkpoint {len(config.checkpoint)} ("
                     f"{f'every_n_layers={every}' if every > 1 else 'all'}), more recomputation, and fit: {fits}")
    if config.precision in _CAST:
        notes.append(f"precision {config.precision}: no HF Trainer flag casts the model; cast it before building the Trainer, "
                     f"model.to({_CAST[config.precision]}), with bf16=False and fp16=False as here (16-bit states, as planned)")
    if args.auto_find_batch_size:
        notes.append("auto_find_batch_size turned off: after an out-of-memory error it halves the effective batch")
    return tuple(notes)


def explain_oom(failure: dict[str, Any]) -> str:
    """The message of an out-of-memory error in an HF Trainer's step: where, the plan, what was alive.

    The seam for ``memfit.explain``: :class:`MemfitTrainerCallback` calls this module's ``explain_oom`` with its
    ``failure`` (``error``, the message's first line; ``step``, ``micro_step`` of ``micro_steps``, from 1; ``phase``;
    ``config``, what ran; ``live``, bytes alive by category; ``plan``; ``planned``, the planned arguments' estimate;
    ``workload``, the Trainer's step if known; ``fixes``): a new body here changes every explanation.
    """
    f, alive = failure, ", ".join(f"{k} {format_bytes(v)}" for k, v in failure["live"].items() if v)
    lines = [f"out of memory in the HF Trainer at step {f['step']}, micro-step {f['micro_step']} of {f['micro_steps']} "
             f"({f['phase']}), running {f['config'].describe()}: {f['error']}"]
    if f["planned"] is not None:
        lines.append(f"memfit planned {f['planned'].config.describe()}, predicted {format_bytes(f['planned'].required)}"
                     + (f" of {format_budget(f['plan'].budget)}" if f["plan"] is not None else ""))
    return ". ".join(lines + [f"alive at the failure: {format_bytes(sum(f['live'].values()))} ({alive})"]) + "."


class MemfitTrainerCallback(transformers.TrainerCallback):
    """Counts an HF Trainer's steps with memfit's tracker, reports the peak against the plan, explains an OOM.

    Enter it around ``trainer.train()``: the tracker counts from the start of training (the Trainer's own
    optimizer and its state included) to its end, and leaving the block is where an out-of-memory error is
    caught (a callback never sees one), explained (:func:`explain_oom`) and raised as :class:`memfit.OutOfMemory`
    with ``.fixes`` and ``.report``. ``plan``: a :class:`PlannedArguments` or :class:`memfit.Plan` to compare
    with; ``budget``: train under :func:`memfit.simulate_budget` of this size (rehearse a device on CPU).
    After training :attr:`report` is plain data in int bytes (``peak``, the highest live tensor bytes of any
    step; ``at_peak`` by category; ``step_peaks``; ``planned``, the plan's ``Estimate.peak``; ``budget``;
    ``report``, the peak step's MemoryReport), and log entries get ``memfit/peak_bytes`` and
    ``memfit/planned_bytes``. After an OOM, :attr:`failure` is what :func:`explain_oom` was told.

    Example:
        >>> memory = MemfitTrainerCallback(planned)
        >>> trainer = transformers.Trainer(model, planned.args, train_dataset=dataset, callbacks=[memory])
        >>> with memory:
        ...     trainer.train()
        >>> memory.report["peak"], memory.report["planned"]
    """

    def __init__(self, plan: PlannedArguments | Plan | None = None, *, budget: int | str | None = None) -> None:
        if plan is not None and not isinstance(plan, (PlannedArguments, Plan)):
            raise UsageError(f"MemfitTrainerCallback(plan=...) takes what plan_training_arguments or memfit.plan "
                             f"returns, got {type(plan).__name__}")
        self.plan, self.budget = plan, parse_bytes(budget) if budget is not None else None
        self._plan = plan.plan if isinstance(plan, PlannedArguments) else plan  # memfit's own Plan, or None
        self.report: dict[str, Any] | None = None  # plain data, as failure: see the class docstring
        self.failure: dict[str, Any] | None = None
        self._armed, self._tracker, self._where = False, None, [0, 0]

    def __enter__(self) -> MemfitTrainerCallback:
        self._armed, self.report, self.failure = True, None, None
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self._armed = False
        if self._tracker is None or not isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, OutOfMemory):
            return self._stop(kind, exc, tb)
        # The failed step's frames still hold its tensors (the traceback keeps them): the bytes at the failure.
        live, report = self._tracker.live_by_category(), self._tracker.report()
        self._stop(kind, exc, tb)
        (step, micro), phase = self._where, report.timeline[-1].phase if report.timeline else "before the first op"
        self.failure = {"error": str(exc).split("\n")[0].rstrip("."), "step": step, "micro_step": micro, "phase": phase,
                        "micro_steps": self._args.gradient_accumulation_steps, "config": self._config, "live": live,
                        "plan": self._plan, "planned": self.plan.estimate if self.plan is not None else None,
                        "workload": getattr(self.plan, "workload", None), "fixes": self._fixes(live)}
        self._state.log_history.append({"memfit/oom_step": step, "memfit/peak_bytes": report.peak,
                                        "step": self._state.global_step})
        error = OutOfMemory(explain_oom(self.failure), micro_batch=self._config.micro_batch, retries=0, report=report,
                            fixes=self.failure["fixes"])  # err.explanation: memfit.explain, its fixes estimated
        error.explain_with(lambda: explain(report, self._config, self.budget or getattr(self._plan, "budget", None),
                                           workload=self.failure["workload"], device=self._model.device.type,
                                           batch_size=self._config.micro_batch * self._args.gradient_accumulation_steps))
        raise error from exc

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._armed:
            raise UsageError("MemfitTrainerCallback counts inside a `with` block, where it can catch an out-of-memory "
                             "error: `with callback: trainer.train()`")
        self._stop()  # a previous attempt (auto_find_batch_size retries after an OOM) left its tracker running
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds torch's
        self._args, self._state, self._model = args, state, model
        self._config, self._peaks, self._best = training_config(args, model), [], None
        inner = inner if isinstance(inner, torch.optim.Optimizer) else None
        tracker = simulate_budget(self.budget, model, inner) if self.budget is not None else track(model, inner)
        self._tracker = tracker.__enter__()

    def on_step_begin(self, args, state, control, **kwargs):
        self._where = [state.global_step + 1, 1]

    def on_substep_end(self, args, state, control, **kwargs):
        self._where[1] += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self._tracker is not None:
            self._peaks.append(self._tracker.peak)
            self._keep_peak()
            self._tracker.forget_history()  # a long run's history grows by every op: the peak step's report is kept

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._tracker is None:
            return
        entry = {"memfit/peak_bytes": max(self._tracker.peak, self._best[0] if self._best else 0),
                 **({"memfit/planned_bytes": self.plan.estimate.peak} if self.plan is not None else {})}
        for target in (logs or {}, state.log_history[-1] if state.log_history else {}):
            target.update(entry)  # the Trainer logged a copy of logs: both get the figures

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracker is None:
            return
        self._keep_peak()  # ops after the last step's end
        (peak, report), plan = self._best, self._plan
        self.report = {"peak": peak, "at_peak": dict(report.at_peak), "step_peaks": tuple(self._peaks),
                       "planned": plan and self.plan.estimate.peak, "budget": self.budget or (plan and plan.budget),
                       "report": report}
        self._stop()

    def _keep_peak(self) -> None:
        if self._best is None or self._tracker.peak > self._best[0]:
            self._best = (self._tracker.peak, self._tracker.report())

    def _stop(self, *exc: Any) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.__exit__(*(exc or (None, None, None)))

    def _fixes(self, live: dict[str, int]) -> tuple[Fix, ...]:
        """What would make the step fit, as the arguments to change (each a Config change where it is one)."""
        args, c, layers = self._args, self._config, _layers(self._model)
        batch, levers = args.per_device_train_batch_size * args.gradient_accumulation_steps, []
        if c.precision == "32-true":
            levers.append(Fix("bf16=True (fp16=True on GPUs without bf16)", "halves activations",
                              change=(("precision", "bf16-mixed"),)))
        if not c.checkpoint and layers:
            levers.append(Fix(f"{_checkpoint_fields(args)[0]}=True", "recomputes each layer's activations in backward",
                              change=(("checkpoint", tuple(layers)),)))
        if (smaller := next((m for m in range(c.micro_batch - 1, 0, -1) if batch % m == 0), None)) is not None:
            levers.append(Fix(f"per_device_train_batch_size={smaller}, gradient_accumulation_steps={batch // smaller}",
                              f"keeps the batch of {batch}", change=(("micro_batch", smaller),)))
        if (plan := self._plan) is not None:
            levers.append(Fix(f"the plan predicted {format_bytes(plan.required)} of {format_budget(plan.budget)}; if "
                              "something else holds device memory, plan for less (plan_training_arguments(budget=...))"))
        states = sum(live.get(k, 0) for k in ("parameters", "buffers", "gradients", "optimizer_state"))
        levers.append(Fix(f"{format_bytes(sum(live.values()))} was alive at the failure, the model states "
                          f"{format_bytes(states)} of it"))
        return tuple(levers + [Fix("a larger budget or device")])
