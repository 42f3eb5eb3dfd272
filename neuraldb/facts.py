"""Fact files → :class:`EditRequest` records.

Accepted files: JSONL (one object per line), JSON (a list of objects, or ``{"facts": [...]}``)
and CSV (header row). Accepted record shapes, detected per record:

* plain: ``prompt`` (with ``{}`` or the subject literally), ``subject``, ``target_new``,
  optional ``target_true`` (alias ``ground_truth``), optional ``id``;
* CounterFact / ROME: ``requested_rewrite`` {prompt, subject, target_new{str}, target_true{str}},
  ``case_id``, ``paraphrase_prompts``, ``neighborhood_prompts``;
* MEND-format CounterFact: plain fields plus ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth``, ``case_id``;
* MEND-format ZsRE: ``src`` (question), ``subject``, ``alt`` (new answer), ``answers``,
  ``rephrase``, ``loc`` / ``loc_ans``;
* KnowEdit (EasyEdit): plain fields with ``locality`` as ``{kind: [{prompt, ground_truth}]}``.

Every error names the file, the line (or record number) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class FactFileError(ValueError):
    """A fact file or record is malformed; the message is one line naming where and what."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``template.replace("{}", subject)`` should continue with ``target_new``.

    Targets carry a leading space (BPE convention). ``paraphrases`` are full prompts that ask the
    same fact; ``locality`` are (prompt, answer) pairs about other subjects that must not change.
    """

    id: str
    template: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = field(default=())

    @property
    def prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return fill(self.template, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "prompt": self.template, "subject": self.subject,
            "target_new": self.target_new, "target_true": self.target_true,
            "paraphrases": list(self.paraphrases), "locality": [list(p) for p in self.locality],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        return cls(
            id=d["id"], template=d["prompt"], subject=d["subject"], target_new=d["target_new"],
            target_true=d.get("target_true"), paraphrases=tuple(d.get("paraphrases", ())),
            locality=tuple(tuple(p) for p in d.get("locality", ())),
        )


def fill(template: str, subject: str) -> str:
    """Put ``subject`` where ``{}`` stands (no ``str.format``: prompts may hold other braces)."""
    return template.replace("{}", subject, 1)


def _text(value: Any) -> str | None:
    """A target given as a string, ``{"str": ...}`` or a list (its first element, recursively)."""
    if isinstance(value, dict):
        value = value.get("str")
    while isinstance(value, list):  # KnowEdit nests aliases: [["USA", "U.S."], ...]
        value = value[0] if value else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def target_text(value: Any) -> str | None:
    """A target as stored: its first string (see :func:`_text`), right-stripped, with one leading
    space (BPE convention); ``""`` for a blank one, None for none."""
    text = _text(value)
    if text is None:
        return None
    text = text.rstrip()
    if not text.strip():
        return ""
    return text if text.startswith(" ") else " " + text


def _record_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """Normalise one record of any accepted shape to plain fields (still unvalidated)."""
    if "requested_rewrite" in rec:  # CounterFact / ROME schema
        rw = rec["requested_rewrite"]
        if isinstance(rw, list):
            rw = rw[0]
        true = target_text(rw.get("target_true"))
        return {
            "id": rec.get("id", rec.get("case_id")), "prompt": rw.get("prompt"), "subject": rw.get("subject"),
            "target_new": rw.get("target_new"), "target_true": rw.get("target_true"),
            "paraphrases": rec.get("paraphrase_prompts", []),
            "locality": [(p, true) for p in rec.get("neighborhood_prompts", [])] if true else [],
        }
    if "src" in rec and "alt" in rec:  # ZsRE, MEND format
        loc = rec.get("loc")
        return {
            "id": rec.get("id", rec.get("case_id")), "prompt": rec.get("src"), "subject": rec.get("subject"),
            "target_new": rec.get("alt"), "target_true": rec.get("answers"),
            "paraphrases": [rec["rephrase"]] if rec.get("rephrase") else [],
            "locality": [(loc + "?", rec.get("loc_ans"))] if loc and rec.get("loc_ans") else [],
        }
    out = {
        "id": rec.get("id", rec.get("case_id")), "prompt": rec.get("prompt"), "subject": rec.get("subject"),
        "target_new": rec.get("target_new"), "target_true": rec.get("target_true", rec.get("ground_truth")),
        "paraphrases": rec.get("paraphrases", [p] if (p := rec.get("rephrase_prompt") or rec.get("rephrase")) else []),
        "locality": rec.get("locality", []),
    }
    if isinstance(out["locality"], dict):  # KnowEdit
        out["locality"] = [(item.get("prompt"), item.get("ground_truth")) for items in out["locality"].values()
                           for item in (items if isinstance(items, list) else []) if isinstance(item, dict)]
    if rec.get("locality_prompt") and rec.get("locality_ground_truth"):
        out["locality"] = [(rec["locality_prompt"], rec["locality_ground_truth"])]
    return out


def _auto_id(prompt: str, subject: str, target: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{subject}\x00{target}".encode()).hexdigest()[:10]


def parse_record(rec: Any) -> EditRequest:
    """Validate one record; raises ``FactFileError`` whose message starts with the field name."""
    if not isinstance(rec, dict):
        raise FactFileError("record: expected a JSON object")
    f = _record_fields(rec)
    for name in ("prompt", "subject"):
        if not isinstance(f[name], str) or not f[name].strip():
            raise FactFileError(f"{name}: missing or empty")
    prompt, subject = f["prompt"], f["subject"].strip()
    try:
        target_new = target_text(f["target_new"])
        target_true = target_text(f["target_true"])
    except TypeError as e:
        raise FactFileError(f"target: {e}") from None
    if not target_new:
        raise FactFileError("target_new: missing or empty")
    if "{}" not in prompt:
        if subject not in prompt:
            raise FactFileError(f"subject: {subject!r} does not occur in prompt {prompt!r}")
        prompt = prompt.replace(subject, "{}", 1)
    template = prompt.rstrip()
    locality = []
    for pair in f["locality"] or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise FactFileError("locality: expected (prompt, answer) pairs")
        p, a = pair
        try:
            a = target_text(a)
        except TypeError as e:
            raise FactFileError(f"locality: answer {e}") from None
        if isinstance(p, str) and a:
            locality.append((p, a))
    rid = f["id"]
    rid = str(rid) if rid is not None and str(rid) != "" else _auto_id(template, subject, target_new)
    return EditRequest(
        id=rid, template=template, subject=subject, target_new=target_new,
        target_true=target_true or None,
        paraphrases=tuple(p for p in f["paraphrases"] or [] if isinstance(p, str)),
        locality=tuple(locality),
    )


def _raw_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, raw record) pairs; location is ``line N`` or ``record N``."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise FactFileError(f"{path}: empty CSV file")
        for row in reader:
            yield f"line {reader.line_num}", {k: v for k, v in row.items() if v not in (None, "")}
        return
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise FactFileError(f"{path}:{n}: bad JSON: {e.msg}") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FactFileError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("facts"), list):
        data = data["facts"]
    if not isinstance(data, list):
        raise FactFileError(f"{path}: expected a JSON list of facts")
    for n, rec in enumerate(data, 1):
        yield f"record {n}", rec


def load_facts(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read and validate every fact in ``path`` (the first ``limit`` when given)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise FactFileError(f"limit must be at least 1 (the number of facts to read), got {limit}")
    if not path.is_file():
        raise FactFileError(f"{path}: no such file")
    out: list[EditRequest] = []
    seen: dict[str, str] = {}
    for where, rec in _raw_records(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            req = parse_record(rec)
        except FactFileError as e:
            raise FactFileError(f"{path}:{where}: {e}") from None
        if req.id in seen:
            raise FactFileError(f"{path}:{where}: id: duplicate id {req.id!r} (first at {seen[req.id]})")
        seen[req.id] = where
        out.append(req)
    if not out:
        raise FactFileError(f"{path}: no facts found")
    return out
