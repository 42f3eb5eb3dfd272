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
import io
import json
import unicodedata
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


def _fail(name: str, message: str) -> FactFileError:
    return FactFileError(f"{name}: {message}")


def json_kind(value: Any) -> str:
    """A JSON value's kind, for messages: 'a string', 'a number', 'a list', …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _string(rec: dict[str, Any], name: str) -> str | None:
    """Field ``name`` of ``rec``: a string, or None when absent / null."""
    value = rec.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _fail(name, f"expected a string, got {json_kind(value)}")


def _strings(rec: dict[str, Any], name: str) -> list[str]:
    """Field ``name``: a list of strings ([] when absent). A bare string is refused: it is not split
    into characters."""
    value = rec.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(name, f"expected a list of strings, got {json_kind(value)}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise _fail(name, f"expected a list of strings, holds {json_kind(bad[0])}")
    return value


def _target(value: Any, name: str) -> str | None:
    """A target given as a string, ``{"str": ...}`` or a list of aliases (its first, recursively,
    as KnowEdit nests them: ``[["USA", "U.S."], ...]``); None for none."""
    if isinstance(value, dict):
        value = value.get("str")
    while isinstance(value, list):
        value = value[0] if value else None
    if value is None or isinstance(value, str):
        return value
    raise _fail(name, f"expected a string, got {json_kind(value)}")


def _visible(text: str) -> bool:
    """True when ``text`` holds a character that is not whitespace, a control or a format
    character (NUL, zero-width space, BOM, …)."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


def target_text(value: Any, name: str = "target") -> str | None:
    """A target as stored: its first string (see :func:`_target`), right-stripped, with one leading
    space (BPE convention); ``""`` for a blank one (nothing visible), None for none."""
    text = _target(value, name)
    if text is None:
        return None
    text = text.rstrip()
    if not _visible(text):
        return ""
    return text if text.startswith(" ") else " " + text


def _id(rec: dict[str, Any]) -> str | None:
    """``id`` (else ``case_id``): a string or an integer (not a boolean, a float or a list)."""
    name = "id" if rec.get("id") is not None else "case_id"
    value = rec.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail("id", f"expected a string or an integer, got {json_kind(value)}")
    return str(value)


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(name, f"expected an object, got {json_kind(value)}")
    return value


def _counterfact_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """CounterFact / ROME: ``requested_rewrite`` (an object, or a list whose first is used)."""
    rw = rec["requested_rewrite"]
    if isinstance(rw, list) and rw:
        rw = rw[0]
    rw = _object(rw, "requested_rewrite")
    true = target_text(rw.get("target_true"), "requested_rewrite.target_true")
    return {
        "id": _id(rec), "prompt": _string(rw, "prompt"), "subject": _string(rw, "subject"),
        "target_new": target_text(rw.get("target_new"), "requested_rewrite.target_new"), "target_true": true,
        "paraphrases": _strings(rec, "paraphrase_prompts"),
        "locality": [(p, true) for p in _strings(rec, "neighborhood_prompts")] if true else [],
    }


def _zsre_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """MEND-format ZsRE: ``src``, ``subject``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``."""
    loc, loc_ans = _string(rec, "loc"), target_text(rec.get("loc_ans"), "loc_ans")
    rephrase = _string(rec, "rephrase")
    return {
        "id": _id(rec), "prompt": _string(rec, "src"), "subject": _string(rec, "subject"),
        "target_new": target_text(rec.get("alt"), "alt"), "target_true": target_text(rec.get("answers"), "answers"),
        "paraphrases": [rephrase] if rephrase else [],
        "locality": [(loc + "?", loc_ans)] if loc and loc_ans else [],
    }


def _locality(value: Any) -> list[tuple[str, str]]:
    """``locality``: ``[prompt, answer]`` pairs, or KnowEdit's ``{kind: [{prompt, ground_truth}]}``;
    pairs with a blank answer are left out."""
    if value is None:
        return []
    if isinstance(value, dict):  # KnowEdit
        pairs = []
        for kind, items in value.items():
            if not isinstance(items, list):
                raise _fail(f"locality.{kind}", f"expected a list of objects, got {json_kind(items)}")
            for item in items:
                item = _object(item, f"locality.{kind}")
                prompt = item.get("prompt")
                while isinstance(prompt, list) and prompt:  # EasyEdit allows a list of prompts
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise _fail(f"locality.{kind}.prompt", f"expected a string, got {json_kind(prompt)}")
                pairs.append((prompt, item.get("ground_truth")))
        value = pairs
    if not isinstance(value, list):
        raise _fail("locality", f"expected a list of [prompt, answer] pairs, got {json_kind(value)}")
    out = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise _fail("locality", "expected [prompt, answer] pairs")
        if answer := target_text(pair[1], "locality answer"):
            out.append((pair[0], answer))
    return out


def _plain_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """Plain, MEND-format CounterFact and KnowEdit records."""
    rephrase = _string(rec, "rephrase_prompt") or _string(rec, "rephrase")
    paraphrases = _strings(rec, "paraphrases") if "paraphrases" in rec else [rephrase] if rephrase else []
    locality = _locality(rec.get("locality"))
    loc_prompt = _string(rec, "locality_prompt")
    loc_answer = target_text(rec.get("locality_ground_truth"), "locality_ground_truth")
    if loc_prompt and loc_answer:
        locality = [(loc_prompt, loc_answer)]
    truth = "target_true" if rec.get("target_true") is not None else "ground_truth"
    return {
        "id": _id(rec), "prompt": _string(rec, "prompt"), "subject": _string(rec, "subject"),
        "target_new": target_text(rec.get("target_new"), "target_new"),
        "target_true": target_text(rec.get(truth), truth), "paraphrases": paraphrases, "locality": locality,
    }


def _record_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """Validate one record of any accepted shape and normalise it to plain fields."""
    if "requested_rewrite" in rec:
        return _counterfact_fields(rec)
    if "src" in rec and "alt" in rec:
        return _zsre_fields(rec)
    return _plain_fields(rec)


def _auto_id(prompt: str, subject: str, target: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{subject}\x00{target}".encode()).hexdigest()[:10]


def _template(prompt: str, subject: str) -> str:
    """The prompt with ``{}`` where the subject stands (it holds ``{}`` once, or the subject)."""
    if prompt.count("{}") > 1:
        raise _fail("prompt", f"holds {{}} {prompt.count('{}')} times, expected once: {prompt!r}")
    if "{}" not in prompt:
        if subject not in prompt:
            raise _fail("subject", f"{subject!r} does not occur in prompt {prompt!r}")
        prompt = prompt.replace(subject, "{}", 1)
    return prompt.rstrip()


def parse_record(rec: Any) -> EditRequest:
    """Validate one record; raises ``FactFileError`` whose message starts with the field name."""
    if not isinstance(rec, dict):
        raise FactFileError(f"record: expected a JSON object, got {json_kind(rec)}")
    f = _record_fields(rec)
    for name in ("prompt", "subject", "target_new"):
        if not isinstance(f[name], str) or not _visible(f[name]):
            raise _fail(name, "missing or empty")
        if "\x00" in f[name]:
            raise _fail(name, "holds a NUL character")
    subject = f["subject"].strip()
    template = _template(f["prompt"], subject)
    target_new = f["target_new"]
    return EditRequest(
        id=f["id"] or _auto_id(template, subject, target_new), template=template, subject=subject,
        target_new=target_new, target_true=f["target_true"] or None, paraphrases=tuple(f["paraphrases"]),
        locality=tuple(f["locality"]),
    )


def _decode(path: Path) -> str:
    """The text of ``path`` (UTF-8, a leading BOM dropped)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FactFileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FactFileError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _json(text: str, where: str) -> Any:
    """``json.loads`` with every failure as one FactFileError line naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FactFileError(f"{where}: bad JSON: {e.msg}") from None
    except RecursionError:
        raise FactFileError(f"{where}: bad JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise FactFileError(f"{where}: bad JSON: {str(e).splitlines()[0]}") from None


def _csv_records(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    """CSV rows as records (newlines inside quoted fields kept; a ``paraphrases`` cell is one
    paraphrase)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise FactFileError(f"{path}: empty CSV file")
        for row in reader:
            where = f"line {reader.line_num}"
            if len(row) > len(header):
                raise FactFileError(f"{path}:{where}: {len(row)} fields, the header names {len(header)}")
            rec: dict[str, Any] = {k: v for k, v in zip(header, row) if v != ""}
            if "paraphrases" in rec:
                rec["paraphrases"] = [rec["paraphrases"]]
            if rec:
                yield where, rec
    except csv.Error as e:
        raise FactFileError(f"{path}:line {reader.line_num}: bad CSV: {e}") from None


def _raw_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, raw record) pairs; location is ``line N`` or ``record N``."""
    text = _decode(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_records(path, text)
        return
    if suffix == ".jsonl":  # lines end at \n only: U+2028 and friends are text inside a string
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield f"line {n}", _json(line, f"{path}:{n}")
        return
    data = _json(text, str(path))
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
