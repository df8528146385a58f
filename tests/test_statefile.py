"""statefile: a failed save (a full disk) is one clear error, leaves no temporary file, keeps the previous save."""

from __future__ import annotations

import builtins
import errno
import os
import shutil

import pytest
import torch

import memfit
from memfit import statefile
from memfit.statefile import WriteError


def _state(fill: float = 1.0) -> dict:
    return {"weights": torch.full((256,), fill), "step": 3}  # 1 KiB of tensor data


@pytest.fixture
def previous(tmp_path):
    """A good save at run.pt, and its bytes."""
    path = tmp_path / "run.pt"
    statefile.write(_state(1.0), path)
    return path, path.read_bytes()


def _assert_kept(path, data: bytes) -> None:
    assert path.read_bytes() == data and torch.equal(statefile.read(path)["weights"], torch.full((256,), 1.0))
    assert sorted(os.listdir(path.parent)) == [path.name]  # no run.pt.tmp left beside it


def _full_at(monkeypatch, target: str) -> None:
    """Opening ``target`` for writing opens /dev/full: every byte written to it fails with ENOSPC, from the kernel."""
    real = builtins.open

    def opened(file, mode="r", *args, **kwargs):
        return real("/dev/full" if os.fspath(file) == target and "w" in mode else file, mode, *args, **kwargs)

    monkeypatch.setattr(statefile, "open", opened, raising=False)  # statefile's own open, nobody else's


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_save_to_a_full_disk_says_disk_full_naming_the_file_and_keeps_the_previous_save(previous, monkeypatch):
    path, data = previous
    _full_at(monkeypatch, f"{path}.tmp")
    message = (rf"^cannot save the training state to {path}: disk full \(.*the state needs about 1\.00 KiB.*\); free "
               r"space there or save to another disk, e\.g\. trainer\.save\('/other/disk/run\.pt'\); the previous save "
               r"there is intact$")
    with pytest.raises(WriteError, match=message) as info:
        statefile.write(_state(2.0), path)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, (memfit.MemfitError, OSError))
    assert "\n" not in str(info.value)
    _assert_kept(path, data)


def test_torchs_own_writer_error_on_a_disk_without_room_is_disk_full_and_removes_the_partial_file(previous,
                                                                                                   monkeypatch):
    path, data = previous

    def fails_midway(obj, f):  # what torch's C++ writer says when the disk fills: no errno, no path
        f.write(b"PK\x03\x04" + bytes(60))
        f.flush()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", fails_midway)
    usage = shutil.disk_usage(path.parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1023))  # one byte short of the tensor
    with pytest.raises(WriteError, match=rf"^cannot save the training state to {path}: disk full \(1023 B free on "
                                        rf"{path.parent}, the state needs about 1\.00 KiB; RuntimeError: \[enforce "
                                        r"fail at inline_container\.cc:672\] \. unexpected pos 64 vs 0\)") as info:
        statefile.write(_state(2.0), path)
    assert info.value.errno == errno.ENOSPC
    _assert_kept(path, data)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1024))  # room enough: another failure
    with pytest.raises(WriteError, match=rf"^cannot save the training state to {path} \(RuntimeError: \[enforce fail"
                                        rf".*\); check that {path.parent} exists, is writable and has room; the "
                                        r"previous save there is intact$") as info:
        statefile.write(_state(2.0), path)
    assert info.value.errno is None and "disk full" not in str(info.value)
    _assert_kept(path, data)


def test_a_full_disk_reported_only_by_fsync_is_disk_full(previous, monkeypatch):
    path, data = previous

    def no_room(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(WriteError, match=rf"^cannot save the training state to {path}: disk full .*OSError: \[Errno "
                                        r"28\] No space left on device\)"):
        statefile.write(_state(2.0), path)
    _assert_kept(path, data)


def test_a_save_into_a_missing_directory_names_it_and_writes_nothing(tmp_path):
    path = tmp_path / "missing" / "run.pt"
    with pytest.raises(WriteError, match=rf"^cannot save the training state to {path} \(FileNotFoundError: .*\); check "
                                        rf"that {path.parent} exists, is writable and has room; nothing was written$"):
        statefile.write(_state(), path)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, TypeError("cannot pickle 'generator' object")])
def test_ctrl_c_or_an_unsaveable_value_removes_the_temporary_file_and_is_not_wrapped(previous, monkeypatch, stop):
    path, data = previous

    def interrupted(obj, f):
        f.write(b"PK")
        raise stop

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(type(stop) if isinstance(stop, Exception) else stop) as info:
        statefile.write(_state(2.0), path)
    assert not isinstance(info.value, WriteError)
    _assert_kept(path, data)


def test_a_write_that_succeeds_replaces_the_previous_save(previous):
    path, _ = previous
    statefile.write(_state(2.0), path)
    assert torch.equal(statefile.read(path)["weights"], torch.full((256,), 2.0))
    assert sorted(os.listdir(path.parent)) == [path.name]
