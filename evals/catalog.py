"""The data files neuraldb knows: their place under ``$NEURALDB_DATA``, sha256 and source.

``checksums.json`` (beside this module) is the table of every file of the shared data folder
(path → sha256, bytes, records, from its MANIFEST) plus the canonical files users can download
with ``neuraldb data fetch``. :func:`survey` checks what is present against it; :func:`fetch`
downloads a canonical file, checks its sha256 and moves it into place atomically.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuraldb.data import data_dir
from neuraldb.files import sha256_file

_TABLE = Path(__file__).with_name("checksums.json")


class DataFetchError(RuntimeError):
    """A canonical file could not be downloaded or did not match its checksum."""


@dataclass(frozen=True)
class Remote:
    """A canonical file: where it goes under the data folder, where it comes from, and its sha256
    (``None`` when no published checksum is known: the download is then reported unverified)."""

    path: str
    url: str
    sha256: str | None


_ROME = "https://rome.baulab.info/data/dsets/"
_MQUAKE = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/"
REMOTES: dict[str, tuple[Remote, ...]] = {
    "counterfact": (Remote("counterfact/counterfact.json", _ROME + "counterfact.json",
                           "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"),),
    "mcf": (Remote("counterfact/multi_counterfact.json", _ROME + "multi_counterfact.json", None),),
    "zsre": (Remote("zsre/zsre_mem_eval.json", _ROME + "zsre_mem_eval.json", None),),
    "consistency": (
        Remote("counterfact/attribute_snippets.json", _ROME + "attribute_snippets.json",
               "10b5c1cd105e54d5983c72de1b45bfc88bc7af786f7b99def2557886ff23385b"),
        Remote("counterfact/idf.npy", _ROME + "idf.npy",
               "c073d642589d4ac6432f467230329b36364a01e72de63a77a3624b745b923dda"),
        Remote("counterfact/tfidf_vocab.json", _ROME + "tfidf_vocab.json",
               "8a78c4f20d8d85dadfd14e283d71af255482ff18aa0eb8a81716024c05ff888b"),
    ),
    "mquake": (Remote("mquake/MQuAKE-CF-3k-v2.json", _MQUAKE + "MQuAKE-CF-3k-v2.json", None),
               Remote("mquake/MQuAKE-T.json", _MQUAKE + "MQuAKE-T.json", None)),
}


def known_files() -> dict[str, dict[str, object]]:
    """path → {sha256, bytes, records} for every file of the table (shared data + canonical)."""
    table: dict[str, dict[str, object]] = json.loads(_TABLE.read_text(encoding="utf-8"))
    for remotes in REMOTES.values():
        for r in remotes:
            table.setdefault(r.path, {"sha256": r.sha256, "bytes": None, "records": None})
    return table


@dataclass(frozen=True)
class GroupStatus:
    """One top-level folder of the data table: how many of its files are present and intact."""

    name: str
    expected: int
    present: int
    verified: int
    mismatched: tuple[str, ...]
    records: int
    bytes: int


def survey(root: Path | None = None) -> list[GroupStatus]:
    """Check every known file under ``root`` (default ``$NEURALDB_DATA``) against its sha256."""
    root = root or data_dir()
    groups: dict[str, list[tuple[str, dict[str, object]]]] = {}
    for path, info in sorted(known_files().items()):
        groups.setdefault(path.split("/")[0], []).append((path, info))
    out = []
    for name, files in groups.items():
        present = verified = records = size = 0
        bad: list[str] = []
        for path, info in files:
            f = root / path
            if not f.is_file():
                continue
            present += 1
            size += f.stat().st_size
            records += int(info["records"] or 0)  # type: ignore[call-overload]
            if info["sha256"] is None:
                continue
            if sha256_file(f) == info["sha256"]:
                verified += 1
            else:
                bad.append(path)
        out.append(GroupStatus(name, len(files), present, verified, tuple(bad), records, size))
    return out


def check_file(path: Path, relative: str) -> str:
    """The sha256 of ``path``; raises when the table knows another checksum for ``relative``."""
    digest = sha256_file(path)
    expected = known_files().get(relative, {}).get("sha256")
    if expected is not None and digest != expected:
        raise DataFetchError(f"{relative}: sha256 {digest[:12]}… does not match the known {str(expected)[:12]}…")
    return digest


def fetch(name: str, root: Path | None = None, progress: Callable[[str, int, int | None], None] | None = None,
          timeout: float = 30.0) -> list[tuple[Remote, str, bool]]:
    """Download the canonical files of ``name`` into ``root``; returns (file, sha256, verified).

    Files already present with the right checksum are kept. Raises:
        DataFetchError: unknown name, no network, HTTP error, or a checksum mismatch (the partial
            download is removed and nothing already in place is touched).
    """
    if name not in REMOTES:
        raise DataFetchError(f"unknown data set {name!r}; fetchable: {', '.join(sorted(REMOTES))}")
    root = root or data_dir()
    done = []
    for remote in REMOTES[name]:
        dest = root / remote.path
        if dest.is_file() and remote.sha256 and sha256_file(dest) == remote.sha256:
            done.append((remote, remote.sha256, True))
            continue
        digest = _download(remote, dest, progress, timeout)
        done.append((remote, digest, remote.sha256 is not None))
    return done


def _download(remote: Remote, dest: Path, progress: Callable[[str, int, int | None], None] | None,
              timeout: float) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as resp, tmp.open("wb") as f:  # noqa: S310
            total = resp.headers.get("Content-Length")
            got = 0
            while block := resp.read(1 << 20):
                f.write(block)
                h.update(block)
                got += len(block)
                if progress:
                    progress(remote.path, got, int(total) if total else None)
        if total and got != int(total):
            raise DataFetchError(f"{remote.url}: download ended after {got:,} of {int(total):,} bytes; "
                                 "nothing was written")
        digest = h.hexdigest()
        if remote.sha256 is not None and digest != remote.sha256:
            raise DataFetchError(f"{remote.url}: sha256 {digest[:12]}… does not match the expected "
                                 f"{remote.sha256[:12]}…; nothing was written")
        os.replace(tmp, dest)
        return digest
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataFetchError(f"cannot download {remote.url} ({reason}); offline? copy the file to {dest} "
                             "by hand and run `neuraldb data list` to check it") from None
    finally:
        tmp.unlink(missing_ok=True)
