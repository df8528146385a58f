"""The files of a sharded save on disk: which directory holds it, their manifest, DCP's metadata read safely.

A save at ``path`` is a directory (:mod:`memfit.engine.sharded` writes it across ranks):
``torch.distributed.checkpoint`` (DCP)'s ``.metadata`` and ``__<rank>_<n>.distcp`` files, and
``trainer-rank<r>.pt`` per rank (:mod:`memfit.statefile`: checksummed). Rank 0's file is the **seal**:
written last, once every other file is complete, it lists every other file with its size and SHA-256
(the *manifest*). A directory is *sealed* when its seal reads back whole; a sealed directory is a
complete save (the seal is renamed into place atomically by :func:`memfit.statefile.write`).

The protocol of a save (rank 0 renames; the ranks agree between the steps):

1. :func:`recover`: what a killed save left is finished or cleared, never the only complete save: with
   no ``path``, a sealed ``path.tmp`` (killed between the renames) and else a sealed ``path.old`` is
   renamed to ``path``; then ``path.tmp`` and ``path.old`` are removed (seal first, so that a removal
   cut short never leaves a sealed directory with files missing).
2. Every rank writes its part into ``path.tmp``; the ranks hash the files; rank 0 writes the seal
   (:func:`seal`), every file synced to disk before it.
3. :func:`commit`: ``path`` -> ``path.old``, ``path.tmp`` -> ``path`` (each ``os.rename`` atomic), the
   parent directory synced; then ``path.old`` is removed (:func:`remove`).

A run killed at any point leaves a complete save that :func:`locate` finds (``load`` changes nothing on
disk; the next save's :func:`recover` tidies):

* killed in 1, or in 2 before the seal: ``path`` (the previous save) and a partial or no ``path.tmp``:
  ``path`` is loaded;
* after the seal, before the first rename: ``path`` and a sealed ``path.tmp``: ``path`` (the previous save);
* between the renames: ``path.old`` and a sealed ``path.tmp``, no ``path``: ``path.tmp`` (the new save);
* after the second rename: ``path`` (the new save) and what is left of ``path.old``: ``path``;
* the first save ever, before its rename: only ``path.tmp``: loaded if sealed, else there is no save.

Loading checks everything before anything changes (:func:`check_listing`: no file missing, none extra,
each of its size; :func:`check_digests`: each file's SHA-256; :func:`read_metadata`: DCP's metadata
unpickled with an allow-list of its own types, never ``pickle.load``, and every pickled non-tensor entry
loadable weights-only). Each refusal is one :class:`memfit.UsageError` naming the file.

Known limitations: the manifest detects damage, not forgery: whoever can rewrite the files can rewrite
the seal (nothing they write runs, though). Across a power cut the order relies on ``fsync`` (DCP's data
files, each file before the seal, the directories after the renames): a filesystem that ignores it may
lose the newest save. The world size must be the one saved.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
from typing import Any

import torch

from memfit import statefile
from memfit.errors import UsageError

__all__ = ["SEAL", "METADATA", "rank_file", "sealed", "recover", "seal", "commit", "remove", "locate", "read_seal",
           "payload_names", "hash_files", "manifest_of", "check_listing", "check_digests", "read_metadata",
           "MetadataUnpickler"]

SEAL = "trainer-rank0.pt"
"""Rank 0's file, written last: it holds the manifest (``"manifest"``: name -> ``{"bytes", "sha256"}``)."""
METADATA = ".metadata"
"""DCP's metadata file (``_metadata_fn`` in torch/distributed/checkpoint/filesystem.py, torch 2.13)."""

log = logging.getLogger("memfit")
_FIX = "nothing was loaded: use an earlier save"


def rank_file(directory: str, rank: int) -> str:
    """Rank ``rank``'s file in a save: the rest of its Trainer state (rank 0's is the seal)."""
    return os.path.join(directory, f"trainer-rank{rank}.pt")


# ---------------------------------------------------------------- the directories of a save

def sealed(directory: str) -> bool:
    """True if ``directory`` holds a seal that reads back whole with its manifest: a complete save."""
    try:
        return isinstance(statefile.read(os.path.join(directory, SEAL)).get("manifest"), dict)
    except (UsageError, OSError):
        return False


def recover(path: str) -> None:
    """Step 1 of a save (rank 0): finish or clear what a killed save left; the only complete save is kept."""
    tmp, old = f"{path}.tmp", f"{path}.old"
    if not os.path.lexists(path):
        for done in (tmp, old):  # a sealed path.tmp is the newer: its save renamed path to path.old after sealing it
            if sealed(done):
                log.warning("memfit: %s was left by a save killed between its renames: it becomes %s", done, path)
                os.rename(done, path)
                break
    remove(tmp)
    remove(old)


def seal(directory: str, state: dict[str, Any], manifest: dict[str, dict[str, Any]]) -> None:
    """Step 2's end (rank 0): its ``state`` with the ``manifest`` of every other file, written last and synced."""
    statefile.write({**state, "manifest": manifest}, os.path.join(directory, SEAL))
    _sync(os.path.join(directory, SEAL))
    _sync(directory)


def commit(path: str) -> None:
    """Step 3 (rank 0): the sealed ``path.tmp`` becomes ``path``; the previous save is left at ``path.old``."""
    if os.path.lexists(path):
        os.rename(path, f"{path}.old")
    os.rename(f"{path}.tmp", path)
    _sync(os.path.dirname(os.path.abspath(path)))  # the renames are on disk before path.old is removed


def remove(path: str) -> None:
    """Remove a directory (its seal first: a removal cut short is never sealed) or a file, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        if os.path.exists(os.path.join(path, SEAL)):
            os.remove(os.path.join(path, SEAL))
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def locate(path: str, rank: int, world_size: int) -> str:
    """The directory holding the save at ``path`` (``path``, else a sealed ``path.tmp``, else ``path.old``).

    Raises:
        UsageError: nothing there is a save of this run's rank ``rank``.
    """
    found = path if os.path.isdir(path) else None
    if found is None and not os.path.lexists(path):
        found = next((d for d in (f"{path}.tmp", f"{path}.old") if sealed(d)), None)
        if found is not None:
            log.warning("memfit: no %s: loading %s, the complete save that a save killed midway left", path, found)
    if found is None or not os.path.isfile(rank_file(found, rank)):
        raise UsageError(f"{path} is not a save of this run's rank {rank}: a run on several ranks saves a "
                         f"directory with a trainer-rank<r>.pt per rank; load it with the same world size "
                         f"({world_size} now)")
    return found


def read_seal(directory: str) -> dict[str, Any]:
    """Rank 0's state in ``directory`` (checksum verified; read weights-only)."""
    return statefile.read(os.path.join(directory, SEAL))


def _sync(path: str) -> None:
    """``fsync`` a file or directory: what the seal vouches for is on disk before the seal is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the manifest

def payload_names(directory: str) -> list[str]:
    """Every file of a save but the seal, sorted: what the manifest lists."""
    return sorted(name for name in os.listdir(directory) if name != SEAL)


def hash_files(directory: str, names: list[str], *, sync: bool = False) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` (``sync``: each flushed to disk too)."""
    out = {}
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time (hashlib.file_digest is 3.11+)
                h.update(block)
            digest = h.hexdigest()
            if sync:
                os.fsync(f.fileno())
            out[name] = {"bytes": os.fstat(f.fileno()).st_size, "sha256": digest}
    return out


def manifest_of(directory: str, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest in the seal's ``state``; refused where there is none (a save made before manifests)."""
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise UsageError(f"{os.path.join(directory, SEAL)} has no manifest of the save's files, so they cannot be "
                         "verified (saved before memfit sealed sharded saves, or not by memfit); nothing was loaded: "
                         "resume with the memfit that wrote it, or from a save made by this one")
    return manifest


def check_listing(directory: str, manifest: dict[str, dict[str, Any]]) -> None:
    """Every file the manifest lists is there with its size, and no other (cheap: no file is read)."""
    present = set(payload_names(directory))
    for name in sorted(manifest):
        where = os.path.join(directory, name)
        if name not in present:
            raise UsageError(f"{where} is missing: the save's manifest ({SEAL}) lists it; {_FIX}")
        size = os.path.getsize(where)
        if size != manifest[name]["bytes"]:
            raise UsageError(f"{where} is {size} bytes and the save's manifest ({SEAL}) says "
                             f"{manifest[name]['bytes']}: the file is truncated or damaged; {_FIX}")
    extra = sorted(present - set(manifest))
    if extra:
        raise UsageError(f"{os.path.join(directory, extra[0])} is not part of the save (its manifest, {SEAL}, does "
                         f"not list it{f', nor {len(extra) - 1} other files' if len(extra) > 1 else ''}); remove "
                         "what was added to the directory, or use an earlier save")


def check_digests(directory: str, manifest: dict[str, dict[str, Any]], names: list[str]) -> None:
    """The files ``names`` have the SHA-256 the manifest lists."""
    for name, got in hash_files(directory, names).items():
        if got != manifest[name]:
            raise UsageError(f"{os.path.join(directory, name)} is damaged: its SHA-256 differs from the one in the "
                             f"save's manifest ({SEAL}); bytes changed on disk after the save; {_FIX}")


# ---------------------------------------------------------------- DCP's metadata, no code run

# What DCP's .metadata pickles (torch 2.13, torch/distributed/checkpoint/metadata.py and filesystem.py's
# _StorageInfo, named here as strings: nothing private is called). FileSystemReader.read_metadata would
# pickle.load the file (filesystem.py, read_metadata): any callable it names would run.
_ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: a lookup by name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # StorageMeta.checkpoint_id


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the classes of DCP's metadata (and ``torch`` dtypes); any other
    global a pickle names (a ``__reduce__`` calling ``os.system``, ``open``...) is refused before it is called."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or dtype:
            return super().find_class(module, name)
        raise UsageError(f"{self.source} is not DCP's metadata: it names {module}.{name}, which a checkpoint's "
                         "metadata never holds; refused without running it (a tampered or foreign save): use "
                         "an earlier save")

    def persistent_load(self, pid: Any) -> Any:
        raise UsageError(f"{self.source} is not DCP's metadata: it holds a persistent id; use an earlier save")


def read_metadata(directory: str, manifest: dict[str, dict[str, Any]]) -> Any:
    """DCP's ``Metadata`` of a save: its bytes checked against the manifest, unpickled by
    :class:`MetadataUnpickler`, every file it points to in the manifest, and every non-tensor entry
    (``BytesStorageMetadata``: DCP would ``torch.load`` it with ``weights_only=False``) loadable weights-only."""
    where = os.path.join(directory, METADATA)
    with open(where, "rb") as f:
        data = f.read()
    if manifest.get(METADATA) != {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}:
        raise UsageError(f"{where} is damaged: it differs from the save's manifest ({SEAL}); {_FIX}")
    try:
        metadata = MetadataUnpickler(io.BytesIO(data), where).load()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a damaged file; say which
        raise UsageError(f"{where} cannot be read as DCP's metadata ({type(exc).__name__}: {exc}); {_FIX}") from None
    storage = getattr(metadata, "storage_data", None)
    if type(metadata).__name__ != "Metadata" or not isinstance(storage, dict) \
            or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise UsageError(f"{where} is not DCP's metadata (it holds a {type(metadata).__name__}); {_FIX}")
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        if name not in manifest or name in (METADATA, SEAL) or getattr(info, "transform_descriptors", None):
            raise UsageError(f"{where} points {getattr(index, 'fqn', index)!r} at {name!r}, which is not a data "
                             f"file of this save (or is transformed, which memfit never writes); {_FIX}")
    _check_bytes_entries(directory, metadata)
    return metadata


def _check_bytes_entries(directory: str, metadata: Any) -> None:
    """Every pickled non-tensor entry (an optimizer's ``lr``, ``betas``...) loads with ``weights_only=True``."""
    for index, info in metadata.storage_data.items():
        if type(metadata.state_dict_metadata.get(index.fqn)).__name__ != "BytesStorageMetadata":
            continue
        where = os.path.join(directory, info.relative_path)
        with open(where, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - weights-only refusal or damage: name the entry
            raise UsageError(f"{where} holds {index.fqn!r} as a pickle that weights-only loading refuses "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                             f"refused without running it; {_FIX}") from None
