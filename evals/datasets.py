"""Editing benchmarks as typed records: CounterFact (ROME schema, MEND format), ZsRE, KnowEdit.

Each data set is one declarative :class:`DatasetSpec`: which files under ``$NEURALDB_DATA`` hold
it (alternatives in order of preference, e.g. the canonical full CounterFact before the 1,031-case
subset shipped in the shared folder), which record parser reads them and which metric family
scores them. Every record becomes one :class:`EvalRecord`: the edit request plus the prompts the
source has — paraphrases, neighbourhood prompts, generation prompts. A source without a prompt
family leaves it empty and the metric is reported as unavailable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evals.knowedit import Probe, probes
from neuraldb.data import DataNotFoundError, data_dir
from neuraldb.facts import EditRequest, FactFileError, parse_record
from neuraldb.files import sha256_file

Kind = Literal["counterfact", "zsre"]


@dataclass(frozen=True)
class EvalRecord:
    """One benchmark case.

    ``request``: the edit (prompt template, subject, target_new, target_true), with
    ``request.paraphrases`` (generalisation prompts) and ``request.locality`` ((prompt, answer)
    pairs that must not change: CounterFact neighbourhood prompts with the true object, ZsRE's NQ
    question with its gold answer). ``generation_prompts`` feed fluency and consistency;
    ``relation_id`` / ``target_new_id`` key the consistency reference texts; ``probes``: KnowEdit's
    portability and locality prompts by kind (:mod:`evals.knowedit`), scored when present.
    """

    request: EditRequest
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    probes: tuple[Probe, ...] = ()


Parser = Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def _rome(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """ROME / CounterFact schema (``requested_rewrite`` + prompt families)."""
    rw = rec["requested_rewrite"]
    extra = {"generation_prompts": tuple(rec.get("generation_prompts", ())), "relation_id": rw.get("relation_id"),
             "target_new_id": (rw.get("target_new") or {}).get("id")}
    return rec, extra


def _plain(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """MEND-format CounterFact (one rephrase, one locality prompt) — plain facts."""
    return rec, {}


def _knowedit(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """KnowEdit (EasyEdit format): a plain fact whose ``locality`` prompts (all kinds together) are the
    CounterFact-style neighbourhood, plus its probes by kind and the edit prompt as the generation
    prompt of KnowEdit's fluency."""
    prompt = rec.get("prompt")
    return rec, {"probes": probes(rec), "generation_prompts": (prompt,) if isinstance(prompt, str) else ()}


def _zsre(target: str) -> Parser:
    """ZsRE in the MEND ``zsre_mem_eval`` layout. ``target="answer"``: the edit target is
    ``answers[0]`` (MEMIT / AlphaEdit, whose published ZsRE numbers use it); ``"alt"``: EasyEdit's."""

    def parse(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        new = (rec.get("answers") or [None])[0] if target == "answer" else rec.get("alt")
        loc = [(rec["loc"] + "?", rec["loc_ans"])] if rec.get("loc") and rec.get("loc_ans") else []
        return {"id": rec.get("case_id"), "prompt": rec.get("src"), "subject": rec.get("subject"), "target_new": new,
                "target_true": None, "paraphrases": [rec["rephrase"]] if rec.get("rephrase") else [],
                "locality": loc}, {}

    return parse


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: ``sources`` are alternatives (each a tuple of files read in order and
    concatenated); the first whose files all exist is used."""

    name: str
    kind: Kind
    sources: tuple[tuple[str, ...], ...]
    parser: Parser
    description: str


_CF = "counterfact/"
_MEND = _CF + "easyedit_mend/counterfact-"
SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("counterfact", "counterfact",
                ((_CF + "counterfact.json",), (_CF + "rome_schema/counterfact_portability_gpt4.json",)), _rome,
                "CounterFact, ROME schema: 2 paraphrases, 10 neighbourhood and 10 generation prompts per case "
                "(the canonical 21,919-case file when fetched, else the 1,031-case subset)"),
    DatasetSpec("mcf", "counterfact", ((_CF + "multi_counterfact.json",),), _rome,
                "MultiCounterFact (MEMIT / AlphaEdit), ROME schema; `neuraldb data fetch mcf`"),
    DatasetSpec("counterfact-mend", "counterfact", ((_MEND + "edit.json", _MEND + "train.json", _MEND + "val.json"),),
                _plain, "CounterFact, MEND / EasyEdit format, all 21,919 cases: 1 rephrase, 1 locality prompt, "
                "no generation prompts"),
    DatasetSpec("counterfact-mend-edit", "counterfact", ((_MEND + "edit.json",),), _plain,
                "CounterFact, MEND format, the 10,000-case edit split"),
    DatasetSpec("counterfact-train", "counterfact", ((_MEND + "train.json",),), _plain,
                "CounterFact, MEND format, the 10,000 training cases (for tuning, not reporting)"),
    DatasetSpec("zsre", "zsre", (("zsre/zsre_mem_eval.json",), ("zsre/zsre_mend_eval.json",),
                                 ("zsre/zsre_mend_eval_portability_gpt4.json",)), _zsre("answer"),
                "ZsRE, MEND eval layout, target answers[0] as in MEMIT / AlphaEdit (the full eval file when "
                "fetched, else the 1,037-record subset)"),
    DatasetSpec("zsre-alt", "zsre", (("zsre/zsre_mem_eval.json",), ("zsre/zsre_mend_eval.json",),
                                     ("zsre/zsre_mend_eval_portability_gpt4.json",)), _zsre("alt"),
                "ZsRE with EasyEdit's target (`alt`)"),
    DatasetSpec("zsre-train", "zsre", (("zsre/zsre_mend_train-1k.json",),), _zsre("answer"),
                "ZsRE, 1,000 training records (for tuning, not reporting)"),
    DatasetSpec("knowedit-zsre", "zsre", (("knowedit/ZsRE/ZsRE-test-all.json",),), _knowedit,
                "KnowEdit ZsRE test (locality: relation-specificity prompts with gold answers; KnowEdit's "
                "portability and locality by kind)"),
    DatasetSpec("knowedit-cf", "counterfact", (("knowedit/wiki_counterfact/test_cf.json",),), _knowedit,
                "KnowEdit WikiData_Counterfact test (not ROME CounterFact; KnowEdit's portability and locality "
                "by kind)"),
    DatasetSpec("knowedit-cf-train", "counterfact", (("knowedit/wiki_counterfact/train_cf.json",),), _knowedit,
                "KnowEdit WikiData_Counterfact training records (for tuning, not reporting; no rephrase prompts)"),
)}


@dataclass(frozen=True)
class Dataset:
    """Records of one benchmark and where they came from.

    ``files``: (path relative to the data folder, sha256) of each file read; ``skipped``: records
    the source holds that cannot be edits (e.g. empty target), with the reason.
    """

    spec: DatasetSpec
    files: tuple[tuple[str, str], ...]
    records: tuple[EvalRecord, ...]
    skipped: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "files": [{"path": p, "sha256": s} for p, s in self.files],
                "records_available": len(self.records), "skipped": list(self.skipped)}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(SPECS)}") from None


def _source(spec: DatasetSpec, root: Path) -> tuple[str, ...]:
    for files in spec.sources:
        if all((root / f).is_file() for f in files):
            return files
    wanted = " or ".join("+".join(files) for files in spec.sources)
    raise DataNotFoundError(f"dataset {spec.name}: {wanted} not found under {root} (set NEURALDB_DATA)")


def load(name: str, root: Path | None = None) -> Dataset:
    """Every usable record of data set ``name``, in file order.

    Raises:
        ValueError: unknown name. DataNotFoundError: no source file present.
        FactFileError: a file that is not JSON, or two records with the same id.
    """
    spec = get_spec(name)
    root = root or data_dir()
    files = _source(spec, root)
    records: list[EvalRecord] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for rel in files:
        path = root / rel
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FactFileError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        if not isinstance(raw, list):
            raise FactFileError(f"{path}: expected a JSON list of records")
        for n, rec in enumerate(raw, 1):
            try:
                fields, extra = spec.parser(rec)
                if fields.get("id", fields.get("case_id")) is None:
                    fields = fields | {"id": f"{Path(rel).stem}:{n}"}
                request = parse_record(fields)
            except (FactFileError, KeyError, TypeError, IndexError) as e:
                skipped.append(f"{rel}:record {n}: {e}")
                continue
            if request.id in seen:
                raise FactFileError(f"{path}:record {n}: id: duplicate id {request.id!r}")
            seen.add(request.id)
            records.append(EvalRecord(request, **extra))
    return Dataset(spec, tuple((f, sha256_file(root / f)) for f in files), tuple(records), tuple(skipped))


def select(records: tuple[EvalRecord, ...], n: int, sample_seed: int | None = None) -> list[EvalRecord]:
    """The first ``n`` records, or a seeded random sample of ``n`` (in file order) when
    ``sample_seed`` is given. Raises ``ValueError`` when fewer than ``n`` exist."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if n > len(records):
        raise ValueError(f"asked for {n} records but the dataset has {len(records)}")
    if sample_seed is None:
        return list(records[:n])
    chosen = sorted(random.Random(sample_seed).sample(range(len(records)), n))
    return [records[i] for i in chosen]
