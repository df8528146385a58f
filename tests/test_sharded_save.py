"""Sharded saves (memfit.engine.sharded, memfit.engine.dcp_files): verified, recoverable, refused safely.

The file-level pieces (the allow-list unpickler, the manifest, which directory a load reads, what a save's
start tidies) run in this process on a real DCP checkpoint written without a process group. The rest runs
on two spawned gloo ranks (tests/sharded_worker.py), each spawn with a hard timeout: a module fixture saves
the uninterrupted run once per strategy and loads every simulated crash state and every damaged copy in one
spawn, so each test reads its own entry.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

import sharded_worker
from memfit import statefile
from memfit.engine import dcp_files
from memfit.errors import UsageError
from test_distributed import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


class _CreatesFile:
    """Pickles as ``open(path, "w")``: unpickling it with plain pickle creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _dcp_save(directory) -> dict:
    """A real DCP checkpoint (tensors and a non-tensor entry, as an optimizer's lr), sealed as memfit seals."""
    state = {"model": {"w": torch.arange(6, dtype=torch.float64)}, "optimizer": {"lr": 0.05, "betas": (0.9, 0.99)}}
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    directory = str(directory)
    manifest = dcp_files.hash_files(directory, dcp_files.payload_names(directory))
    dcp_files.seal(directory, {"world_size": 1}, manifest)
    return state


def _reseal(directory) -> None:
    """The seal rewritten over the files as they are now: a forger's save, not a damaged one."""
    seal = dcp_files.read_seal(str(directory))
    seal["manifest"] = dcp_files.hash_files(str(directory), dcp_files.payload_names(str(directory)))
    statefile.write(seal, os.path.join(directory, dcp_files.SEAL))


def _check(directory) -> object:
    """What a load checks before anything changes, on one process; returns DCP's metadata."""
    directory = str(directory)
    manifest = dcp_files.manifest_of(directory, dcp_files.read_seal(directory))
    dcp_files.check_listing(directory, manifest)
    dcp_files.check_digests(directory, manifest, [n for n in manifest if n != dcp_files.METADATA])
    return dcp_files.read_metadata(directory, manifest)


def _flip(path, at: float = 0.5, n: int = 4) -> None:
    data = bytearray(open(path, "rb").read())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------- one process: the files


def test_a_verified_checkpoint_loads_through_the_safe_reader_and_planner_as_dcp_wrote_it(tmp_path):
    from memfit.engine.sharded import _dcp_parts

    saved = _dcp_save(tmp_path / "run")
    metadata = _check(tmp_path / "run")
    reader, planner = _dcp_parts()
    state = {"model": {"w": torch.zeros(6, dtype=torch.float64)}, "optimizer": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp.load(state, storage_reader=reader(str(tmp_path / "run"), metadata), planner=planner(), no_dist=True)
    assert torch.equal(state["model"]["w"], saved["model"]["w"])
    assert state["optimizer"] == saved["optimizer"]


def test_metadata_naming_any_callable_is_refused_naming_the_file_and_nothing_runs(tmp_path):
    _dcp_save(tmp_path / "run")
    target = tmp_path / "created-by-the-pickle"
    (tmp_path / "run" / ".metadata").write_bytes(pickle.dumps(_CreatesFile(str(target))))
    _reseal(tmp_path / "run")  # its checksum matches: only the unpickler stands between it and open()
    with pytest.raises(UsageError, match=r"run/\.metadata is not DCP's metadata: it names io\.open, which a "
                                         r"checkpoint's metadata never holds; refused without running it"):
        _check(tmp_path / "run")
    assert not target.exists()
    with pytest.raises(UsageError, match=r"names posix\.system"):
        dcp_files.MetadataUnpickler(io.BytesIO(pickle.dumps(os.system)), "m").load()


def test_a_non_tensor_entry_that_weights_only_loading_refuses_is_refused_before_dcp_reads_it(tmp_path):
    from memfit.engine.sharded import _dcp_parts

    _dcp_save(tmp_path / "run")
    run = tmp_path / "run"
    with open(run / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # this test's own file
    target = tmp_path / "created-by-the-pickle"
    evil = io.BytesIO()
    torch.save(_CreatesFile(str(target)), evil)
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.lr")
    info = metadata.storage_data[index]
    with open(run / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(evil.getvalue())
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(evil.getvalue()))
    (run / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(run)
    with pytest.raises(UsageError, match=r"__0_0\.distcp holds 'optimizer\.lr' as a pickle that weights-only "
                                         r"loading refuses .*refused without running it"):
        _check(run)
    # DCP's own planner would torch.load it with weights_only=False; memfit's loads it weights-only.
    with pytest.raises(pickle.UnpicklingError):
        _dcp_parts()[1]().load_bytes(None, io.BytesIO(evil.getvalue()))
    assert not target.exists()


@pytest.mark.parametrize("damage, message", [
    ("flip", r"__0_0\.distcp is damaged: its SHA-256 differs from the one in the save's manifest"),
    ("truncate", r"__0_0\.distcp is \d+ bytes and the save's manifest \(trainer-rank0\.pt\) says \d+: the file is "
                 r"truncated or damaged"),
    ("remove", r"__0_0\.distcp is missing: the save's manifest \(trainer-rank0\.pt\) lists it"),
    ("add", r"notes\.txt is not part of the save \(its manifest, trainer-rank0\.pt, does not list it\)"),
    ("metadata", r"\.metadata is damaged: it differs from the save's manifest"),
    ("unsealed", r"trainer-rank0\.pt has no manifest of the save's files, so they cannot be verified"),
])
def test_a_changed_missing_or_extra_file_is_refused_in_one_line_naming_it(tmp_path, damage, message):
    _dcp_save(tmp_path / "run")
    run = tmp_path / "run"
    shard = run / "__0_0.distcp"
    if damage == "flip":
        _flip(shard)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-1])
    elif damage == "remove":
        shard.unlink()
    elif damage == "add":
        (run / "notes.txt").write_text("")
    elif damage == "metadata":
        _flip(run / ".metadata", at=0.9, n=1)
    else:
        statefile.write({"world_size": 1}, run / dcp_files.SEAL)  # saved before manifests
    with pytest.raises(UsageError, match=message) as info:
        _check(run)
    assert "\n" not in str(info.value) and str(run) in str(info.value)


def _states(tmp_path, a, b) -> dict[str, str]:
    """Every state a save killed at some point leaves, each in its own folder, from complete saves ``a``
    (older) and ``b`` (newer): name -> the path a run loads."""
    def put(name: str, **dirs) -> str:
        path = tmp_path / name / "run"
        path.parent.mkdir(parents=True)
        for suffix, (source, cut) in dirs.items():
            target = f"{path}{'' if suffix == 'path' else '.' + suffix}"
            shutil.copytree(source, target)
            for gone in cut:
                os.remove(os.path.join(target, gone))
        return str(path)

    return {
        "writing": put("writing", path=(a, ()), tmp=(b, [dcp_files.SEAL, dcp_files.METADATA])),
        "sealed": put("sealed", path=(a, ()), tmp=(b, ())),
        "renamed once": put("renamed once", old=(a, ()), tmp=(b, ())),
        "renamed twice": put("renamed twice", path=(b, ()), old=(a, [dcp_files.SEAL, "__0_0.distcp"])),
        "first save": put("first save", tmp=(b, ())),
        "first save, writing": put("first save, writing", tmp=(b, [dcp_files.SEAL])),
        "old only": put("old only", old=(a, ())),
    }


# What each state loads: the older save A (step 1), the newer B (step 2), or nothing.
LOADS = {"writing": 1, "sealed": 1, "renamed once": 2, "renamed twice": 2, "first save": 2,
         "first save, writing": None, "old only": 1}


def test_locate_finds_the_complete_save_each_killed_state_leaves_and_recover_keeps_it(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    _dcp_save(a)
    _dcp_save(b)
    statefile.write({"step": 2}, b / "trainer-rank1.pt")  # tells B from A
    _reseal(b)
    states = _states(tmp_path / "states", a, b)
    for name, path in states.items():
        step = LOADS[name]
        if step is None:
            with pytest.raises(UsageError, match=r"is not a save of this run's rank 0"):
                dcp_files.locate(path, 0, 1)
            dcp_files.recover(path)
            assert os.listdir(os.path.dirname(path)) == [], name
            continue
        found = dcp_files.locate(path, 0, 1)
        assert ("trainer-rank1.pt" in os.listdir(found)) == (step == 2), name
        _check(found)
        dcp_files.recover(path)  # a save's first step: the complete save at path, nothing else
        assert os.listdir(os.path.dirname(path)) == ["run"], name
        assert ("trainer-rank1.pt" in os.listdir(path)) == (step == 2) and dcp_files.sealed(path), name


# ---------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run saved under each strategy (A after step 1, B after step 2); the weights by step."""
    folder = tmp_path_factory.mktemp("runs")
    ranks = run_ranks(sharded_worker.saves, 2, {"strategies": ["fsdp", "ddp"]}, folder, timeout=50)
    for strategy, weights in ranks[0].items():  # every rank gathers the same whole weights
        assert all(torch.equal(x[k], y[k]) for x, y in zip(weights, ranks[1][strategy]) for k in x)
    return {strategy: {"dir": folder / strategy, "weights": weights} for strategy, weights in ranks[0].items()}


def test_a_two_rank_save_is_sealed_by_rank_0_with_every_other_file_in_its_manifest(runs):
    for strategy in ("fsdp", "ddp"):
        for save in ("A", "B"):
            path = str(runs[strategy]["dir"] / save)
            assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer-rank0.pt",
                                                "trainer-rank1.pt"]
            seal = dcp_files.read_seal(path)
            assert sorted(seal["manifest"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer-rank1.pt"]
            assert seal["manifest"] == dcp_files.hash_files(path, dcp_files.payload_names(path))
            assert seal["world_size"] == 2 and seal["counters"]["step"] == "AB".index(save) + 1
        assert not [p for p in os.listdir(runs[strategy]["dir"]) if p.endswith((".tmp", ".old"))]


def _damaged(folder, b) -> dict[str, str]:
    """Copies of the save ``b``, each damaged or forged one way: name -> path."""
    def copy(name: str) -> str:
        path = folder / name
        shutil.copytree(b, path)
        return str(path)

    paths = {name: copy(name) for name in ("flipped", "truncated", "missing", "forged metadata", "changed metadata")}
    _flip(os.path.join(paths["flipped"], "__0_0.distcp"))
    with open(os.path.join(paths["truncated"], "__1_0.distcp"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 100)
    os.remove(os.path.join(paths["missing"], "__1_0.distcp"))
    for name in ("forged metadata", "changed metadata"):
        with open(os.path.join(paths[name], ".metadata"), "wb") as f:
            pickle.dump(_CreatesFile(str(folder / f"created by {name}")), f)
    _reseal(paths["forged metadata"])
    return paths


@pytest.fixture(scope="module")
def loaded(runs, tmp_path_factory):
    """One FSDP run loading every killed state, every damaged copy and the DDP save, in turn."""
    folder = tmp_path_factory.mktemp("loads")
    fsdp = runs["fsdp"]["dir"]
    loads = {name: {"path": path} for name, path in _states(folder, fsdp / "A", fsdp / "B").items()}
    loads["renamed once"]["save"] = True  # the next save tidies the state, then loads as the new save
    loads["after the next save"] = {"path": loads["renamed once"]["path"]}
    loads.update({name: {"path": path} for name, path in _damaged(folder, fsdp / "B").items()})
    loads["ddp"] = {"path": str(runs["ddp"]["dir"] / "B")}
    ranks = run_ranks(sharded_worker.loads, 2, {"strategy": "fsdp", "loads": loads}, folder, timeout=50)
    return {"ranks": ranks, "loads": loads, "folder": folder}


@pytest.mark.parametrize("state", list(LOADS))
def test_a_save_killed_at_any_point_leaves_a_save_load_finds_and_resumes_from_bit_for_bit(runs, loaded, state):
    weights, step = runs["fsdp"]["weights"], LOADS[state]
    for result in (rank[state] for rank in loaded["ranks"]):
        if step is None:
            assert result["error"] == "UsageError" and "is not a save of this run's rank" in result["message"]
            assert result["unchanged"]
            continue
        assert "error" not in result, result.get("message")
        assert result["step"] == step
        assert all(torch.equal(result["loaded"][k], v) for k, v in weights[step - 1].items())
        # The next step of the uninterrupted run, bit for bit: the optimizer's state came back whole too.
        assert all(torch.equal(result["next"][k], v) for k, v in weights[step].items())


def test_the_save_after_a_kill_between_the_renames_leaves_only_itself_and_loads(runs, loaded):
    path = loaded["loads"]["renamed once"]["path"]
    assert os.listdir(os.path.dirname(path)) == ["run"]  # path.tmp became path, path.old went
    for rank in loaded["ranks"]:
        result = rank["after the next save"]
        assert result["step"] == 3
        assert all(torch.equal(result["loaded"][k], v) for k, v in rank["renamed once"]["next"].items())


@pytest.mark.parametrize("name, message", [
    ("flipped", r"rank 0: .*flipped/__0_0\.distcp is damaged: its SHA-256 differs from the one in the save's "
                r"manifest \(trainer-rank0\.pt\).*nothing was loaded: use an earlier save"),
    ("truncated", r"truncated/__1_0\.distcp is \d+ bytes and the save's manifest \(trainer-rank0\.pt\) says "
                  r"\d+: the file is truncated or damaged"),
    ("missing", r"missing/__1_0\.distcp is missing: the save's manifest \(trainer-rank0\.pt\) lists it"),
    ("changed metadata", r"changed metadata/\.metadata is \d+ bytes and the save's manifest"),
    ("forged metadata", r"ranks 0, 1: .*forged metadata/\.metadata is not DCP's metadata: it names io\.open"),
])
def test_a_damaged_or_forged_save_is_refused_on_every_rank_naming_the_file_before_the_model_changes(loaded, name,
                                                                                                      message):
    import re

    for rank in loaded["ranks"]:
        result = rank[name]
        assert result["error"] == "UsageError" and re.search(message, result["message"]), result["message"]
        assert "\n" not in result["message"]
        assert result["unchanged"]  # weights and step as before the load
    assert not [f for f in os.listdir(loaded["folder"]) if f.startswith("created by")]  # no pickled code ran


def test_a_ddp_save_resumes_under_fsdp_bit_for_bit_and_the_config_says_fsdp(runs, loaded):
    for rank in loaded["ranks"]:
        result = rank["ddp"]
        assert result["step"] == 2 and result["strategy"] == "fsdp"
        assert all(torch.equal(result["loaded"][k], v) for k, v in runs["ddp"]["weights"][1].items())


def test_a_failed_save_is_one_error_on_every_rank_naming_the_rank_and_keeps_the_previous_save(tmp_path):
    timeout = 3
    ranks = run_ranks(sharded_worker.fails, 2, {"timeout": timeout}, tmp_path, timeout=50)
    for rank in ranks:
        dcp_full, own_full = rank["dcp"], rank["own"]
        assert dcp_full["error"] == "CheckpointError", dcp_full
        assert "could not write" in dcp_full["message"] and "run.tmp: rank 1: OSError" in dcp_full["message"]
        assert dcp_full["message"].endswith("(disk full); free space on that disk or save elsewhere; the previous "
                                            f"save at {tmp_path / 'run'} is kept")
        assert own_full["error"] == "CheckpointError", own_full
        assert own_full["message"].startswith(f"writing {tmp_path / 'run.tmp'} failed on rank 1: ")
        assert "disk full" in own_full["message"] and own_full["message"].endswith("the previous save at "
                                                                                   f"{tmp_path / 'run'} is kept")
        assert rank["kept"]  # the save before the failures loads, bit for bit
    # A rank late to a save: the others' first agreement of the save (before any file, where a rank that
    # stopped after its last update would say so) ends their wait, naming it.
    late = ranks[0]["late"]
    assert late["error"] == "CommTimeout", late
    assert late["message"].startswith(f"rank 0: no answer from rank 1 within {timeout} s at the save: it is stuck "
                                      "or has died (see its log)"), late["message"]
    assert late["seconds"] < timeout + 1.5  # the trainer's timeout, not the default group's 30 minutes
    # Rank 1, late, finds rank 0 gone: its own one-line error, at once.
    assert ranks[1]["late"]["error"] == "CommTimeout" and "\n" not in ranks[1]["late"]["message"]
    assert ranks[1]["late"]["message"].startswith("rank 1: no answer from rank 0 within 3 s at the save")
