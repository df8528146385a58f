"""What each ``memfit`` command does, once :mod:`memfit.cli` has parsed its flags.

Each command imports what it needs when it runs, so that ``memfit -h`` stays fast.
Errors are raised (UsageError for the user's mistakes); :func:`memfit.cli.main`
turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from pathlib import Path

from memfit.config import PRECISIONS
from memfit.errors import UsageError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code."""
    handlers = {"presets": lambda _: _presets(), "estimate": _estimate, "plan": _plan, "demo": _demo,
                "calibrate": _calibrate, "profile": _profile, "explain": _explain}
    return handlers[args.command](args)


def _loop(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("optimizer_impl", "zero_grad", "optimizer_in_backward")}


def _sharding(args: argparse.Namespace) -> dict:
    """The Config's strategy fields from --gpus, --strategy and --no-reshard."""
    strategy = args.strategy or ("single" if args.gpus == 1 else "fsdp")
    if strategy == "single" and args.gpus > 1:
        raise UsageError(f"--strategy single runs on one GPU, and --gpus is {args.gpus}; give --strategy ddp or fsdp")
    if args.no_reshard and strategy != "fsdp":
        raise UsageError(f"--no-reshard is an FSDP setting, and the strategy is {strategy}; give --strategy fsdp")
    if args.sync_every_micro_step and strategy != "fsdp":
        raise UsageError(f"--sync-every-micro-step is an FSDP setting, and the strategy is {strategy}; "
                         "give --strategy fsdp")
    return {"strategy": strategy, "reshard_after_forward": not args.no_reshard,
            "sync_every_micro_step": args.sync_every_micro_step}


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The workload function's keyword arguments: --seq-len and each --arg KEY=VALUE."""
    overrides: dict[str, object] = {}
    for key, value in args.arg:
        if key in overrides:
            raise UsageError(f"--arg {key}= is given twice; give each key once")
        overrides[key] = value
    if args.seq_len is not None:
        if "seq_len" in overrides:
            raise UsageError("--seq-len and --arg seq_len=... both give the sequence length; give one")
        overrides["seq_len"] = args.seq_len
    return overrides


def _presets() -> int:
    from memfit import presets

    for name in presets.names():
        print(presets.describe(name))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from memfit import presets
    from memfit.config import Config
    from memfit.display import PLOT_SUFFIXES
    from memfit.measurement import measure

    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {args.plot}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")
    if args.timeline and not args.json:
        raise UsageError("--timeline only applies with --json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: no CUDA device is available to torch {torch.__version__} here; use --device cpu"
        )
    _check_outputs(args)
    workload = presets.resolve(args.spec, **_overrides(args))
    report = measure(workload, config=Config(micro_batch=args.batch_size, **_loop(args)), steps=args.steps,
                     device=args.device)
    if args.plot is not None:
        report.plot(args.plot)
    _memory_viz(args, report)
    if args.json:
        print(report.to_json(indent=2, timeline=args.timeline))
    else:
        print(report.table(), end="")
        if args.plot is not None:
            print(f"Plot written to {args.plot}")
        _said_memory_viz(args)
    _html(args, report=report)
    return 0


def _memory_viz(args: argparse.Namespace, report) -> None:
    """``--memory-viz PATH``: the report's record in PyTorch's snapshot format (written atomically: a full disk
    leaves nothing)."""
    if args.memory_viz is not None:
        report.to_memory_viz(args.memory_viz)


def _check_outputs(args: argparse.Namespace) -> None:
    """``--html PATH``, ``--memory-viz PATH`` and ``--plot PATH``: refused before any work where the file could not
    be written (a missing or read-only folder, a directory; one line)."""
    from memfit.memory_viz import check_writable

    if getattr(args, "plot", None) is not None:
        check_writable(args.plot, f"--plot {args.plot}")

    if getattr(args, "html", None) is not None:
        if Path(args.html).suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--html {args.html}: the file name must end in .html or .htm")
        check_writable(args.html, f"--html {args.html}")
    if getattr(args, "memory_viz", None) is not None:
        check_writable(args.memory_viz, f"--memory-viz {args.memory_viz}")


def _html(args: argparse.Namespace, **parts) -> None:
    """``--html PATH``: one self-contained page of what the command found (:mod:`memfit.html_page`)."""
    if args.html is None:
        return
    from memfit import html_page

    html_page.write(args.html, title=f"memfit {args.command} {args.spec}", **parts)
    if not getattr(args, "json", False):
        print(f"Page written to {args.html}")


def _said_memory_viz(args: argparse.Namespace) -> None:
    if args.memory_viz is not None:
        print(f"Memory snapshot written to {args.memory_viz} (open it at https://pytorch.org/memory_viz)")


def _config(args: argparse.Namespace):
    """The Config of estimate's and explain's flags."""
    from memfit.config import Config

    if args.precision not in PRECISIONS:
        raise UsageError(f"--precision {args.precision}: expected one of {', '.join(PRECISIONS)}")
    checkpoint = tuple(args.checkpoint)
    if checkpoint == ("none",):
        checkpoint = ()
    elif "none" in checkpoint:
        raise UsageError("--checkpoint none cannot be combined with globs")
    return Config(micro_batch=args.batch_size, precision=args.precision, checkpoint=checkpoint,
                  offload_activations=args.offload_activations, **_loop(args), **_sharding(args))


def _step(args: argparse.Namespace):
    """The budget (None without one), the Config and the workload of estimate's and explain's flags, checked in
    that order, and --html and --memory-viz before any work."""
    from memfit import presets
    from memfit.units import parse_bytes

    budget = parse_bytes(args.budget) if args.budget is not None else None
    config = _config(args)
    _check_outputs(args)
    return budget, config, presets.resolve(args.spec, **_overrides(args))


def _estimate(args: argparse.Namespace) -> int:
    from memfit.estimator import estimate
    from memfit.units import format_budget, format_bytes

    budget, config, workload = _step(args)
    with _progress(f"Estimating {workload.name} on fake tensors"):
        est = estimate(workload, config, steps=args.steps, device=args.device, profile=args.profile,
                       world_size=args.gpus)
    fits = None if budget is None else est.required <= budget
    _memory_viz(args, est.report)
    if args.json:
        data = est.to_dict()
        data["budget"] = budget
        data["fits"] = fits
        print(json.dumps(data, indent=2))
        _html(args, report=est.report, estimate=est)
        return 0
    print(est.table(), end="")
    if budget is not None:
        verdict = "fits" if fits else "does NOT fit"
        print(f"Budget {format_budget(budget)}: the step {verdict} ({format_bytes(est.required)} needed, "
              f"{format_bytes(abs(budget - est.required))} {'to spare' if fits else 'short'}).")
    _said_memory_viz(args)
    _html(args, report=est.report, estimate=est)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from memfit.explain import explain

    budget, config, workload = _step(args)
    with _progress(f"Explaining {workload.name} on fake tensors"):
        why = explain(workload, config, budget, batch_size=args.effective_batch, device=args.device,
                      world_size=args.gpus, profile=args.profile, fixes=not args.no_fixes)
    print(json.dumps(why.to_dict(), indent=2) if args.json else why.table(), end="\n" if args.json else "")
    _html(args, report=why.report, explanation=why)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from memfit import presets
    from memfit.planner import plan, resolve_budget
    from memfit.units import format_budget

    budget = resolve_budget(args.budget, args.device)
    for p in args.precision or ():
        if p not in PRECISIONS:
            raise UsageError(f"--precision {p}: expected one of {', '.join(PRECISIONS)}")
    _check_outputs(args)
    workload = presets.resolve(args.spec, **_overrides(args))
    with _progress(f"Planning {workload.name} for {format_budget(budget)}"), _explained(args):
        result = plan(
            workload,
            budget,
            args.batch_size,
            precisions=args.precision,
            allow_checkpoint=not args.no_checkpoint,
            checkpoint_candidates=args.checkpoint_candidates,
            allow_offload=args.offload_activations,
            device=args.device,
            calibrate=args.calibrate,
            profile=args.profile,
            world_size=args.gpus,
            strategies=args.strategy,
            **_loop(args),
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table(), end="")
    _html(args, report=result.estimate.report, estimate=result.estimate, plan=result)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memfit import demo
    from memfit.units import parse_bytes

    budget = parse_bytes(args.budget) if args.budget is not None else None
    if args.nproc > 1:
        if args.batch_size < args.nproc:
            raise UsageError(f"a batch of {args.batch_size} cannot give each of {args.nproc} processes a sample; "
                             f"give --batch-size {args.nproc} or more")
        forwarded = ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        return demo.launch(args.nproc, forwarded + (["--budget", args.budget] if args.budget is not None else []))
    demo.run(Console(highlight=False), batch_size=args.batch_size, epochs=args.epochs, budget=budget, seed=args.seed)
    return 0


@contextlib.contextmanager
def _explained(args: argparse.Namespace):
    """Where nothing fits, the plan's explanation (a table, or JSON with --json) before the one-line error."""
    from memfit.planner import PlanError

    try:
        yield
    except PlanError as exc:
        why = exc.explanation
        if why is not None:
            print(json.dumps({"error": str(exc), "explanation": why.to_dict()}, indent=2) if args.json
                  else why.table(), end="\n" if args.json else "")
            _html(args, report=why.report, explanation=why)
        raise


@contextlib.contextmanager
def _progress(message: str, delay: float = 1.0):
    """A spinner on stderr once work has taken more than ``delay`` seconds (terminals only)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    status = console.status(message + "...")
    timer = threading.Timer(delay, status.start)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        status.stop()


def _calibrate(args: argparse.Namespace) -> int:
    from memfit.devices import calibrate, default_path
    from memfit.units import format_bytes

    profile = calibrate(args.device)
    path = profile.save(args.output or default_path())
    print(f"{profile.name} (compute capability {profile.capability[0]}.{profile.capability[1]}): CUDA context "
          f"{format_bytes(profile.context)}, cuBLAS workspace {format_bytes(profile.workspace)} per handle.")
    print(f"Profile written to {path}; estimate and plan read it" + ("." if args.output is None else
          f" with --profile {path}."))
    return 0

