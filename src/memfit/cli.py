"""The ``memfit`` command line.

A user's mistake (a bad flag value, an unknown workload, a workload function
that returns the wrong thing) prints one line on stderr and exits 2; an
out-of-memory error prints one line and exits 1. ``--traceback`` shows the
full traceback of an unexpected error instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from memfit.errors import MemfitError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_OOM = 1


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


def build_parser() -> argparse.ArgumentParser:
    from memfit import __version__

    parser = _Parser(
        prog="memfit",
        description="Make PyTorch training fit in GPU memory: measure a training step's memory, "
        "by category and module, on CPU, CUDA or fake tensors.",
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
    profile.add_argument(
        "spec",
        metavar="SPEC",
        help="a preset (see `memfit presets`), path/to/file.py:function or package.module:function "
        "returning a memfit.Workload",
    )
    profile.add_argument("--batch-size", "-b", required=True, type=_positive_int("--batch-size"), help="micro-batch size")
    profile.add_argument("--steps", type=_positive_int("--steps"), default=2, help="training steps to run (default 2)")
    profile.add_argument("--seq-len", type=_positive_int("--seq-len"), help="sequence length, for language-model presets")
    profile.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    profile.add_argument("--plot", metavar="PATH", help="also plot the timeline to PATH (.png, .svg or .pdf)")
    profile.add_argument("--json", action="store_true", help="print only JSON")
    profile.add_argument("--timeline", action="store_true", help="with --json, include the per-op timeline")

    commands.add_parser("presets", help="list the built-in workloads", description="List the built-in workloads.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memfit`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "presets":
            return _presets()
        return _profile(args)
    except _UsageExit as exc:
        return _fail(str(exc), EXIT_USAGE)
    except MemfitError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return _fail(f"out of memory: {exc}", EXIT_OOM)
        if show_traceback:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {where.filename}:{where.lineno})" if where else ""
        return _fail(f"{type(exc).__name__}: {exc}{at}; rerun with --traceback for details", EXIT_USAGE)


def _fail(message: str, code: int) -> int:
    print(f"memfit: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _presets() -> int:
    from memfit import presets

    for name in presets.names():
        print(presets.describe(name))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from memfit import presets
    from memfit.display import PLOT_SUFFIXES
    from memfit.errors import UsageError
    from memfit.workload import measure

    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {args.plot}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")
    if args.timeline and not args.json:
        raise UsageError("--timeline only applies with --json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: no CUDA device is available to torch {torch.__version__} here; use --device cpu"
        )
    overrides = {"seq_len": args.seq_len} if args.seq_len is not None else {}
    workload = presets.resolve(args.spec, **overrides)
    report = measure(workload, args.batch_size, steps=args.steps, device=args.device)
    if args.plot is not None:
        report.plot(args.plot)
    if args.json:
        print(report.to_json(indent=2, timeline=args.timeline))
    else:
        print(report.table(), end="")
        if args.plot is not None:
            print(f"Plot written to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
