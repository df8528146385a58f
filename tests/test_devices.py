"""Device profiles (memfit.devices): what a card adds beyond the tensors, and bad profiles refused in one line."""

import json
from pathlib import Path

import pytest
import torch

import memfit
from memfit import Config, UsageError
from memfit.allocator import cublas_workspace_bytes
from memfit.cli import main
from memfit.devices import DeviceProfile, default_path, load_profile

MiB = 2**20


@pytest.fixture(scope="module")
def workload():
    return memfit.presets.load("gpt2-tiny", seq_len=32)


def test_a_profile_changes_required_by_exactly_its_context_and_workspace(workload, tmp_path):
    config = Config(micro_batch=2)
    default = memfit.estimate(workload, config, device="cuda")
    path = DeviceProfile(name="test card", capability=(9, 0), context=1024 * MiB, other_workspace=64 * MiB,
                         source="written by hand").save(tmp_path / "card.json")
    profiled = memfit.estimate(workload, config, device="cuda", profile=str(path))
    # The context is outside the allocator; a 64 MiB workspace (>= 10 MiB) is a segment of its own, kept.
    assert profiled.required - default.required == (1024 - 512) * MiB + 64 * MiB
    assert profiled.allocator.allocated - default.allocator.allocated == 64 * MiB
    assert profiled.peak == default.peak and profiled.context == 1024 * MiB
    assert profiled.to_dict()["profile"]["name"] == "test card"


def test_a_cards_capability_sets_the_cublas_workspaces(workload):
    t4 = memfit.estimate(workload, Config(micro_batch=2), device="cuda", profile="t4")
    h100 = memfit.estimate(workload, Config(micro_batch=2), device="cuda", profile="h100")
    assert t4.allocator.workspace == 2 * cublas_workspace_bytes((7, 5)) == 2 * (8 * MiB + 128 * 1024)
    assert h100.allocator.workspace == 2 * 32 * MiB
    assert t4.profile.total == memfit.parse_bytes("t4") and t4.peak == h100.peak


def test_profiles_round_trip_and_the_default_location_is_read(workload, tmp_path, monkeypatch):
    profile = DeviceProfile(name="A10G", capability=(8, 6), total=22 * 2**30, context=400 * MiB,
                            cublas_workspace=4 * MiB, source="memfit calibrate")
    path = profile.save(tmp_path / "a" / "b" / "device.json")  # folders made
    assert load_profile(path) == profile
    monkeypatch.setenv("MEMFIT_DEVICE_PROFILE", str(path))
    assert default_path() == path
    est = memfit.estimate(workload, Config(micro_batch=2), device="cuda")
    assert est.context == 400 * MiB and est.allocator.workspace == 2 * 4 * MiB
    plan = memfit.plan(workload, "2GiB", 4, profile=str(path))
    assert plan.required == memfit.estimate(workload, plan.config, device="cuda", profile=path,
                                            accumulation=2 if len(plan.accumulation) > 1 else 1).required


@pytest.mark.parametrize("content, message", [
    ("{", "not a profile memfit wrote \\(JSONDecodeError"),
    ('{"format": 7, "device": "cuda"}', "not a memfit device profile \\(format 1\\)"),
    ('{"format": 1, "device": "mps", "name": "m", "capability": [9, 0]}', "is for device 'mps'; memfit's profiles"),
    ('{"format": 1, "device": "cuda", "name": "x", "capability": [9, 0], "speed": 3}', "unexpected fields \\['speed'\\]"),
    ('{"format": 1, "device": "cuda", "name": "x", "capability": [9, 0], "context": -1}',
     "context is a whole number of bytes >= 0, got -1"),
    ('{"format": 1, "device": "cuda", "name": "x", "capability": "sm90"}', "capability is \\(major, minor\\)"),
    ('{"format": 1, "device": "cuda", "capability": [9, 0]}', "missing name/capability"),
    ('{"format": 1, "device": "cuda", "name": "x", "capability": [9, 0], "expandable_segments": true}',
     "expandable_segments:True, which memfit's allocator model does not follow"),
])
def test_bad_profiles_are_refused_with_the_fix(tmp_path, content, message):
    path = tmp_path / "device.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_profile(path)


def test_the_cli_reads_profiles_and_refuses_bad_ones_in_one_line(tmp_path, capsys):
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--seq-len", "32", "--profile", "rtx4090", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profile"]["capability"] == [8, 9] and data["context"] == 512 * MiB
    assert main(["estimate", "gpt2-tiny", "-b", "2", "--profile", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is neither a file nor a card (t4, v100" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_calibrate_without_a_card_says_what_to_use_instead(capsys):
    assert main(["calibrate"]) == 2
    assert "calibrate measures a CUDA card; none is available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibrate_measures_this_card(tmp_path):
    from memfit.devices import calibrate

    profile = calibrate()
    assert profile.capability == torch.cuda.get_device_capability()
    assert 0 < profile.context < profile.total and profile.workspace > 0
    assert load_profile(profile.save(tmp_path / "d.json")) == profile


def test_the_default_location_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMFIT_DEVICE_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "memfit" / "device.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_path() == Path.home() / ".cache" / "memfit" / "device.json"

