"""The editing-evaluation protocol, explicit: which records, how many edits, in which batches,
when evaluation happens — and a run of one or more editors under it on the same records.

``sequential`` (AlphaEdit's protocol, the papers' tables): the first max(N) records are edited in
batches of ``batch_size`` in order, never restored in between; after the first N edits (for each
requested N) the first N records are evaluated on the model as it is then. ``sequential=False``
(MEMIT's ``evaluate.py``): each batch is edited into the unedited model, its records evaluated,
and the model restored. The unedited model is evaluated once on the same records in the same run.
Every editor starts from the unedited model and is restored (checked by fingerprint) afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from evals.consistency import ReferenceTexts
from evals.datasets import Dataset, EvalRecord, select
from evals.evaluate import Dropped, EvalOptions, edited_probes, metrics, score_records
from neuraldb.editor import Editor, Hparams
from neuraldb.facts import EditRequest
from neuraldb.files import lock_file, write_folder, write_json
from neuraldb.models import LoadedModel, fingerprint, model_summary

FORMAT = "neuraldb-eval/1"


@dataclass(frozen=True)
class Protocol:
    """``n``: the numbers of edits at which to evaluate (ascending); ``sample_seed``: None for the
    first records, else a seeded sample; ``batch_size``: facts per edit call."""

    dataset: str
    n: tuple[int, ...]
    batch_size: int = 100
    sequential: bool = True
    sample_seed: int | None = None

    def validate(self) -> None:
        if not self.n or list(self.n) != sorted(set(self.n)) or self.n[0] < 1:
            raise ValueError(f"--n must be ascending positive numbers, got {','.join(map(str, self.n))}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.sequential and (odd := [n for n in self.n[:-1] if n % self.batch_size]):
            raise ValueError(f"--n {','.join(map(str, odd))}: an intermediate number of edits must be a multiple of "
                             f"--batch-size {self.batch_size} (otherwise it would split a batch)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"evaluation": "after the first N edits, on the first N records" if self.sequential
                               else "after each batch, on that batch, then restored"}

    def chunks(self) -> list[tuple[int, int]]:
        """(start, end) of each edit call: batches of ``batch_size`` that also end at every N."""
        cuts = sorted(set(self.n) | set(range(self.batch_size, self.n[-1], self.batch_size)) | {self.n[-1]})
        return list(zip([0, *cuts[:-1]], cuts))


def source_sha() -> str:
    """sha256 of the Python sources of neuraldb, baselines and evals (which code produced a row)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in ("neuraldb", "baselines", "evals"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "neuraldb_source": source_sha()}
    for pkg in ("neuraldb", "torch", "transformers", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def records_sha(records: list[EvalRecord]) -> str:
    """sha256 over the selected records' ids, in order (which records were used)."""
    return hashlib.sha256("\n".join(r.request.id for r in records).encode()).hexdigest()


Report = Callable[[str, int, int], None]


def _evaluate(lm: LoadedModel, ds: Dataset, records: list[EvalRecord], opts: EvalOptions,
              refs: ReferenceTexts | None, report: Report | None,
              offset: int = 0) -> tuple[list[dict[str, Any]], float]:
    t = time.perf_counter()
    cases = score_records(lm, ds.kind, records, opts, refs, report, offset)
    return cases, time.perf_counter() - t


def _points(ds: Dataset, protocol: Protocol, records: list[EvalRecord], opts: EvalOptions,
            cases: list[dict[str, Any]],
            reference: list[dict[str, Any]] | None = None) -> dict[str, dict[str, float | None]]:
    return {str(n): metrics(ds.kind, cases[:n], reference, dropped(protocol, records, opts, n))
            for n in protocol.n}


def _count(d: Dropped | None) -> int:
    return sum(len(nb) + len(loc) for nb, loc in (d or {}).values())


def dropped(protocol: Protocol, records: list[EvalRecord], opts: EvalOptions, n: int) -> Dropped | None:
    """What the metrics at N leave out (:func:`evals.evaluate.edited_probes`): prompts that are the
    edit prompt of a fact in the model when they are scored; None with ``keep_edited_probes``."""
    if opts.keep_edited_probes:
        return None
    groups = [records[:n]] if protocol.sequential else [records[a:b] for a, b in protocol.chunks() if b <= n]
    return edited_probes(groups)


def evaluate_unedited(lm: LoadedModel, ds: Dataset, records: list[EvalRecord], protocol: Protocol,
                      opts: EvalOptions, refs: ReferenceTexts | None = None,
                      report: Report | None = None) -> dict[str, Any]:
    """The pre-edit row: per-case scores of the unedited model and its metrics at every N."""
    cases, seconds = _evaluate(lm, ds, records, opts, refs, report)
    return {"points": _points(ds, protocol, records, opts, cases), "eval_seconds": seconds, "cases": cases}


STATE_KEYS = {"done", "edit_seconds", "eval_seconds", "points", "cases", "resumed_at"}


@dataclass(frozen=True)
class Checkpoint:
    """Where a sequential row keeps its state after every edit batch but the last, so that a row cut
    short (a killed process, a session's end) continues from its last finished batch.

    ``path``: a folder holding the editor's artifact (``editor/``, :meth:`Editor.save`) and
    ``state.json`` (edits made, clocks, metrics and per-case scores so far), replaced atomically as
    one; ``run``: the identity of the run and row (a hash of the header, editor and hyperparameters).
    A saved state of another run, or one that cannot be read back, is ignored (the row starts over).
    Continuing gives the same metrics and per-case scores as one uninterrupted run (the artifacts
    restore the editor's state exactly); only the clocks and ``resumed_at`` tell them apart.
    """

    path: Path
    run: str

    def load(self, lm: LoadedModel, editor_cls: type[Editor]) -> tuple[Editor, dict[str, Any]] | None:
        """The saved editor (applied to ``lm``) and state, or None when there is none for this run."""
        try:
            state = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(state, dict) or state.get("run") != self.run or not STATE_KEYS <= state.keys():
            return None
        try:
            return editor_cls.load(lm, self.path / "editor"), state
        except (ValueError, KeyError, OSError):  # a corrupt artifact (ArtifactError is a ValueError)
            self.clear()
            return None

    def save(self, editor: Editor, state: dict[str, Any]) -> None:
        def fill(tmp: Path) -> None:
            editor.save(tmp / "editor")
            write_json(tmp / "state.json", state | {"run": self.run})

        write_folder(self.path, fill)

    def clear(self) -> None:
        """Remove the saved state and what an interrupted save left beside it."""
        for p in [self.path, *self.path.parent.glob(f"{self.path.name}.tmp-*"),
                  *self.path.parent.glob(f"{self.path.name}.old-*")]:
            shutil.rmtree(p, ignore_errors=True)
        lock_file(self.path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the run's folder, once no row has a partial state
            self.path.parent.rmdir()


def run_editor(lm: LoadedModel, editor_cls: type[Editor], hparams: Hparams, ds: Dataset, records: list[EvalRecord],
               protocol: Protocol, opts: EvalOptions, refs: ReferenceTexts | None = None,
               report: Report | None = None, prepare: Callable[[Editor], None] | None = None,
               after: Callable[[], Any] | None = None, checkpoint: Checkpoint | None = None,
               reference: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Edit ``records`` with one editor under ``protocol``, evaluate at every N, restore the model.

    Returns ``{"hparams", "points": {N: metrics}, "edit_seconds", "eval_seconds", "cases"}`` where
    ``cases`` are the per-case scores at the largest N; with ``after`` (sequential protocol only),
    its result on the model holding all edits is added as ``"general"``. ``checkpoint`` (sequential
    protocol only): continue from its saved state when it has one for this run, and save the state
    there after every batch but the last (the caller clears it once the row is saved); the row then
    lists in ``"resumed_at"`` the numbers of edits it was continued from. ``reference``: the
    unedited row's per-case scores, which metrics comparing with the unedited model read (KnowEdit's
    locality). Raises RuntimeError when the editor does not give the unedited model back.
    """
    base = lm.fingerprint
    requests: list[EditRequest] = [r.request for r in records]
    checkpoint = checkpoint if protocol.sequential else None
    state: dict[str, Any] = {"done": 0, "edit_seconds": 0.0, "eval_seconds": 0.0, "points": {}, "cases": [],
                             "resumed_at": []}
    saved = checkpoint.load(lm, editor_cls) if checkpoint else None
    editor = saved[0] if saved else editor_cls(lm, hparams)
    if saved:
        state = saved[1] | {"resumed_at": [*saved[1]["resumed_at"], saved[1]["done"]]}
        if report:
            report("edits", state["done"], len(requests))
    general = None
    try:
        if prepare:
            prepare(editor)
        chunks = protocol.chunks()
        for start, end in chunks:
            if end <= state["done"]:
                continue
            if not protocol.sequential and start > 0:
                editor.restore()
                editor = editor_cls(lm, hparams)
            t = time.perf_counter()
            editor.edit(requests[start:end])
            state["edit_seconds"] += time.perf_counter() - t
            if report:
                report("edits", end, len(requests))
            if not protocol.sequential:
                got, s = _evaluate(lm, ds, records[start:end], opts, refs, None, offset=start)
                state["eval_seconds"] += s
                state["cases"].extend(got)
            elif end in protocol.n:
                got, s = _evaluate(lm, ds, records[:end], opts, refs, None)
                state["eval_seconds"] += s
                state["points"][str(end)] = metrics(ds.kind, got, reference, dropped(protocol, records, opts, end))
                state["cases"] = got
            state["done"] = end
            if checkpoint and end < chunks[-1][1]:
                checkpoint.save(editor, state)
        if after is not None and protocol.sequential:
            general = after()
    finally:
        editor.restore()
    if fingerprint(lm.model) != base:
        raise RuntimeError(f"{editor_cls.name} did not restore the unedited model")
    points = state["points"] if protocol.sequential else _points(ds, protocol, records, opts, state["cases"], reference)
    row = {"hparams": editor.hparams.to_dict(), "points": points, "edit_seconds": state["edit_seconds"],
           "eval_seconds": state["eval_seconds"], "edits": len(requests), "cases": state["cases"]}
    return (row | ({"general": general} if general is not None else {})
            | ({"resumed_at": state["resumed_at"]} if state["resumed_at"] else {}))


def header(lm: LoadedModel, ds: Dataset, records: list[EvalRecord], protocol: Protocol, opts: EvalOptions,
           refs: ReferenceTexts | None) -> dict[str, Any]:
    """Everything that defines a run (two runs with equal headers are comparable and resumable)."""
    return {"format": FORMAT, "model": model_summary(lm) | {"device": str(lm.device), "dtype": str(lm.model.dtype)},
            "dataset": ds.describe() | {
        "selected": len(records), "records_sha256": records_sha(records)},
        "protocol": protocol.to_dict(), "evaluation": opts.to_dict() | {
            "consistency": "available" if refs is not None else "unavailable (reference files absent)",
            "edited_probes_left_out": {str(n): _count(dropped(protocol, records, opts, n)) for n in protocol.n}},
        "versions": versions()}


def select_records(ds: Dataset, protocol: Protocol) -> list[EvalRecord]:
    protocol.validate()
    return select(ds.records, protocol.n[-1], protocol.sample_seed)
