"""The ``memfit`` command line.

Exit codes: 0 done; 2 a usage error (a bad flag value, an unknown workload, a
workload function that returns the wrong thing), one line on stderr; 1 anything
else that stopped the command (out of device or host memory, nothing fits the
budget, an error inside the workload's code), one line on stderr; 130 Ctrl-C.
``--traceback`` shows the full traceback of an unexpected error instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from memfit.config import MAX_STEPS, OPTIMIZER_IMPLS, PRECISIONS, STRATEGIES, ZERO_GRADS
from memfit import commands
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


def _gpus(text: str) -> int:
    from memfit.config import MAX_WORLD_SIZE

    value = _positive_int("--gpus")(text)
    if value > MAX_WORLD_SIZE:
        raise argparse.ArgumentTypeError(f"--gpus takes 1 to {MAX_WORLD_SIZE:,} GPUs (ranks), got {text!r}")
    return value


def _nproc(text: str) -> int:
    import os

    value = _positive_int("--nproc")(text)
    cores = os.cpu_count() or 1
    if value > cores:  # each process trains on a core of its own: more only wait for one another
        raise argparse.ArgumentTypeError(f"--nproc takes 1 to {cores}, this host's CPU cores (os.cpu_count()), got "
                                         f"{text!r}")
    return value


def _budget(text: str) -> str:
    """--budget as typed (commands parse it, "auto" included), refused here where it is not a positive size."""
    if text.strip().lower() == "auto":
        return text
    from memfit.units import parse_bytes

    try:
        value = parse_bytes(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if value == 0:
        raise argparse.ArgumentTypeError(f"--budget {text}: a device of 0 bytes fits nothing; give a positive size "
                                         "such as 24GiB, or a card such as h100")
    return text


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


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """The step's Config as estimate and explain take it, and the target."""
    parser.add_argument("--precision", default="32-true", metavar="P",
                        help=f"one of {', '.join(PRECISIONS)} (default 32-true)")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="GLOB",
                        help="module-path globs to recompute in backward ('transformer.h.*'), 'all' for every block, or 'none'")
    parser.add_argument("--offload-activations", action="store_true", help="keep saved activations in CPU memory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                        help="the target to estimate for (default cuda; no GPU is needed)")


def _add_html_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--html", metavar="PATH", help="also write one self-contained page (.html): the timeline "
                        "by category, the tables, the plan's alternatives or the fixes; opens offline")


def _add_gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=_gpus, default=1, metavar="N",
                        help="GPUs (ranks) trained on; the figures are one rank's (default 1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="how the ranks share the model: ddp replicates it, fsdp shards it (FSDP2) "
                        "(default: single on one GPU, fsdp on several)")
    parser.add_argument("--no-reshard", action="store_true", help="with fsdp, keep each block's gathered "
                        "parameters from forward to backward (FSDP2's reshard_after_forward=False)")
    parser.add_argument("--sync-every-micro-step", action="store_true", help="with fsdp, reduce-scatter the "
                        "gradients every micro-step: only shards kept between them")


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
    profile.add_argument("--memory-viz", metavar="PATH", help="also write the step in PyTorch's memory snapshot "
                         "format (a pickle for https://pytorch.org/memory_viz)")
    profile.add_argument("--json", action="store_true", help="print only JSON")
    _add_html_arg(profile)
    profile.add_argument("--timeline", action="store_true", help="with --json, include the per-op timeline")
    _add_loop_args(profile)

    estimate = commands.add_parser(
        "estimate",
        help="predict a training step's memory without a GPU",
        description="Predict the memory of a training step on fake tensors (no memory used, no GPU needed): "
        "categories at the peak, phase peaks, top modules and the memory a device needs.",
    )
    _add_workload_args(estimate, "micro-batch size")
    _add_config_args(estimate)
    estimate.add_argument("--steps", type=_steps, default=2, help=f"training steps to simulate, 1 to {MAX_STEPS} (default 2)")
    estimate.add_argument("--budget", type=_budget, metavar="BYTES",
                          help="say whether the step fits in this much memory: 24GiB, or a card such as rtx4090, h100")
    estimate.add_argument("--json", action="store_true", help="print only JSON")
    _add_html_arg(estimate)
    estimate.add_argument("--memory-viz", metavar="PATH", help="also write the fake step in PyTorch's memory "
                          "snapshot format (a pickle for https://pytorch.org/memory_viz)")
    estimate.add_argument("--profile", metavar="PATH|CARD", help="the CUDA card's context and workspaces: a file "
                          "`memfit calibrate` wrote, or a card (h100, a100-80gb, rtx4090, ...); default: this "
                          "machine's calibrated profile, else memfit's defaults")
    _add_gpu_args(estimate)
    _add_loop_args(estimate)

    explain = commands.add_parser(
        "explain",
        help="say why a training step needs its memory and which fixes would make it fit, each estimated",
        description="Estimate a training step on fake tensors and explain its peak: the categories, the op and "
        "module that reached it, the largest tensors alive with the line that made them, the seed articles' causes "
        "of OOM quantified, and fixes (micro-batch with exact accumulation, precision, checkpointing, optimizer, "
        "FSDP over GPUs), each estimated again: bytes saved, new requirement, step time, whether it fits.",
    )
    _add_workload_args(explain, "micro-batch size (the step as it runs)")
    explain.add_argument("--effective-batch", type=_positive_int("--effective-batch"), default=None, metavar="N",
                         help="samples per optimizer step that every fix keeps (default: --batch-size on each GPU)")
    explain.add_argument("--budget", type=_budget, metavar="BYTES", help="device memory to fit: 80GB, 24GiB, or a "
                         "card (h100, rtx4090); without it fixes are ranked by bytes saved")
    _add_config_args(explain)
    explain.add_argument("--profile", metavar="PATH|CARD", help="the CUDA card's context and workspaces, as for estimate")
    explain.add_argument("--no-fixes", action="store_true", help="explain the peak only (no estimates of fixes)")
    explain.add_argument("--json", action="store_true", help="print only JSON")
    _add_html_arg(explain)
    _add_gpu_args(explain)
    _add_loop_args(explain)

    plan = commands.add_parser(
        "plan",
        help="choose the configuration that fits a budget at the best speed",
        description="Choose micro-batch, gradient accumulation, precision and checkpointing so that a training "
        "step of the given effective batch fits the budget at the lowest predicted cost, from estimates (no GPU needed).",
    )
    _add_workload_args(plan, "the effective batch to keep")
    plan.add_argument("--budget", type=_budget, required=True, metavar="BYTES",
                      help="device memory to fit: 24GiB, a card (rtx4090, a100-80gb, h100; see the README), or 'auto' "
                      "(free CUDA memory)")
    plan.add_argument("--precision", nargs="+", default=None, metavar="P",
                      help=f"precisions the plan may use (default: 32-true only), among {', '.join(PRECISIONS)}")
    plan.add_argument("--gpus", type=_gpus, default=1, metavar="N",
                      help="GPUs (ranks) trained on: the batch is the global one, the figures one rank's (default 1)")
    plan.add_argument("--strategy", nargs="+", choices=STRATEGIES, default=None, metavar="S",
                      help="with --gpus N, the strategies the plan may use: ddp, fsdp (default both)")
    plan.add_argument("--no-checkpoint", action="store_true", help="never checkpoint activations")
    plan.add_argument("--checkpoint-candidates", nargs="+", default=None, metavar="GLOB",
                      help="the modules the plan may checkpoint (globs, or 'seq[2:5]' for a Sequential's segment); "
                      "by default the model's repeated blocks")
    plan.add_argument("--offload-activations", action="store_true", help="allow offloading saved activations to CPU memory")
    plan.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="the target (default cuda; no GPU needed)")
    plan.add_argument("--calibrate", action="store_true", help="time a few real micro-steps on --device to fit the efficiency curve")
    plan.add_argument("--json", action="store_true", help="print only JSON")
    _add_html_arg(plan)
    plan.add_argument("--profile", metavar="PATH|CARD", help="the CUDA card's context and workspaces, as for estimate")
    _add_loop_args(plan)

    calibrate = commands.add_parser(
        "calibrate",
        help="measure this machine's CUDA card for estimates: context, workspaces",
        description="Measure the CUDA context, the cuBLAS workspace and the allocator's configuration on this "
        "machine's card and write a device profile that estimate and plan read.",
    )
    calibrate.add_argument("--device", default="cuda", help="the CUDA device to measure (default cuda)")
    calibrate.add_argument("--output", metavar="PATH", help="where to write the profile (default: "
                           "~/.cache/memfit/device.json, which estimate and plan read by default)")

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
    demo.add_argument("--budget", type=_budget, metavar="BYTES",
                      help="the simulated device's memory, e.g. 40MiB (default: about what a quarter of the batch needs)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, shuffling and weights (default 0)")
    demo.add_argument("--nproc", type=_nproc, default=1, metavar="N",
                      help="train on N CPU processes under torchrun (gloo, DDP): the batch is split over them; at "
                      "most this host's CPU cores (default 1)")

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
        return commands.run(args)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
