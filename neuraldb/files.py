"""Atomic, checksummed artifact folders: a JSON description beside one safetensors file.

Every artifact neuraldb writes (fact stores, weight edits, statistics caches) goes through
:func:`write_artifact`: the new folder is written complete under a temporary name and swapped in,
so an interrupted write never leaves a half-written artifact and never loses the previous one.
:func:`read_artifact` checks the format tag and the tensor file's sha256 before returning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neuraldb import distributed
from neuraldb.models import dumps

TENSORS = "tensors.safetensors"
ARTIFACT_META = {"store.json", "edits.json"}  # the description files of what `neuraldb edit` writes


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    try:
        fill(tmp)
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Write ``tensors`` and ``meta`` (plus the tensors' sha256) as folder ``path``, atomically."""

    def fill(tmp: Path) -> None:
        file = tmp / TENSORS
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))
        (tmp / meta_name).write_text(dumps(meta | {"tensors_sha256": sha256_file(file)}) + "\n", encoding="utf-8")

    write_folder(path, fill)


def read_meta(path: str | Path, meta_name: str, fmt: str | tuple[str, ...]) -> dict[str, Any]:
    """The JSON description of artifact ``path``, checked to be of format ``fmt`` (or one of them:
    the current format first, then older ones still read)."""
    formats = (fmt,) if isinstance(fmt, str) else fmt
    fmt = formats[0]
    path = Path(path)
    meta_file = path / meta_name
    if not meta_file.is_file() or not (path / TENSORS).is_file():
        kind = fmt.split("/")[0].replace("-", " ", 1)  # "neuraldb-store/1" → "neuraldb store"
        raise ArtifactError(f"{path} is not a {kind} ({meta_name} / {TENSORS} missing)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file} is corrupt: {e.msg} at line {e.lineno}") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path}: unknown format {found!r} (expected {fmt})")
    return meta


def read_artifact(
    path: str | Path, meta_name: str, fmt: str | tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of artifact ``path``; refuses a wrong format or a tensor file that fails its sha256."""
    meta = read_meta(path, meta_name, fmt)
    file = Path(path) / TENSORS
    if sha256_file(file) != meta.get("tensors_sha256"):
        raise ArtifactError(f"{file} is corrupt: sha256 does not match {meta_name}")
    return meta, load_file(str(file))


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
