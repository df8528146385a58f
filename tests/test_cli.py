"""The memfit command line: output, JSON schema, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import main
from memfit.units import format_budget, format_bytes


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "profile" in out and "presets" in out
    with pytest.raises(SystemExit):
        main(["profile", "-h"])
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--steps", "--device", "--plot", "--json"):
        assert flag in out


def test_profile_prints_the_table(capsys, tmp_path):
    plot = tmp_path / "t.svg"
    code, out, err = run(capsys, "profile", "cifar-cnn", "--batch-size", "8", "--plot", str(plot))
    assert code == 0, err
    assert "Memory by category" in out and "optimizer_state" in out
    assert plot.read_bytes().startswith(b"<?xml")
    assert f"Plot written to {plot}" in out


def test_profile_json_is_only_json_with_the_report_schema(capsys):
    code, out, err = run(capsys, "profile", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--steps", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {
        "device", "peak", "at_peak", "peak_by_category", "peak_by_phase", "by_module", "kept_by_module", "at_end",
        "peak_index", "peak_op", "peak_module", "peak_phase", "steps", "fake", "extra",
    }  # fmt: skip
    assert data["peak"] == sum(data["at_peak"].values())
    assert data["steps"] == 1 and data["extra"]["micro_batch"] == 2
    code, out, _ = run(capsys, "profile", "cifar-cnn", "-b", "2", "--json", "--timeline")
    assert len(json.loads(out)["timeline"]) > 10


def test_presets_command(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "cifar-cnn:" in out and "gpt2-tiny:" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "gpt5", "-b", "4"], "unknown workload 'gpt5'"),
        (["profile", "cifar-cnn", "-b", "0"], "--batch-size takes a positive whole number, got '0'"),
        (["profile", "cifar-cnn", "-b", "many"], "--batch-size takes a positive whole number, got 'many'"),
        (["profile", "cifar-cnn"], "required: --batch-size"),
        (["profile", "cifar-cnn", "-b", "4", "--steps", "-1"], "--steps takes a positive whole number"),
        (["profile", "cifar-cnn", "-b", "4", "--plot", "out.jpg"], ".png, .svg, .pdf"),
        (["profile", "cifar-cnn", "-b", "4", "--seq-len", "8"], "takes no option 'seq_len'"),
        (["profile", "cifar-cnn", "-b", "4", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["profile", "missing_file.py:make", "-b", "4"], "workload file 'missing_file.py' not found"),
        (["profile", "os:getcwd", "-b", "4"], "os:getcwd returned str, expected a memfit.Workload"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("memfit: error: ")
    assert message in err


def test_no_command_prints_help_and_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: memfit" in err


def test_console_script_exit_code_without_traceback(tmp_path):
    bad = tmp_path / "wl.py"
    bad.write_text("def make():\n    return 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "memfit", "profile", f"{bad}:make", "--batch-size", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"memfit: error: {bad}:make returned int, expected a memfit.Workload"
    assert "Traceback" not in result.stderr
    # A workload that fails on fake tensors: torch logs the failure with a traceback; the CLI keeps one line.
    crash = tmp_path / "crash.py"
    crash.write_text("import torch, memfit\n"
                     "def make():\n"
                     "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 3),\n"
                     "                          lambda m, b: m(b).sum(), None)\n")
    result = subprocess.run([sys.executable, "-m", "memfit", "estimate", f"{crash}:make", "-b", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("memfit: error: RuntimeError: a and b must have same reduction dim")


def test_a_crashing_workload_is_one_line_unless_traceback_is_asked(tmp_path, capsys):
    crash = tmp_path / "crash.py"
    crash.write_text(
        "import torch, memfit\n"
        "def make():\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 3),\n"
        "                          lambda m, b: m(b).sum(), None)\n"
    )
    code, _, err = run(capsys, "profile", f"{crash}:make", "-b", "2")
    assert code == 1 and err.count("\n") == 1  # the workload's own code failed: not a usage error
    assert "RuntimeError" in err and "--traceback" in err and "Traceback" not in err
    assert f"(at {crash}:4)" in err  # the user's line (the lambda calling the model), not torch's
    with pytest.raises(RuntimeError):
        main(["--traceback", "profile", f"{crash}:make", "-b", "2"])


def test_estimate_prints_what_it_needs(capsys):
    code, out, err = run(capsys, "estimate", "gpt2-tiny", "-b", "4", "--precision", "bf16-mixed",
                         "--checkpoint", "all", "--budget", "24GiB")
    assert code == 0, err
    assert "Needs" in out and "CUDA context" in out and "Checkpointed: transformer.h.0, transformer.h.1" in out
    assert "Budget 24.00 GiB (25.77 GB): the step fits" in out  # both forms: GiB and GB differ by 7%


def test_estimate_json_schema(capsys):
    code, out, err = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--seq-len", "32", "--device", "cpu",
                         "--budget", "1MiB", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"config", "device", "peak", "required", "reserved", "at_peak", "phases", "by_module",
            "model_states", "parameters", "checkpointed", "budget", "fits", "report"} <= set(data)  # fmt: skip
    assert data["device"] == "cpu" and data["reserved"] is None and data["fits"] is False
    assert data["config"]["micro_batch"] == 2 and data["required"] == data["peak"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["estimate", "gpt2-tiny", "-b", "2", "--precision", "fp8"], "--precision fp8: expected one of 32-true"),
        (["estimate", "gpt2-tiny", "-b", "2", "--checkpoint", "decoder.*"], "checkpoint glob 'decoder.*' matches no module"),
        (["estimate", "gpt2-tiny", "-b", "2", "--budget", "24 gigs"], "bad byte quantity '24 gigs'"),
        (["estimate", "gpt2-tiny", "-b", "2", "--checkpoint", "none", "h.*"], "--checkpoint none cannot be combined"),
        (["estimate", "gpt2", "-b", "2", "--seq-len", "4096"], "exceeds GPT-2's 1024 learned positions"),
        (["estimate", "gpt2-tiny", "-b", "2", "--device", "cpu", "--offload-activations"], "means nothing on device='cpu'"),
    ],
)
def test_estimate_bad_input(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err


def test_out_of_memory_exits_1_with_one_line(tmp_path, capsys):
    workloads = tmp_path / "oom.py"
    workloads.write_text(
        "import torch, memfit\n"
        "def _gave_up(model, batch):\n"
        "    raise memfit.OutOfMemory('out of memory at step 1: micro-batch 1 does not fit', micro_batch=1,\n"
        "                             retries=3, advice=('a larger budget or device',))\n"
        "def _device(model, batch):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.\\nGPU 0 has 1 GiB')\n"
        "def guard():\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4), _gave_up, None)\n"
        "def device():\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4), _device, None)\n"
    )
    code, out, err = run(capsys, "profile", f"{workloads}:guard", "-b", "2")
    assert (code, out) == (1, "")
    assert err == ("memfit: error: out of memory at step 1: micro-batch 1 does not fit "
                   "Try: a larger budget or device.\n")
    code, out, err = run(capsys, "profile", f"{workloads}:device", "-b", "2")
    assert (code, out) == (1, "")
    assert err == "memfit: error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["estimate", "gpt2-tiny", "-b", "2", "--budget", "-1GB"], "bad byte quantity '-1GB': it must not be negative"),
        (["estimate", "gpt2-tiny", "-b", "2", "--budget=-1GB"], "bad byte quantity '-1GB': it must not be negative"),
        (["estimate", "gpt2-tiny", "-b", "2", "--budget", "0.5"], "bad byte quantity '0.5': a fraction of a byte"),
        (["estimate", "gpt2-tiny", "-b", "2", "--budget", "1.9B"], "bad byte quantity '1.9B': a fraction of a byte"),
        (["estimate", "gpt2-tiny", "-b", "2", "--steps", "1000000"], "--steps takes 1 to 1000, got '1000000'"),
        (["profile", "cifar-cnn", "-b", "2", "--steps", "1001"], "--steps takes 1 to 1000"),
        (["estimate", "gpt2-tiny", "-b", "2", "--arg", "seq_len"], "--arg takes KEY=VALUE"),
        (["estimate", "gpt2-tiny", "-b", "2", "--arg", "seq_len=8", "--seq-len", "8"], "both give the sequence length"),
        (["estimate", "cifar-cnn", "-b", "2", "--arg", "depth=3"], "preset 'cifar-cnn' takes no option 'depth'"),
        (["profile", "cifar-cnn", "-b", "2", "--plot", "no/such/folder/t.png"], "--plot no/such/folder/t.png: the folder 'no/such/folder' does not exist; create it first\n"),
        (["plan", "gpt2-tiny", "-b", "4", "--budget", "1GiB", "--checkpoint-candidates", "decoder.*"],
         "checkpoint glob 'decoder.*' matches no module"),
        # Refused as the flags are read (torch's TypeError for 2**63 ranks; a plan of 9 s for a budget of 0).
        (["estimate", "gpt2-tiny", "-b", "2", "--gpus", "9223372036854775808"],
         "argument --gpus: --gpus takes 1 to 1,048,576 GPUs (ranks), got '9223372036854775808'\n"),
        (["plan", "gpt2-tiny", "-b", "2", "--budget", "1GiB", "--gpus", "1048577"], "--gpus takes 1 to 1,048,576"),
        (["plan", "gpt2-tiny", "-b", "8", "--budget", "0"], "argument --budget: --budget 0: a device of 0 bytes fits "
         "nothing; give a positive size such as 24GiB, or a card such as h100\n"),
        (["explain", "gpt2-tiny", "-b", "2", "--budget", "0GiB"], "--budget 0GiB: a device of 0 bytes fits nothing"),
        (["demo", "--budget", "0B"], "--budget 0B: a device of 0 bytes fits nothing"),
    ],
)
def test_more_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("memfit: error: ") and message in err


def test_arg_passes_keyword_arguments_to_the_workload(capsys):
    code, out, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--arg", "image_size=64", "--device", "cpu",
                         "--json")
    assert code == 0, err
    big = json.loads(out)["peak"]
    code, out, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--json")
    # The linear layer takes 64 * (64 / 2)^2 inputs instead of 64 * 16^2: four times the weights.
    assert code == 0 and big > json.loads(out)["peak"] * 3


def test_cards_as_budgets_and_both_units_in_the_verdict(capsys):
    code, out, err = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--budget", "rtx4090")
    assert code == 0, err
    assert "Budget 23.64 GiB (25.38 GB): the step fits" in out


def test_host_out_of_memory_exits_1_with_what_ran_and_ctrl_c_exits_130(tmp_path, capsys):
    workloads = tmp_path / "host.py"
    workloads.write_text(
        "import torch, memfit\n"
        "def _memory(model, batch):\n"
        "    raise MemoryError()\n"
        "def _interrupt(model, batch):\n"
        "    raise KeyboardInterrupt\n"
        "def memory():\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4), _memory, None)\n"
        "def interrupt():\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4), _interrupt, None)\n"
    )
    code, out, err = run(capsys, "estimate", f"{workloads}:memory", "-b", "2")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("memfit: error: out of host memory (MemoryError: no detail: Python could not allocate")
    assert f"while running `memfit estimate {workloads}:memory -b 2`" in err
    code, out, err = run(capsys, "estimate", f"{workloads}:interrupt", "-b", "2")
    assert (code, out, err) == (130, "", "memfit: interrupted\n")


def test_a_machine_without_the_memory_is_refused_before_real_steps_run(monkeypatch, capsys):
    import memfit.host

    monkeypatch.setattr(memfit.host, "available_memory", lambda: 1 << 20)  # a machine with 1 MiB free
    code, out, err = run(capsys, "profile", "cifar-cnn", "-b", "64")
    assert (code, out) == (1, "")
    assert "measuring cifar-cnn at micro-batch 64 on the CPU needs" in err and "1.00 MiB available" in err
    assert "estimate it instead" in err


GOLDEN_HELP = Path(__file__).parent / "cli_help.txt"


def _all_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    pages = []
    for argv in ([], ["profile"], ["estimate"], ["plan"], ["demo"], ["presets"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "-h"])
        assert info.value.code == 0
        pages.append(f"$ memfit {' '.join(argv + ['-h'])}\n{capsys.readouterr().out}")
    return "\n".join(pages)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the golden text is Python 3.11's argparse formatting")
def test_the_help_is_what_the_readme_and_users_rely_on(capsys, monkeypatch):
    # The help text is the CLI's documentation: a change to it must be deliberate. After one,
    # MEMFIT_UPDATE_GOLDEN=1 pytest tests/test_cli.py -k help writes the new text; review the diff.
    text = _all_help(capsys, monkeypatch)
    if os.environ.get("MEMFIT_UPDATE_GOLDEN"):
        GOLDEN_HELP.write_text(text)
    assert text == GOLDEN_HELP.read_text()


def test_gpus_and_budget_take_up_to_their_bounds():
    from memfit.cli import build_parser
    from memfit.config import MAX_WORLD_SIZE as MAX_GPUS

    args = build_parser().parse_args(["plan", "gpt2-tiny", "-b", "2", "--budget", "1B", "--gpus", str(MAX_GPUS)])
    assert (args.gpus, args.budget) == (MAX_GPUS, "1B")  # the last GPU count and the smallest budget taken
    assert build_parser().parse_args(["plan", "gpt2-tiny", "-b", "2", "--budget", "auto"]).budget == "auto"


def test_steps_take_up_to_the_bound_and_args_keep_what_follows_the_first_equals_sign(tmp_path, capsys):
    code, out, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--steps", "1000", "--json")
    assert code == 0, err
    assert json.loads(out)["report"]["steps"] == 1000
    code, _, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--steps", "0")
    assert err == "memfit: error: argument --steps: --steps takes a positive whole number, got '0'\n"
    code, _, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--steps", "1001")
    assert err == ("memfit: error: argument --steps: --steps takes 1 to 1000, got '1001': the second step shows the "
                   "steady state, later ones repeat it\n")
    spec = tmp_path / "kw.py"
    spec.write_text(
        "import torch, memfit\n"
        "def make(**kwargs):\n"
        "    return memfit.Workload(lambda: torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4),\n"
        "                          lambda m, b: m(b).sum(), None, name=repr(sorted(kwargs.items())))\n"
    )
    code, out, err = run(capsys, "estimate", f"{spec}:make", "-b", "2", "--device", "cpu", "--json", "--arg",
                         "expr=a=b", "--arg", "arch=resnet18", "--arg", "depth=50", "--arg", "flag=True",
                         "--arg", "ratio=0.5", "--seq-len", "7")
    assert code == 0, err
    assert json.loads(out)["extra"]["workload"] == repr(sorted({"expr": "a=b", "arch": "resnet18", "depth": 50,
                                                                "flag": True, "ratio": 0.5, "seq_len": 7}.items()))
    code, _, err = run(capsys, "estimate", f"{spec}:make", "-b", "2", "--arg", "depth=1", "--arg", "depth=2")
    assert (code, err) == (2, "memfit: error: --arg depth= is given twice; give each key once\n")
    code, _, err = run(capsys, "estimate", f"{spec}:make", "-b", "2", "--arg", "seq_len=1", "--seq-len", "2")
    assert err == "memfit: error: --seq-len and --arg seq_len=... both give the sequence length; give one\n"
    code, _, err = run(capsys, "estimate", f"{spec}:make", "-b", "2", "--arg", "2x=1")
    assert err == ("memfit: error: argument --arg: --arg takes KEY=VALUE with KEY a Python name, got '2x=1'; e.g. "
                   "--arg image_size=64 --arg arch=resnet18\n")


def test_a_negative_budget_is_joined_only_where_a_value_is_due(capsys):
    # "--budget" last: argparse's own message; "--budget --json": the next flag is not taken for a size.
    code, _, err = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--budget")
    assert (code, err) == (2, "memfit: error: argument --budget: expected one argument\n")
    code, _, err = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--budget", "--json")
    assert (code, err) == (2, "memfit: error: argument --budget: expected one argument\n")
    code, _, err = run(capsys, "estimate", "gpt2-tiny", "--budget", "-5MiB", "-b", "2")
    assert err.startswith("memfit: error: argument --budget: bad byte quantity '-5MiB': it must not be negative")


def test_profile_and_estimate_print_their_tables_and_json_as_documented(capsys):
    code, out, err = run(capsys, "profile", "cifar-cnn", "-b", "2", "--steps", "1")
    assert code == 0 and out.endswith("\n") and not out.endswith("\n\n")
    code, out, _ = run(capsys, "profile", "cifar-cnn", "-b", "2", "--steps", "1", "--json")
    assert out.startswith('{\n  "device": "cpu"') and json.loads(out)["steps"] == 1
    code, _, err = run(capsys, "profile", "cifar-cnn", "-b", "2", "--timeline")
    assert (code, err) == (2, "memfit: error: --timeline only applies with --json\n")
    import torch

    if not torch.cuda.is_available():
        code, _, err = run(capsys, "profile", "cifar-cnn", "-b", "2", "--device", "cuda")
        assert err == (f"memfit: error: --device cuda: no CUDA device is available to torch {torch.__version__} here; "
                       "use --device cpu\n")
    code, out, err = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--json")
    data = json.loads(out)
    assert out.startswith('{\n  "config"') and data["report"]["steps"] == 2
    need = data["required"]
    code, out, _ = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--budget", str(need))
    assert out.endswith(f"Budget {format_budget(need)}: the step fits ({format_bytes(need)} needed, 0 B to spare).\n")
    code, out, _ = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--budget", str(need - 1000))
    assert code == 0 and out.endswith(f"the step does NOT fit ({format_bytes(need)} needed, 1000 B short).\n")
    code, out, _ = run(capsys, "estimate", "cifar-cnn", "-b", "2", "--device", "cpu", "--budget", str(need - 1),
                       "--json")
    assert (json.loads(out)["budget"], json.loads(out)["fits"]) == (need - 1, False)
    code, out, _ = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--checkpoint", "none", "--json")
    assert json.loads(out)["checkpointed"] == [] and json.loads(out)["config"]["checkpoint"] == []
    assert json.loads(out)["config"]["precision"] == "32-true"
    code, out, _ = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--precision", "bf16-true", "--json")
    assert json.loads(out)["config"]["precision"] == "bf16-true"


def test_a_loop_option_out_of_its_choices_is_one_line_with_the_valid_ones(capsys):
    code, _, err = run(capsys, "estimate", "gpt2-tiny", "-b", "2", "--zero-grad", "never")
    assert code == 2 and err == ("memfit: error: argument --zero-grad: invalid choice: 'never' "
                                 "(choose from 'set-to-none', 'after-forward', 'zeros')\n")
    code, _, err = run(capsys, "plan", "gpt2-tiny", "-b", "2", "--budget", "1GiB", "--optimizer-impl", "apex")
    assert code == 2 and err.count("\n") == 1 and "'default', 'for-loop', 'foreach', 'fused'" in err


def test_html_writes_one_page_per_command_and_a_bad_path_is_refused_before_any_work(tmp_path, capsys):
    from memfit import presets
    from memfit.config import Config
    from memfit.estimator import estimate

    page = tmp_path / "e.html"
    assert main(["estimate", "gpt2-tiny", "-b", "4", "--html", str(page)]) == 0
    assert f"Page written to {page}" in capsys.readouterr().out
    est = estimate(presets.load("gpt2-tiny"), Config(micro_batch=4), device="cuda")
    assert f'data-bytes="{est.report.peak}"' in page.read_text()  # the page's figures are the estimate's
    page = tmp_path / "x.html"
    assert main(["explain", "gpt2-tiny", "-b", "4", "--device", "cpu", "--no-fixes", "--json", "--html",
                 str(page)]) == 0
    data = json.loads(capsys.readouterr().out)  # --json prints only JSON: the page is said nowhere
    assert f'data-bytes="{data["peak"]}"' in page.read_text()
    (tmp_path / "d.html").mkdir()
    for argv, message in ((["--html", str(tmp_path / "missing" / "p.html")], "does not exist"),
                          (["--html", str(tmp_path / "p.txt")], "must end in .html"),
                          (["--html", str(tmp_path / "d.html")], "d.html' is a directory; give the path of a file")):
        assert main(["plan", "gpt2-tiny", "-b", "8", "--budget", "1MiB", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_html_to_a_folder_that_cannot_be_written_is_refused_before_any_work_and_a_full_disk_is_one_line(
        tmp_path, capsys, monkeypatch):
    import errno
    import os

    from memfit import estimator

    real_open = os.open

    def denied(path, *args, **kwargs):
        if ".memfit-probe-" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    page = tmp_path / "p.html"
    with monkeypatch.context() as m:
        m.setattr(os, "open", denied)
        m.setattr(estimator, "estimate", lambda *a, **k: pytest.fail("the work ran before the path was checked"))
        assert main(["estimate", "gpt2-tiny", "-b", "2", "--html", str(page)]) == 2
    err = capsys.readouterr().err
    assert err == (f"memfit: error: --html {page}: cannot write in the folder {str(tmp_path)!r} (Permission denied); "
                   "give a path in a writable folder\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "16", "--html", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"memfit: error: cannot write the page to {page}: disk full (" in err
    assert "nothing was written" in err and os.listdir(tmp_path) == []
