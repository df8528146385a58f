"""The ``memfit`` command line.

Exit codes: 0 done; 2 a usage error (a bad flag value, an unknown workload, a
workload function that returns the wrong thing), one line on stderr; 1 anything
else that stopped the command (out of device or host memory, nothing fits the
budget, an error inside the workload's code), one line on stderr; 130 Ctrl-C.
``--traceback`` shows the full traceback of an unexpected error instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path

from memfit.config import MAX_STEPS, OPTIMIZER_IMPLS, PRECISIONS, ZERO_GRADS
from memfit.errors import MemfitError, UsageError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
# Flags whose value may start with "-" (a negative size, refused with the size's own message,
# not argparse's "expected one argument").
_VALUE_FLAGS = ("--budget",)


class _UsageExit(Exception):
    """Raised by the parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, no usage dump
        raise _UsageExit(message)


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1 or str(value) != text.strip().lstrip("+"):
            raise argparse.ArgumentTypeError(f"{flag} takes a positive whole number, got {text!r}")
        return value

    parse.__name__ = flag
    return parse


def _steps(text: str) -> int:
    value = _positive_int("--steps")(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"--steps takes 1 to {MAX_STEPS}, got {text!r}: the second step shows the "
                                         "steady state, later ones repeat it")
    return value


def _key_value(text: str) -> tuple[str, object]:
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"--arg takes KEY=VALUE with KEY a Python name, got {text!r}; "
                                         "e.g. --arg image_size=64 --arg arch=resnet18")
    try:
        value = ast.literal_eval(raw)  # numbers, True/False/None, quoted strings, lists
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string: --arg arch=resnet18
    return key.strip(), value


def _add_loop_args(parser: argparse.ArgumentParser) -> None:
    """How the training loop runs the optimizer and releases gradients (Config's fields of these names)."""
    parser.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="default", help="torch.optim's "
                        "implementation; its temporaries: for-loop two parameter-sized per tensor, foreach a copy of "
                        "all exp_avg_sq, fused none (default: PyTorch's, foreach on CUDA, for-loop on CPU)")
    parser.add_argument("--zero-grad", choices=ZERO_GRADS, default="set-to-none", help="when gradients are "
                        "released: right after the step (default), after the next forward, or never (zeros)")
    parser.add_argument("--optimizer-in-backward", action="store_true", help="step each parameter in its "
                        "post-accumulate-grad hook and free its gradient at once (one micro-batch per step)")


def _loop(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("optimizer_impl", "zero_grad", "optimizer_in_backward")}


def _add_workload_args(parser: argparse.ArgumentParser, batch_help: str) -> None:
    parser.add_argument(
        "spec",
        metavar="SPEC",
        help="a preset (see `memfit presets`), path/to/file.py:function or package.module:function "
        "returning a memfit.Workload",
    )
    parser.add_argument("--batch-size", "-b", required=True, type=_positive_int("--batch-size"), help=batch_help)
    parser.add_argument("--seq-len", type=_positive_int("--seq-len"), help="sequence length, for language-model presets")
    parser.add_argument("--arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="a keyword argument for the workload function or preset, e.g. --arg image_size=64 "
                        "(numbers, True/False and quoted strings are Python values; other words are strings)")


def build_parser() -> argparse.ArgumentParser:
    from memfit import __version__

    parser = _Parser(
        prog="memfit",
        description="Make PyTorch training fit in GPU memory: measure a training step's memory "
        "by category and module, estimate it on fake tensors without a GPU, plan the configuration that fits "
        "a budget, and see it all train in `memfit demo`.",
    )
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    profile = commands.add_parser(
        "profile",
        help="run real training steps and report their memory",
        description="Run real training steps (forward, backward, optimizer step) under memfit's tracker and "
        "report the peak by category, phase and module.",
    )
    _add_workload_args(profile, "micro-batch size")
    profile.add_argument("--steps", type=_steps, default=2, help=f"training steps to run, 1 to {MAX_STEPS} (default 2)")
    profile.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    profile.add_argument("--plot", metavar="PATH", help="also plot the timeline to PATH (.png, .svg or .pdf)")
    profile.add_argument("--json", action="store_true", help="print only JSON")
    profile.add_argument("--timeline", action="store_true", help="with --json, include the per-op timeline")
    _add_loop_args(profile)

    estimate = commands.add_parser(
        "estimate",
        help="predict a training step's memory without a GPU",
        description="Predict the memory of a training step on fake tensors (no memory used, no GPU needed): "
        "categories at the peak, phase peaks, top modules and the memory a device needs.",
    )
    _add_workload_args(estimate, "micro-batch size")
    estimate.add_argument("--precision", default="32-true", metavar="P",
                          help=f"one of {', '.join(PRECISIONS)} (default 32-true)")
    estimate.add_argument("--checkpoint", nargs="+", default=[], metavar="GLOB",
                          help="module-path globs to recompute in backward ('transformer.h.*'), 'all' for every block, or 'none'")
    estimate.add_argument("--offload-activations", action="store_true", help="keep saved activations in CPU memory")
    estimate.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                          help="the target to estimate for (default cuda; no GPU is needed)")
    estimate.add_argument("--steps", type=_steps, default=2, help=f"training steps to simulate, 1 to {MAX_STEPS} (default 2)")
    estimate.add_argument("--budget", metavar="BYTES",
                          help="say whether the step fits in this much memory: 24GiB, or a card such as rtx4090, h100")
    estimate.add_argument("--json", action="store_true", help="print only JSON")
    _add_loop_args(estimate)

    plan = commands.add_parser(
        "plan",
        help="choose the configuration that fits a budget at the best speed",
        description="Choose micro-batch, gradient accumulation, precision and checkpointing so that a training "
        "step of the given effective batch fits the budget at the lowest predicted cost, from estimates (no GPU needed).",
    )
    _add_workload_args(plan, "the effective batch to keep")
    plan.add_argument("--budget", required=True, metavar="BYTES",
                      help="device memory to fit: 24GiB, a card (rtx4090, a100-80gb, h100; see the README), or 'auto' "
                      "(free CUDA memory)")
    plan.add_argument("--precision", nargs="+", default=None, metavar="P",
                      help=f"precisions the plan may use (default: 32-true only), among {', '.join(PRECISIONS)}")
    plan.add_argument("--no-checkpoint", action="store_true", help="never checkpoint activations")
    plan.add_argument("--checkpoint-candidates", nargs="+", default=None, metavar="GLOB",
                      help="the modules the plan may checkpoint (globs, or 'seq[2:5]' for a Sequential's segment); "
                      "by default the model's repeated blocks")
    plan.add_argument("--offload-activations", action="store_true", help="allow offloading saved activations to CPU memory")
    plan.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="the target (default cuda; no GPU needed)")
    plan.add_argument("--calibrate", action="store_true", help="time a few real micro-steps on --device to fit the efficiency curve")
    plan.add_argument("--json", action="store_true", help="print only JSON")
    _add_loop_args(plan)

    demo = commands.add_parser(
        "demo",
        help="train the seed article's CNN on bundled digits under a simulated budget too small for its batch",
        description="The whole job on data bundled with scikit-learn (nothing is downloaded): the naive step fails "
        "with out-of-memory on a simulated device, memfit plans micro-batches and accumulation, trains under the "
        "plan with a progress bar, and reports test accuracy and peak memory against the budget.",
    )
    demo.add_argument("--batch-size", "-b", type=_positive_int("--batch-size"), default=256,
                      help="the effective batch to keep (default 256)")
    demo.add_argument("--epochs", type=_positive_int("--epochs"), default=8, help="epochs to train (default 8)")
    demo.add_argument("--budget", metavar="BYTES",
                      help="the simulated device's memory, e.g. 40MiB (default: about what a quarter of the batch needs)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, shuffling and weights (default 0)")

    commands.add_parser("presets", help="list the built-in workloads", description="List the built-in workloads.")
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--budget -1GB`` as ``--budget=-1GB``: argparse would take "-1GB" for a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_FLAGS and i + 1 < len(argv) and argv[i + 1][:2] not in ("--", "-h") \
                and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memfit`` console script; returns the exit code."""
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    show_traceback = "--traceback" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "presets":
            return _presets()
        if args.command == "estimate":
            return _estimate(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "demo":
            return _demo(args)
        return _profile(args)
    except _UsageExit as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        print("memfit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemfitError as exc:
        # A memfit error is the user's to fix (exit 2) unless it reports a failure:
        # out of memory, nothing fits the budget, a NaN loss.
        usage = isinstance(exc, UsageError) or type(exc) is MemfitError
        return _fail(str(exc), EXIT_USAGE if usage else EXIT_FAILURE)
    except MemoryError as exc:
        if show_traceback:
            raise
        detail = str(exc) or "no detail: Python could not allocate an object"
        return _fail(f"out of host memory (MemoryError: {detail}) while running `memfit "
                     f"{' '.join(argv)}`; give a smaller batch or budget, or estimate instead of profiling", EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return _fail(f"out of memory: {exc}", EXIT_FAILURE)
        if show_traceback:
            raise
        from memfit.errors import user_frame

        # The line of the user's code that asked for it, not torch's internals that raised it.
        at = user_frame(exc) or (f" at {traceback.extract_tb(exc.__traceback__)[-1].filename}:"
                                 f"{traceback.extract_tb(exc.__traceback__)[-1].lineno}" if exc.__traceback__ else "")
        return _fail(f"{type(exc).__name__}: {exc} ({at.strip()}); rerun with --traceback for details"
                     if at else f"{type(exc).__name__}: {exc}; rerun with --traceback for details", EXIT_FAILURE)


def _fail(message: str, code: int) -> int:
    print(f"memfit: error: {' '.join(message.split())}", file=sys.stderr)
    return code


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
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        raise UsageError(f"--plot {args.plot}: the folder {str(Path(args.plot).parent)!r} does not exist; "
                         "create it first")
    if args.timeline and not args.json:
        raise UsageError("--timeline only applies with --json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: no CUDA device is available to torch {torch.__version__} here; use --device cpu"
        )
    workload = presets.resolve(args.spec, **_overrides(args))
    report = measure(workload, config=Config(micro_batch=args.batch_size, **_loop(args)), steps=args.steps,
                     device=args.device)
    if args.plot is not None:
        report.plot(args.plot)
    if args.json:
        print(report.to_json(indent=2, timeline=args.timeline))
    else:
        print(report.table(), end="")
        if args.plot is not None:
            print(f"Plot written to {args.plot}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from memfit import presets
    from memfit.config import Config
    from memfit.estimator import estimate
    from memfit.units import format_budget, format_bytes, parse_bytes

    budget = parse_bytes(args.budget) if args.budget is not None else None
    if args.precision not in PRECISIONS:
        raise UsageError(f"--precision {args.precision}: expected one of {', '.join(PRECISIONS)}")
    checkpoint = tuple(args.checkpoint)
    if checkpoint == ("none",):
        checkpoint = ()
    elif "none" in checkpoint:
        raise UsageError("--checkpoint none cannot be combined with globs")
    config = Config(
        micro_batch=args.batch_size,
        precision=args.precision,
        checkpoint=checkpoint,
        offload_activations=args.offload_activations,
        **_loop(args),
    )
    workload = presets.resolve(args.spec, **_overrides(args))
    with _progress(f"Estimating {workload.name} on fake tensors"):
        est = estimate(workload, config, steps=args.steps, device=args.device)
    fits = None if budget is None else est.required <= budget
    if args.json:
        data = est.to_dict()
        data["budget"] = budget
        data["fits"] = fits
        print(json.dumps(data, indent=2))
        return 0
    print(est.table(), end="")
    if budget is not None:
        verdict = "fits" if fits else "does NOT fit"
        print(f"Budget {format_budget(budget)}: the step {verdict} ({format_bytes(est.required)} needed, "
              f"{format_bytes(abs(budget - est.required))} {'to spare' if fits else 'short'}).")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from memfit import presets
    from memfit.planner import plan, resolve_budget
    from memfit.units import format_budget

    budget = resolve_budget(args.budget, args.device)
    for p in args.precision or ():
        if p not in PRECISIONS:
            raise UsageError(f"--precision {p}: expected one of {', '.join(PRECISIONS)}")
    workload = presets.resolve(args.spec, **_overrides(args))
    with _progress(f"Planning {workload.name} for {format_budget(budget)}"):
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
            **_loop(args),
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table(), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memfit import demo
    from memfit.units import parse_bytes

    budget = parse_bytes(args.budget) if args.budget is not None else None
    demo.run(Console(highlight=False), batch_size=args.batch_size, epochs=args.epochs, budget=budget, seed=args.seed)
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
