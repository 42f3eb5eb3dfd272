"""Atomic, checksummed artifact folders: a JSON description beside one safetensors file.

Every artifact neuraldb writes (fact stores, weight edits, statistics caches) goes through
:func:`write_artifact`: the new folder is written complete under a temporary name and swapped in,
so an interrupted write never leaves a half-written artifact and never loses the previous one.
Writers hold an advisory lock (:func:`locked`, a ``.NAME.lock`` file beside the folder), so two
processes never interleave a read-modify-write of one artifact; a swap that a kill interrupted is
rolled back on the next open, and leftover temporary folders are removed (:func:`recover`).
:func:`read_artifact` checks the format tag, the description's own sha256 (``meta_sha256``, over
everything else in it) and the tensor file's sha256 before returning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from neuraldb import distributed
from neuraldb.models import dumps

TENSORS = "tensors.safetensors"
ARTIFACT_META = {"store.json", "edits.json"}  # the description files of what `neuraldb edit` writes
META_SHA = "meta_sha256"  # the description's checksum over all its other fields
LOCK_WAIT = 600.0  # seconds a writer waits for another process's lock before giving up
_LOCKS: dict[str, FileLock] = {}  # one lock object per artifact path: re-entrant within a process


class ArtifactError(ValueError):
    """An artifact folder is missing, corrupt, or of another kind."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_folder(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build folder ``path`` atomically: ``fill(tmp)`` writes its contents into a temporary folder
    beside it, which is then swapped in (the previous folder is kept until then; a folder holding
    anything the new one would not is refused, :func:`_swap_in`). Under ``torchrun`` only rank 0
    writes."""
    if not distributed.is_main():
        return
    path = Path(path)
    _refuse_foreign(path)  # before the lock file is made beside a folder that is not ours
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        _recover_locked(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
        try:
            fill(tmp)
            _swap_in(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def lock_file(path: str | Path) -> Path:
    """The lock file of artifact ``path``: ``.NAME.lock`` beside it (kept after use)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def locked(path: str | Path, wait: float | None = None) -> Iterator[None]:
    """Hold the advisory lock of artifact ``path`` (re-entrant within a process): a second process
    waits up to ``wait`` seconds (default :data:`LOCK_WAIT`), then ArtifactError. Commands that read,
    change and write an artifact hold it throughout, so no update is lost."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(str(path), FileLock(str(lock_file(path))))
    try:
        lock.acquire(timeout=LOCK_WAIT if wait is None else wait)
    except Timeout:
        raise ArtifactError(f"{path} is being written by another process (lock {lock_file(path)}); "
                            "try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Folders ``NAME.tmp-*`` / ``NAME.old-*`` beside ``path`` that hold only what an artifact holds
    (a tensor file and JSON descriptions), newest first."""
    found = []
    for p in path.parent.glob(f"{path.name}.{kind}-*"):
        if p.is_dir() and not p.is_symlink() and all(
                f.is_file() and (f.name == TENSORS or f.suffix == ".json") for f in p.iterdir()):
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover(path: str | Path) -> None:
    """Undo what a killed writer left at ``path``: when the folder is missing but its previous
    version was moved aside (a kill between the two renames of a swap), put that back; remove
    leftover temporary folders. Does nothing while another process holds the lock, except wait for
    it when the folder is missing mid-swap."""
    path = Path(path)
    if not distributed.is_main() or not path.parent.is_dir():
        return
    if not _leftovers(path, "tmp") and not _leftovers(path, "old"):
        return  # nothing to recover: no lock is taken (and no lock file made) for a plain read
    try:
        with locked(path, wait=0 if path.exists() else 5.0):
            _recover_locked(path)
    except ArtifactError:
        if not path.exists() and _leftovers(path, "old"):
            raise


def _recover_locked(path: Path) -> None:
    """:func:`recover`'s work, with the lock held."""
    old = _leftovers(path, "old")
    if not path.exists() and old:
        os.replace(old.pop(0), path)  # roll the interrupted swap back: the previous artifact is whole
    for p in old + _leftovers(path, "tmp"):
        shutil.rmtree(p, ignore_errors=True)


def check_out(path: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder that cannot become an artifact: a file, a folder
    holding anything but an artifact (a user's files), an artifact when ``overwrite`` is off, or a
    place that cannot be written."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{path} exists and is not a folder: choose another output")
        names = {p.name for p in path.iterdir()}
        if names and not (TENSORS in names and names - {TENSORS} <= ARTIFACT_META):
            raise ArtifactError(f"{path} already holds other files: refusing to write there; choose a new or "
                                "empty folder")
        if names and not overwrite:
            raise ArtifactError(f"{path} already holds an edit artifact: pass --overwrite to replace it "
                                "(or `neuraldb facts add` to add facts to a store)")
    check_writable(path)


def check_writable(path: str | Path) -> None:
    """Raise ArtifactError unless ``path`` can be created or replaced: the nearest existing folder
    above it must be a folder this process may write in (missing folders are made on writing)."""
    path = Path(path)
    base = next(p for p in [path.parent, *path.parent.parents] if p.exists())  # the folder written in
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ArtifactError(f"{path}: cannot write in {base}")


def write_artifact(path: str | Path, meta_name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` and ``meta`` (plus the tensors' sha256 and its own) as folder ``path``,
    atomically. A floating tensor holding NaN or ±inf is refused: it would load as a silently broken
    model."""
    if bad := next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                   None):
        raise ArtifactError(f"refusing to write {path}: tensor {bad} holds values that are not finite numbers")

    def fill(tmp: Path) -> None:
        file = tmp / TENSORS
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))
        full = {k: v for k, v in meta.items() if k != META_SHA} | {"tensors_sha256": sha256_file(file)}
        (tmp / meta_name).write_text(dumps(full | {META_SHA: meta_sha256(full)}) + "\n", encoding="utf-8")

    write_folder(path, fill)


def meta_sha256(meta: dict[str, Any]) -> str:
    """sha256 of a description's deterministic JSON (without its own checksum field)."""
    body = {k: v for k, v in meta.items() if k != META_SHA}
    return hashlib.sha256(dumps(body).encode("utf-8")).hexdigest()


def read_meta(path: str | Path, meta_name: str, fmt: str | tuple[str, ...]) -> dict[str, Any]:
    """The JSON description of artifact ``path``, checked to be of format ``fmt`` (or one of them:
    the current format first, then older ones still read) and against its own sha256 (descriptions
    written before it had one are read unchecked)."""
    formats = (fmt,) if isinstance(fmt, str) else fmt
    fmt = formats[0]
    path = Path(path)
    recover(path)
    meta_file = path / meta_name
    if not meta_file.is_file() or not (path / TENSORS).is_file():
        kind = fmt.split("/")[0].replace("-", " ", 1)  # "neuraldb-store/1" → "neuraldb store"
        raise ArtifactError(f"{path} is not a {kind} ({meta_name} / {TENSORS} missing)")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file} is corrupt: {e.msg} at line {e.lineno}") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ArtifactError(f"{meta_file} is corrupt: {type(e).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path}: unknown format {found!r} (expected {fmt})")
    if META_SHA in meta and meta[META_SHA] != meta_sha256(meta):
        raise ArtifactError(f"{meta_file} is corrupt: its contents do not match its {META_SHA}")
    return meta


def read_artifact(
    path: str | Path, meta_name: str, fmt: str | tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of artifact ``path``; refuses a wrong format or a tensor file that fails its sha256."""
    meta = read_meta(path, meta_name, fmt)
    file = Path(path) / TENSORS
    if sha256_file(file) != meta.get("tensors_sha256"):
        raise ArtifactError(f"{file} is corrupt: sha256 does not match {meta_name}")
    try:
        return meta, load_file(str(file))
    except Exception as e:  # noqa: BLE001  # safetensors raises its own types on a malformed header
        raise ArtifactError(f"{file} is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename); under
    ``torchrun`` only rank 0 writes."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as deterministic JSON, atomically."""
    write_text(path, dumps(obj) + "\n")


def _refuse_foreign(path: Path) -> None:
    """ArtifactError when ``path`` exists and is a file or holds a file an artifact does not (a
    tensor file, JSON descriptions, lock files). Folders inside are left to :func:`_swap_in`'s
    exact check (an artifact may hold artifacts, e.g. a checkpoint its editor's)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not an artifact folder")
    ours = lambda p: p.name == TENSORS or p.suffix == ".json" or (p.name.startswith(".") and p.suffix == ".lock")  # noqa: E731
    if any(p.is_file() and not ours(p) for p in path.iterdir()):
        foreign = sorted(p.name for p in path.iterdir() if p.is_dir() or not ours(p))
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(f"{path} already holds other files ({shown}): refusing to replace it; "
                            "choose a new or empty folder")


def _swap_in(new: Path, path: Path) -> None:
    """Replace folder ``path`` by ``new``; the old folder is removed only after the new one is in place.

    Only an artifact is ever replaced: an existing folder must be empty or hold nothing but names the
    new folder also has (the same kind of artifact), else ArtifactError names what it holds."""
    if not path.exists():
        os.replace(new, path)
        return
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not an artifact folder")
    foreign = sorted({p.name for p in path.iterdir()} - {p.name for p in new.iterdir()})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(f"{path} already holds other files ({shown}): refusing to replace it; "
                            "choose a new or empty folder")
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".old-"))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
