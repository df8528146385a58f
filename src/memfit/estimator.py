"""estimate(): peak training memory without a GPU, by running the step on fake tensors.

The model, optimizer and batch are built under ``FakeTensorMode``: every tensor
has its shape, dtype and storage size but no memory, so a 70B-parameter model
costs nothing. The same training loop as :func:`memfit.measure` runs under the
same tracker, with the Config's precision, checkpointing and offload applied,
so an estimate and a measurement of a run that fits agree byte for byte on CPU.

For ``device="cuda"`` the fake tensors still live on CPU (fake CUDA tensors can
abort a CPU-only torch build), and memfit emulates what differs on CUDA:
storages rounded to 512 bytes, the optimizers' foreach implementation (CUDA's
default), and, through :mod:`memfit.emulation`, CUDA's kernels and autocast:
dropout's fused kernel (a bool mask, not fp32 noise), fused attention with
dropout (CPU falls back to a kernel that keeps the attention matrix, CUDA does
not), CUDA's autocast op lists (softmax, layer_norm, losses and reductions in
fp32); the caching allocator (:mod:`memfit.allocator`) gives the reserved figure.

Known limitations: memory inside one kernel (cuDNN/cuBLAS scratch, fused
attention's workspace) is not counted; CUDA-only kernels (flash attention) are
represented by their CPU counterparts' outputs; code that branches on tensor
values takes its fake-tensor branch: transformers (5.x) then builds a causal mask
of batch x seq x seq bools that real runs skip, and attention layers that fall
back to CPU's math kernel save it expanded per head (batch x heads x seq x seq
bytes per layer): the estimate errs high by that much; see also :mod:`memfit.tracker`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit import _torch_private
from memfit.allocator import AllocatorEstimate, simulate_caching_allocator
from memfit.categories import PHASES
from memfit.checks import positive_int
from memfit.config import MAX_STEPS, Config, check_world_size
from memfit.devices import DeviceProfile, default_profile, load_profile
from memfit.errors import MemfitError, UsageError, user_frame
from memfit.checkpointing import Checkpointing
from memfit import depth as _depth
from memfit import traces as _traces
from memfit.extrapolation import canonical
from memfit.fakedist import as_rank, rank_world
from memfit.report import History, MemoryReport, build_report
from memfit.step import run_steps
from memfit.strategies import Recipe
from memfit.tracker import track
from memfit.workload import Workload, build_model

__all__ = ["Estimate", "estimate", "DataDependentStep", "source_model", "fake_copy"]


class DataDependentStep(UsageError):
    """The step needs tensor values (boolean-mask indexing, ``.item()``) that fake tensors do not have."""

_TARGETS = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class Estimate:
    """Predicted memory of a training step under a Config. All figures are int bytes.

    Example:
        >>> est = memfit.estimate(memfit.presets.load("llama-7b", seq_len=2048),
        ...                       memfit.Config(micro_batch=1, precision="bf16-true"), device="cuda")
        >>> memfit.format_bytes(est.required)
    """

    config: Config
    """The Config estimated."""
    device: str
    """The target device type: ``"cpu"`` or ``"cuda"``."""
    peak: int
    """Peak bytes of tensor storages (``max_memory_allocated`` without cuBLAS workspaces)."""
    at_peak: dict[str, int]
    """Bytes by category at the peak."""
    phases: dict[str, dict[str, int]]
    """``{"first": ..., "steady": ...}``, each the peak of ``forward``, ``backward``,
    ``optimizer`` and the whole ``step``: the first step allocates optimizer state
    lazily, the steady state carries it."""
    by_module: dict[str, int]
    """Module path -> peak bytes allocated by its forward and backward."""
    report: MemoryReport
    """The full report of the fake run (timeline included)."""
    parameters: int
    """Number of parameters (tied weights counted once)."""
    checkpointed: tuple[str, ...] = ()
    """Module paths whose forward is recomputed in backward."""
    allocator: AllocatorEstimate | None = None
    """CUDA only: the caching allocator's view (allocated with workspaces, reserved)."""
    context: int = 0
    """CUDA only: device memory of the CUDA context (outside the allocator)."""
    profile: DeviceProfile | None = None
    """CUDA only: the card's profile the allocator and context figures come from."""
    notes: tuple[str, ...] = ()
    """How the estimate was made where it matters (a model's depth extrapolated, or why it was not)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reserved(self) -> int | None:
        """CUDA only: predicted ``max_memory_reserved``."""
        return self.allocator.reserved if self.allocator is not None else None

    @property
    def required(self) -> int:
        """The memory a device needs for this step: reserved + context on CUDA, the peak on CPU."""
        if self.allocator is not None:
            return self.allocator.reserved + self.context
        return self.peak

    @property
    def model_states(self) -> int:
        """Parameters + buffers + gradients + optimizer state at their own maxima."""
        own = self.report.peak_by_category
        return own["parameters"] + own["buffers"] + own["gradients"] + own["optimizer_state"]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the report without its timeline)."""
        report = self.report.to_dict()
        del report["timeline"]
        return {
            "config": dataclasses.asdict(self.config),
            "device": self.device,
            "peak": self.peak,
            "required": self.required,
            "reserved": self.reserved,
            "context": self.context if self.allocator is not None else None,
            "profile": self.profile.to_dict() if self.profile is not None else None,
            "allocator": dataclasses.asdict(self.allocator) if self.allocator is not None else None,
            "at_peak": dict(self.at_peak),
            "phases": {k: dict(v) for k, v in self.phases.items()},
            "by_module": dict(self.by_module),
            "model_states": self.model_states,
            "parameters": self.parameters,
            "checkpointed": list(self.checkpointed),
            "notes": list(self.notes),
            "extra": dict(self.extra),
            "report": report,
        }

    def table(self, *, top: int = 10, width: int = 100) -> str:
        """The estimate as text tables: categories at the peak, phases, top modules, the budget needed."""
        from memfit.display import render_estimate

        return render_estimate(self, top=top, width=width)


def estimate(
    workload: Workload,
    config: Config,
    steps: int = 2,
    device: torch.device | str = "cpu",
    *,
    capability: tuple[int, int] | None = None,
    run_all_steps: bool = False,
    accumulation: int = 1,
    profile: DeviceProfile | str | None = None,
    extrapolate: bool | None = None,
    world_size: int = 1,
    sources: bool = False,
) -> Estimate:
    """Estimate the memory of ``steps`` training steps under ``config`` on fake tensors.

    Args:
        workload: factories of the step; ``workload.model`` may also be a model
            instance (real, or built on the meta device): it is copied to fake
            tensors, its weights untouched.
        config: micro-batch, precision, checkpointing, offload.
        steps: training steps to run (2 shows the steady state after the
            optimizer creates its state).
        device: the target, ``"cpu"`` or ``"cuda"`` (no GPU needed for either).
        capability: CUDA compute capability (it sets the cuBLAS workspace and
            the attention kernel CUDA picks); by default the profile's.
        profile: the CUDA card's context, workspaces and capability
            (:class:`memfit.devices.DeviceProfile`, a built-in card name such as
            ``"h100"``, or a file ``memfit calibrate`` wrote); by default the
            calibrated profile of this machine if there is one, else memfit's
            defaults (512 MiB of context, the local GPU's capability or Hopper's).
        accumulation: micro-steps per optimizer step. Under gradient accumulation
            the gradients of the first micro-step are alive during the others;
            2 shows that (a third repeats the second), 1 is a plain step.
        extrapolate: whether a model with a run of identical blocks (transformer
            layers) is traced cut to 2, 3 and 4 of them and extrapolated to its depth
            (:mod:`memfit.depth`), which gives the full trace's figures byte for byte
            where the cut traces show it is exact and traces the full model otherwise
            (the estimate's ``notes`` say which). None (default): where the run has 8
            blocks or more; True: from 5; False: never.
        run_all_steps: run every step on fake tensors. By default only the first
            runs and later ones are derived from its trace (a later step repeats
            the first's allocations, its optimizer state existing from the
            start), which halves the time of the default two steps; the tests
            check that both give identical timelines.
        world_size: the ranks the model is trained on, for ``Config.strategy`` ``"ddp"`` or
            ``"fsdp"``: the estimate is one rank's (``config.micro_batch`` is per rank), traced on
            PyTorch's fake process group (:mod:`memfit.fakedist`): FSDP2's own ``fully_shard``,
            DDP's gradient buckets from its reducer's rules. Under accumulation the micro-steps
            before the last run without gradient sync, as the Trainer runs them.
        sources: record the model's line that ran each allocating forward op (``report.history.sources``,
            what :func:`memfit.explain` shows; :mod:`memfit.sources`).

    Raises:
        UsageError: a bad config, a checkpoint glob that matches no module, a
            model factory that puts tensors on a GPU.
    """
    if not isinstance(workload, Workload):
        raise UsageError(f"estimate() takes a memfit.Workload, got {type(workload).__name__}")
    if not isinstance(config, Config):
        raise UsageError(f"estimate() takes a memfit.Config, got {type(config).__name__}")
    check_world_size(world_size)
    if config.strategy == "single" and world_size > 1:
        raise UsageError(f"world_size={world_size} needs a strategy that runs on several ranks: "
                         "Config(strategy='ddp') or Config(strategy='fsdp'); 'single' is one process")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps must be a whole number from 1 to {MAX_STEPS} (the second step shows the steady "
                         f"state, later ones repeat it), got {steps!r}")
    positive_int(accumulation, "accumulation", hint="micro-steps per optimizer step")
    if extrapolate not in (None, True, False):
        raise UsageError(f"extrapolate must be None (where a run of 8 or more identical blocks makes it worth it), "
                         f"True or False, got {extrapolate!r}")
    if config.optimizer_in_backward and accumulation > 1:
        raise UsageError(f"optimizer_in_backward updates every parameter in each backward, so it cannot accumulate "
                         f"gradients over {accumulation} micro-batches; give one micro-batch per step")
    try:
        target = torch.device(device).type
    except (RuntimeError, TypeError):
        target = device
    if target not in _TARGETS:
        raise UsageError(f"device {device!r} is not a target memfit estimates; use one of {', '.join(_TARGETS)}")
    device = None
    if target == "cuda":
        device = load_profile(profile) if profile is not None else default_profile()
        if capability is not None:
            device = dataclasses.replace(device, capability=capability)
    capability = device.capability if device is not None else (9, 0)
    source = source_model(workload)

    def trace(config: Config) -> _traces.Traced:
        history = None
        notes = ()
        if extrapolate is not False:
            history, note = _depth.extrapolated(
                source, config, (workload, target, capability, steps, accumulation, run_all_steps, world_size),
                lambda cut, cut_config: _trace(workload, cut, cut_config, target, capability, steps, accumulation,
                                               run_all_steps, world_size, sources)[0],
                always=extrapolate is True)
            notes = (note,) if note else ()
        if history is None:
            history, checkpointed = _trace(workload, source, config, target, capability, steps, accumulation,
                                           run_all_steps, world_size, sources)
        else:
            checkpointed = Checkpointing(config.checkpoint).select(source)
        return history, tuple(checkpointed), notes

    # A model instance may change between estimates (a layer swapped, a dtype cast): its shapes are in the key.
    shapes = tuple((name, tuple(t.shape), t.dtype, type(m).__name__) for name, m in source.named_modules()
                   for t in itertools.chain(m._parameters.values(), m._buffers.values()) if t is not None) \
        if isinstance(workload.model, nn.Module) else None
    key = (workload, shapes, target, capability, steps, accumulation, run_all_steps, extrapolate, world_size, sources)
    history, checkpointed, notes = _traces.history(key, config, trace, reuse=extrapolate is not False)
    if target == "cuda":
        history = _traces.rounded(history, 512)  # the caching allocator's blocks, as max_memory_allocated counts
    report = build_report(**history._asdict())

    allocator = None
    if device is not None:
        allocator = simulate_caching_allocator(history.events, capability=device.capability,
                                               cublas_handles=device.cublas_handles,
                                               cublas_workspace=device.cublas_workspace,
                                               other_workspace=device.other_workspace)
    report = dataclasses.replace(report, extra={"workload": workload.name, "estimated": True, "target": target})
    return Estimate(
        config=config,
        device=target,
        peak=report.peak,
        at_peak=dict(report.at_peak),
        phases=_phases(report, steps),
        by_module=dict(report.by_module),
        report=report,
        parameters=sum(p.numel() for p in source.parameters()),
        checkpointed=tuple(checkpointed),
        allocator=allocator,
        context=device.context if device is not None else 0,
        profile=device,
        notes=notes,
        extra={"workload": workload.name, "steps": steps, "accumulation": accumulation,
               "strategy": config.strategy, "world_size": world_size},
    )


def _trace(workload: Workload, source: nn.Module, config: Config, target: str, capability: tuple[int, int],
           steps: int, accumulation: int, run_all_steps: bool, world_size: int,
           sources: bool = False) -> tuple[History, list[str]]:
    """Run the step on a fake copy of ``source`` under the tracker: its history and the checkpointed paths."""
    recipe = Recipe(config, target, fake=True, capability=capability)
    fake_mode = _torch_private.FakeTensorMode()
    with rank_world(config, world_size) as mesh, fake_mode:
        model = fake_copy(source, fake_mode)
        model.train()
        recipe.apply(model)
        model, buckets, sync_off = as_rank(model, config, mesh)
        optimizer = recipe.build_optimizer(workload.optimizer, model)
        shape_error, value_errors = _torch_private.data_dependent_errors()
        try:
            with recipe.emulation(), _torch_private.quiet_fake_tensor_errors(), \
                    track(model, optimizer, device="cpu", round_to=1, sources=sources) as tracker:
                if buckets is not None:
                    buckets.mark(tracker)
                start = tracker.position()
                run_steps(workload, model, optimizer, config.micro_batch, 1, tracker=tracker, recipe=recipe,
                          accumulation=accumulation, no_sync=sync_off)
                # Later steps repeat the first minus what it created and kept (optimizer
                # state): derive them from its trace, unless asked to run them all or the
                # trace cannot be repeated (then they run).
                remaining = steps - 1
                # Unless gradients are set to None after each step, a later step differs from the
                # first: it frees the last step's gradients mid-step (after-forward) or adds into
                # them through a temporary (zeros, AccumulateGrad's grad += new); so it runs.
                repeatable = not run_all_steps and config.zero_grad == "set-to-none"
                if remaining and not (repeatable and tracker.repeat_since(start, remaining)):
                    run_steps(workload, model, optimizer, config.micro_batch, remaining, tracker=tracker,
                              recipe=recipe, accumulation=accumulation, no_sync=sync_off)
        except shape_error as exc:
            raise DataDependentStep(
                f"the step calls {exc.func}{user_frame(exc)}, whose output's shape depends on tensor values "
                "(boolean-mask indexing x[mask], nonzero, masked_select, unique) that fake tensors do not have, so "
                "it cannot be estimated; write the mask arithmetically (torch.where(mask, x, 0), a masked sum "
                "divided by mask.sum()), or measure real steps (memfit profile, memfit.measure)") from None
        except value_errors as exc:
            raise DataDependentStep(
                f"the step reads a tensor's value ({exc.func}: .item(), float(t), int(t) or `if t:`)"
                f"{user_frame(exc)}, which fake tensors do not have, so it cannot be estimated; keep the value "
                "on the device (torch.where, torch.clamp), or measure real steps (memfit profile, memfit.measure)"
            ) from None
    # A copy: the ledger still hears of storages freed later (the model, the optimizer and a
    # GradScaler's scale go when this returns), which the step's record must not show.
    history = tracker.history()
    history = canonical(history.detached())
    return history, recipe.checkpointed


def _phases(report: MemoryReport, steps: int) -> dict[str, dict[str, int]]:
    # Ops after the last optimizer step (GradScaler.update, zero_grad) count as part of it.
    last = min(max((e.step for e in report.timeline), default=0), steps - 1)
    out = {}
    for label, step in (("first", 0), ("steady", last)):
        peaks = dict.fromkeys(PHASES, 0)
        for e in report.timeline:
            if min(e.step, last) == step:
                total = e.total
                if total > peaks[e.phase]:
                    peaks[e.phase] = total
        peaks["step"] = max(peaks.values())
        out[label] = peaks
    return out


def source_model(workload: Workload) -> nn.Module:
    """The model to copy onto fake tensors: the workload's instance, or its factory's model built on meta.

    A factory runs on the meta device, before the fake mode is entered, and the
    model is then copied to fake tensors: ``Module.to()`` (a factory's
    ``.half()``) swaps tensors, which FakeTensorMode refuses, while meta tensors allow it.
    """
    if isinstance(workload.model, nn.Module):
        return workload.model
    # Built once per workload (memfit.traces keeps it): never changed, only copied, and cut then restored.
    return _traces.built(workload, lambda: _meta_model(workload))


def _meta_model(workload: Workload) -> nn.Module:
    with torch.device("meta"):
        model = build_model(workload)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.device.type not in ("meta", "cpu"):
            raise UsageError(
                f"the model factory put {name} on {t.device}; memfit estimates on fake CPU tensors. "
                "Build the model on the default device (no .cuda() or device=... in the factory) "
                "and pass the target as estimate(..., device='cuda')"
            )
    return model


def fake_copy(model: nn.Module, fake_mode) -> nn.Module:
    """Copy a real or meta-device model with every tensor replaced by a fake CPU one of the same shape."""
    memo: dict[int, Any] = {}

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
            if isinstance(t, nn.Parameter):
                fake = nn.Parameter(fake, requires_grad=t.requires_grad)
            memo[id(t)] = fake
        return memo[id(t)]

    for module in model.modules():
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            if t is not None:
                fake_of(t)
        for value in vars(module).values():  # tensors kept as plain attributes
            if isinstance(value, torch.Tensor):
                fake_of(value)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - say which model could not be copied
        raise MemfitError(
            f"cannot copy {type(model).__name__} to fake tensors ({type(exc).__name__}: {exc}); "
            "give the workload a model factory instead (model=lambda: MyModel(...))"
        ) from exc
