"""One comparison run, saved as it goes: the unedited row, then each editor, on the same records.

The result JSON (``OUT``) is rewritten atomically after every row, and per-case scores go to
``OUT`` with suffix ``.cases.json``; with ``resume`` a run whose header (model fingerprint,
dataset sha256, selected records, protocol, evaluation options) equals the saved one reuses the
rows already there, so an interrupted ``compare`` continues where it stopped; a row in progress
keeps its state in ``OUT.partial/EDITOR/`` after every edit batch (:class:`evals.protocol.Checkpoint`),
so it continues from its last finished batch. ``rows_from`` takes
rows of the same run from other result files too: rows computed side by side in separate
processes (one editor each) join one result, table and report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from baselines.closed_form import ClosedFormHparams
from evals.consistency import ReferenceTexts
from evals.datasets import Dataset
from evals.evaluate import EvalOptions
from evals.protocol import Checkpoint, Report, evaluate_unedited, header, run_editor, select_records
from neuraldb.editor import Editor, Hparams, get_editor
from neuraldb.files import write_json
from neuraldb.models import LoadedModel, dumps


@dataclass(frozen=True)
class General:
    """lm-eval general-ability tasks to run beside the editing metrics (:mod:`evals.general`)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    batch_size: int = 16

    def describe(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "limit": self.limit}

    def run(self, lm: LoadedModel) -> dict[str, Any]:
        from evals.general import run_general

        return run_general(lm, list(self.tasks), self.limit, self.batch_size)


def split_hparams(editors: list[str], assignments: list[str]) -> dict[str, list[str]]:
    """``[EDITOR:]KEY=VALUE`` assignments per editor; an unprefixed one applies to every editor."""
    out: dict[str, list[str]] = {e: [] for e in editors}
    for a in assignments:
        head, sep, rest = a.partition(":")
        if sep and "=" not in head:
            if head not in out:
                raise ValueError(f"--hparam {a!r}: {head!r} is not one of the editors run ({', '.join(editors)})")
            out[head].append(rest)
        else:
            for e in editors:
                out[e].append(a)
    return out


def editor_hparams(lm: LoadedModel, editors: list[str], assignments: list[str],
                   batch_size: int) -> dict[str, tuple[type[Editor], Hparams]]:
    """Each editor's class and hyperparameters for ``lm``; the closed-form baselines' sequential
    batch is the protocol's batch size."""
    out = {}
    per = split_hparams(editors, assignments)
    for name in editors:
        cls = get_editor(name)
        hp = cls.default_hparams(lm).parse(per[name])
        if isinstance(hp, ClosedFormHparams):  # its batch is the sequential closed-form batch
            hp = hp.replace(batch_size=batch_size)
        hp.validate(lm)
        out[name] = (cls, hp)
    return out


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(dumps(obj))


def read_result(path: Path, flag: str) -> dict[str, Any]:
    """A saved result JSON (or its per-case file), or ValueError naming ``flag`` and ``path``."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{flag} {path}: not a neuraldb result file")
    return saved


def _resumable(out: Path, head: dict[str, Any], flag: str = "--resume") -> dict[str, Any] | None:
    """The saved result at ``out`` when it is from the same run (same header and source code);
    raises ValueError naming what differs otherwise, so ``--resume`` never overwrites another run."""
    if not out.is_file():
        return None
    saved = read_result(out, flag)
    keys = ("format", "model", "dataset", "protocol", "evaluation")
    differ = [k for k in keys if saved.get(k) != _plain(head.get(k))]
    if saved.get("versions", {}).get("neuraldb_source") != head["versions"]["neuraldb_source"]:
        differ.append("source code")
    if differ:
        advice = ("choose another --out or drop --resume to overwrite it" if flag == "--resume" else
                  "its rows cannot join this one")
        raise ValueError(f"{flag} {out}: a different run (it differs in {', '.join(differ)}); {advice}")
    return saved


def _reuse(saved: dict[str, Any], out: Path, editors: dict[str, tuple[type[Editor], Hparams]], flag: str
           ) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """Rows of a saved identical run to keep, with their per-case scores: the unedited row, and
    the rows of this run's editors. With ``--resume``, a row run with other hyperparameters or
    without per-case scores is left out (computed again); with ``--rows-from`` either is an error."""
    strict = flag != "--resume"
    cases = read_result(cases_path(out), flag) if cases_path(out).is_file() else {}
    pre, kept, other = saved.get("pre"), {}, []
    for name, row in (saved.get("editors") or {}).items():
        if name not in editors:
            continue
        wanted = _plain(editors[name][1].to_dict())
        if isinstance(row, dict) and row.get("hparams") == wanted:
            kept[name] = row
        elif strict:
            got = row.get("hparams") if isinstance(row, dict) else None
            keys = sorted(k for k in wanted if not isinstance(got, dict) or got.get(k) != wanted[k])
            other.append(f"{name} ({', '.join(keys)})")
    if other:
        raise ValueError(f"{flag} {out}: run with other hyperparameters: {'; '.join(other)}")
    missing = [k for k in ["pre"] * (pre is not None) + list(kept) if k not in cases]
    if missing and strict:
        raise ValueError(f"{flag} {out}: per-case scores of {', '.join(missing)} are missing ({cases_path(out)})")
    pre = None if "pre" in missing else pre
    kept = {k: v for k, v in kept.items() if k not in missing}
    return pre, kept, {k: cases[k] for k in ["pre"] * (pre is not None) + list(kept)}


def _gather(head: dict[str, Any], editors: dict[str, tuple[type[Editor], Hparams]],
            sources: list[tuple[Path, str]]) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """The rows of ``sources`` (``(saved result, "--resume" or "--rows-from")``, each checked to
    be this same run), the first source holding a row giving it; with their per-case scores."""
    pre: dict[str, Any] | None = None
    rows: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    for path, flag in sources:
        saved = _resumable(path, head, flag)
        if saved is None:
            raise ValueError(f"{flag} {path}: no such file")
        got_pre, got_rows, got_cases = _reuse(saved, path, editors, flag)
        if pre is None and got_pre is not None:
            pre, cases["pre"] = got_pre, got_cases["pre"]
        for name, row in got_rows.items():
            if name not in rows:
                rows[name], cases[name] = row, got_cases[name]
    return pre, rows, cases


def mquake_path(out: Path) -> Path:
    """Where ``--mquake`` keeps its own resumable result beside the main one."""
    return out.with_name(out.name.removesuffix(".json") + ".mquake.json")


def cases_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".json") + ".cases.json")


def run(lm: LoadedModel, ds: Dataset, editors: dict[str, tuple[type[Editor], Hparams]], protocol: Any,
        opts: EvalOptions, out: Path, resume: bool = False, report: Report | None = None,
        prepare: Callable[[Editor], None] | None = None,
        started: Callable[[str], None] | None = None, general: General | None = None,
        rows_from: list[Path] | None = None) -> dict[str, Any]:
    """Evaluate the unedited model and every editor under ``protocol``; returns the result.

    ``general``: lm-eval tasks run on the unedited model and on each editor's model after all its
    edits (sequential protocol), saved as ``"general"`` in each row. ``rows_from``: result files of
    this same run whose rows are taken instead of computed (after those of ``out`` with ``resume``)."""
    opts.validate()
    if general is not None and not protocol.sequential:
        raise ValueError("--general needs the sequential protocol (the model holding all edits)")
    records = select_records(ds, protocol)
    refs = ReferenceTexts.load() if ds.kind == "counterfact" and opts.generation_every else None
    head = header(lm, ds, records, protocol, opts, refs)
    if general is not None:
        head["evaluation"] = head["evaluation"] | {"general": general.describe()}

    def unedited() -> dict[str, Any]:
        pre = evaluate_unedited(lm, ds, records, protocol, opts, refs, report)
        if general is not None:
            pre["general"] = general.run(lm)
        return pre

    def edited(cls: type[Editor], hp: Hparams, pre_cases: list[dict[str, Any]]) -> dict[str, Any]:
        after = (lambda: general.run(lm)) if general is not None else None
        ck = checkpoint(out, head, cls.name, hp)
        if not resume:
            ck.clear()
        return run_editor(lm, cls, hp, ds, records, protocol, opts, refs, report, prepare, after, ck, pre_cases)

    def saved(name: str) -> None:
        checkpoint(out, head, name, editors[name][1]).clear()

    return _drive(out, head, editors, resume, unedited, edited, started, rows_from or [], saved)


def checkpoint(out: Path, head: dict[str, Any], name: str, hp: Hparams) -> Checkpoint:
    """Where editor ``name``'s row of the run ``head`` saved to ``out`` keeps its partial state:
    ``OUT.partial/NAME/`` (removed once the row is saved)."""
    run_id = hashlib.sha256(dumps([head, name, hp.to_dict()]).encode()).hexdigest()[:16]
    return Checkpoint(out.with_name(out.name.removesuffix(".json") + ".partial") / name, run_id)


def _drive(out: Path, head: dict[str, Any], editors: dict[str, tuple[type[Editor], Hparams]], resume: bool,
           unedited: Callable[[], dict[str, Any]],
           edited: Callable[[type[Editor], Hparams, list[dict[str, Any]]], dict[str, Any]],
           started: Callable[[str], None] | None, rows_from: list[Path] | None = None,
           saved: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The unedited row, then each editor's row (each a dict with its per-case ``"cases"``), saved
    after every row (then ``saved(name)`` is called); rows of an identical saved run are reused
    with ``resume``, and taken from the files ``rows_from``. ``edited`` gets the unedited row's
    per-case scores too."""
    result: dict[str, Any] = head | {"pre": None, "editors": {}}
    cases: dict[str, Any] = {}
    sources = [(out, "--resume")] if resume and out.is_file() else []
    # OUT named by --rows-from too is read once (before anything is saved over it)
    sources += [(p, "--rows-from") for p in rows_from or [] if not (sources and p.resolve() == out.resolve())]
    if sources:
        result["pre"], result["editors"], cases = _gather(head, editors, sources)
    for name in result["editors"]:  # a row already held needs no partial state
        if saved and name in editors:
            saved(name)
    if result["pre"] is None:
        if started:
            started("unedited model")
        pre = unedited()
        cases["pre"] = pre.pop("cases")
        result["pre"] = pre
        _save(out, result, cases)
    for name, (cls, hp) in editors.items():
        if name in result["editors"]:
            continue
        if started:
            started(name)
        row = edited(cls, hp, cases["pre"])
        cases[name] = row.pop("cases")
        result["editors"][name] = row
        _save(out, result, cases)
        if saved:
            saved(name)
    result["editors"] = {k: result["editors"][k] for k in editors}
    _save(out, result, cases)
    return result


def _save(out: Path, result: dict[str, Any], cases: dict[str, Any]) -> None:
    write_json(cases_path(out), cases)
    write_json(out, result)


def run_mquake(lm: LoadedModel, name: str, editors: dict[str, tuple[type[Editor], Hparams]], n: int, group: int,
               out: Path, sample_seed: int | None = None, resume: bool = False, report: Report | None = None,
               started: Callable[[str], None] | None = None, rows_from: list[Path] | None = None) -> dict[str, Any]:
    """MQuAKE: the unedited model on the original chains, then each editor on groups of ``group``
    instances (edited into the unedited model, scored, restored); same result layout as :func:`run`."""
    import random

    from evals import mquake
    from evals.protocol import FORMAT, versions
    from neuraldb.models import model_summary

    rel, sha, instances = mquake.load(name)
    if n > len(instances):
        raise ValueError(f"asked for {n} instances but {name} has {len(instances)}")
    if group < 1:
        raise ValueError("--batch-size (instances per group) must be at least 1")
    chosen = (instances[:n] if sample_seed is None else
              [instances[i] for i in sorted(random.Random(sample_seed).sample(range(len(instances)), n))])
    mquake.check_groups(chosen, group)
    prompts, opts = mquake.Prompts.load(), mquake.MquakeOptions()
    ids = hashlib.sha256("\n".join(i.case_id for i in chosen).encode()).hexdigest()
    head = {"format": FORMAT, "model": model_summary(lm) | {"device": str(lm.device), "dtype": str(lm.model.dtype)},
            "dataset": {"name": name, "kind": "mquake", "files": [{"path": rel, "sha256": sha}],
                        "records_available": len(instances), "skipped": [], "selected": n, "records_sha256": ids},
            "protocol": {"dataset": name, "n": [n], "batch_size": group, "sequential": False,
                         "sample_seed": sample_seed, "evaluation": "groups of k instances, each edited into the "
                         "unedited model, scored with greedy decoding, restored"},
            "evaluation": asdict(opts) | {"prompts": sorted(mquake.PROMPTS.values())}, "versions": versions()}
    def unedited() -> dict[str, Any]:
        t = time.perf_counter()
        got = mquake.score(lm, chosen, prompts, edited=False, opts=opts)
        return {"points": {str(n): mquake.metrics(got)}, "eval_seconds": time.perf_counter() - t, "cases": got}

    def edited(cls: type[Editor], hp: Hparams, _pre: list[dict[str, Any]]) -> dict[str, Any]:
        row = mquake.run_editor(lm, cls, hp, chosen, group, prompts, opts, report)
        row["points"] = {str(n): row.pop("metrics")}
        return row

    return _drive(out, head, editors, resume, unedited, edited, started, rows_from)
