"""MQuAKE (Zhong et al. 2023): do edited facts propagate to multi-hop questions?

Each instance has 1–4 requested rewrites (each edited as its own fact), a chain of single hops
before and after the edit, and three paraphrases of one multi-hop question. Instances are edited
in groups of k from the unedited model (each group restored afterwards), and four accuracies are
measured with greedy decoding and the official prompt files (``mquake/prompts/``):

* **edit-wise**: the edited fact's cloze statement, zero-shot, continues with the new object;
* **instance-wise**: every hop of the (new) chain is recalled — edited hops by their cloze
  statement, the others as questions after the 8-shot relation prompt (``rel-prompts.json``);
* **multi-hop**: at least one of the three questions, after the few-shot prompt
  (``multihop-prompts.txt``), is answered with the answer or an alias;
* **multi-hop CoT**: the same with the chain-of-thought prompt (``multihop-cot-prompts.txt``).

The unedited model is scored on the original chains and answers. ``mquake`` is the canonical
CF-3k-v2 when fetched (``neuraldb data fetch mquake``), else — with a notice — ``mquake-akew`` (354
cases of CF-3k v1 carried by AKEW, in the shared data), as ``counterfact`` and ``zsre`` fall back to
their shared subsets; ``mquake-hard`` also comes from v1. v1 instances can contradict each other's
edits: a group holding such a pair is refused (:func:`conflicts`). An answer matches when, after
stripping spaces and a final period and ignoring case, it equals the answer or an alias (cloze
continuations: starts with it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.generate import greedy_continuations
from neuraldb.data import DataNotFoundError, data_dir
from neuraldb.facts import EditRequest, parse_record
from neuraldb.files import sha256_file
from neuraldb.models import LoadedModel

SOURCES: dict[str, tuple[str, ...]] = {
    "mquake": ("mquake/MQuAKE-CF-3k-v2.json", "mquake/AKEW_MQuAKE-CF.json"),
    "mquake-akew": ("mquake/AKEW_MQuAKE-CF.json",),
    "mquake-hard": ("mquake/MQuAKE-hard.json",),
    "mquake-t": ("mquake/MQuAKE-T.json",),
}
PROMPTS = {"multihop": "mquake/prompts/multihop-prompts.txt", "cot": "mquake/prompts/multihop-cot-prompts.txt",
           "relations": "mquake/prompts/rel-prompts.json"}


@dataclass(frozen=True)
class Hop:
    """One single-hop fact of a chain: its question, cloze statement, answers and relation."""

    question: str
    cloze: str
    answers: tuple[str, ...]
    relation: str
    edited: bool


@dataclass(frozen=True)
class Instance:
    """One MQuAKE case; ``edit_triples`` / ``new_triples``: Wikidata (subject, relation, object)
    ids of its edits and of its new chain."""

    case_id: str
    edits: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    new_answers: tuple[str, ...]
    hops: tuple[Hop, ...]
    new_hops: tuple[Hop, ...]
    edit_triples: tuple[tuple[str, str, str], ...] = ()
    new_triples: tuple[tuple[str, str, str], ...] = ()


def _edit(rw: dict[str, Any]) -> EditRequest:
    """A requested rewrite as a fact whose id is its content (duplicates across instances merge)."""
    key = f"{rw['prompt']}\x00{rw['subject']}\x00{rw['target_new']['str']}"
    return parse_record({"requested_rewrite": rw, "case_id": "mq-" + hashlib.sha256(key.encode()).hexdigest()[:12]})


def _hops(raw: list[dict[str, Any]], triples: list[list[str]], edited: set[tuple[str, ...]]) -> tuple[Hop, ...]:
    return tuple(Hop(h["question"], h["cloze"], (h["answer"], *h.get("answer_alias", [])), t[1], tuple(t) in edited)
                 for h, t in zip(raw, triples))


def parse(rec: dict[str, Any]) -> Instance:
    orig = rec["orig"]
    edited = {tuple(t) for t in orig.get("edit_triples", [])}
    return Instance(
        case_id=str(rec["case_id"]), edits=tuple(_edit(rw) for rw in rec["requested_rewrite"]),
        questions=tuple(rec["questions"]), answers=(rec["answer"], *rec.get("answer_alias", [])),
        new_answers=(rec["new_answer"], *rec.get("new_answer_alias", [])),
        hops=_hops(rec["single_hops"], orig["triples"], set()),
        new_hops=_hops(rec["new_single_hops"], orig["new_triples"], edited),
        edit_triples=tuple(tuple(t) for t in orig.get("edit_triples", [])),  # type: ignore[misc]
        new_triples=tuple(tuple(t) for t in orig["new_triples"]))  # type: ignore[misc]


def load(name: str, root: Path | None = None) -> tuple[str, str, list[Instance]]:
    """(file, sha256, instances) of ``mquake`` (CF-3k-v2 when fetched, else the AKEW v1 subset: see
    :func:`stand_in`), ``mquake-akew``, ``mquake-hard`` or ``mquake-t``."""
    if name not in SOURCES:
        raise ValueError(f"unknown MQuAKE set {name!r}; available: {', '.join(SOURCES)}")
    root = root or data_dir()
    rel = next((f for f in SOURCES[name] if (root / f).is_file()), None)
    if rel is None:
        raise DataNotFoundError(f"{' or '.join(SOURCES[name])} not found under {root} (set NEURALDB_DATA)")
    raw = json.loads((root / rel).read_text(encoding="utf-8"))
    return rel, sha256_file(root / rel), [parse(r) for r in raw]


def stand_in(name: str, rel: str) -> str | None:
    """A one-line notice when ``name`` was loaded from a fallback file ``rel`` instead of its canonical one."""
    canonical = SOURCES[name][0]
    if rel == canonical:
        return None
    return (f"{name}: {canonical} is not under $NEURALDB_DATA (neuraldb data fetch {name}); "
            f"using {rel}, which comes from MQuAKE v1")


@dataclass(frozen=True)
class Prompts:
    multihop: str
    cot: str
    relations: dict[str, str]

    @classmethod
    def load(cls, root: Path | None = None) -> Prompts:
        root = root or data_dir()
        missing = [p for p in PROMPTS.values() if not (root / p).is_file()]
        if missing:
            raise DataNotFoundError(f"{', '.join(missing)} not found under {root}")
        text = {k: (root / p).read_text(encoding="utf-8") for k, p in PROMPTS.items()}
        return cls(text["multihop"].rstrip("\n"), text["cot"].rstrip("\n"), json.loads(text["relations"]))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def matches(answer: str, gold: Sequence[str]) -> bool:
    """Exact match after normalisation (spaces, final period, case)."""
    return _norm(answer) in {_norm(g) for g in gold}


def starts_with(continuation: str, gold: Sequence[str]) -> bool:
    c = _norm(continuation)
    return any(c.startswith(_norm(g)) for g in gold if _norm(g))


def cot_answer(text: str) -> str:
    """The text after the first "Answer:" of a chain-of-thought continuation (up to the line end)."""
    m = re.search(r"Answer:(.*)", text)
    return m.group(1).strip() if m else ""


@dataclass(frozen=True)
class MquakeOptions:
    """Greedy decoding budgets: cloze / question answers and chain-of-thought."""

    answer_tokens: int = 16
    cot_tokens: int = 96
    batch_size: int = 16


def _hop_prompt(h: Hop, edited: bool, prompts: Prompts) -> str:
    if h.edited and edited:
        return h.cloze
    return f"{prompts.relations.get(h.relation, '')}\nQ: {h.question} A:".lstrip("\n")


def _split(flat: list[str], sizes: list[int]) -> list[list[str]]:
    out, pos = [], 0
    for n in sizes:
        out.append(flat[pos : pos + n])
        pos += n
    return out


def score(lm: LoadedModel, instances: Sequence[Instance], prompts: Prompts, edited: bool,
          opts: MquakeOptions = MquakeOptions()) -> list[dict[str, Any]]:
    """Per instance: edit-wise hits, hops recalled, multi-hop and CoT answers and whether they match.

    ``edited=False`` scores the original chains and answers (the unedited model's row). All
    instances' prompts of one kind are decoded together in batches."""

    def ask(texts: list[str], tokens: int, stop: str | None) -> list[str]:
        return greedy_continuations(lm, texts, tokens, stop, opts.batch_size) if texts else []

    chains = [inst.new_hops if edited else inst.hops for inst in instances]
    cloze = _split(ask([e.prompt for i in instances for e in i.edits], opts.answer_tokens, "\n"),
                   [len(i.edits) for i in instances])
    hops = _split(ask([_hop_prompt(h, edited, prompts) for c in chains for h in c], opts.answer_tokens, "\n"),
                  [len(c) for c in chains])
    plain = _split(ask([f"{prompts.multihop}\nQ: {q} A:" for i in instances for q in i.questions],
                       opts.answer_tokens, "\n"), [len(i.questions) for i in instances])
    cot = _split(ask([f"{prompts.cot}\n\nQuestion: {q}\nThoughts:" for i in instances for q in i.questions],
                     opts.cot_tokens, None), [len(i.questions) for i in instances])
    out = []
    for inst, chain, c_out, h_out, p_out, t_out in zip(instances, chains, cloze, hops, plain, cot):
        gold = inst.new_answers if edited else inst.answers
        cot_answers = [cot_answer(t.split("\n\nQuestion:")[0]) for t in t_out]
        out.append({"case_id": inst.case_id,
                    "edits": [starts_with(c, (e.target_new,)) for c, e in zip(c_out, inst.edits)],
                    "hops": [starts_with(o, h.answers) if (h.edited and edited) else matches(o, h.answers)
                             for o, h in zip(h_out, chain)],
                    "multihop": p_out, "cot": cot_answers,
                    "multihop_ok": any(matches(a, gold) for a in p_out),
                    "cot_ok": any(matches(a, gold) for a in cot_answers)})
    return out


def metrics(cases: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Edit-wise, instance-wise, multi-hop and multi-hop-CoT accuracy (×100)."""
    if not cases:
        return {"edit_wise": None, "instance_wise": None, "multihop": None, "multihop_cot": None}
    edits = [e for c in cases for e in c["edits"]]
    n = len(cases)
    return {"edit_wise": 100.0 * sum(edits) / len(edits) if edits else None,
            "instance_wise": 100.0 * sum(all(c["hops"]) for c in cases) / n,
            "multihop": 100.0 * sum(c["multihop_ok"] for c in cases) / n,
            "multihop_cot": 100.0 * sum(c["cot_ok"] for c in cases) / n}


def conflicts(group: Sequence[Instance]) -> list[str]:
    """Instances of ``group`` whose new chain uses an unedited fact that another instance's edit
    overwrites (same subject and relation, another object): their gold answers would be wrong."""
    edits = {(s, r): o for inst in group for s, r, o in inst.edit_triples}
    bad = []
    for inst in group:
        own = set(inst.edit_triples)
        if any((s, r) in edits and edits[(s, r)] != o for s, r, o in inst.new_triples if (s, r, o) not in own):
            bad.append(inst.case_id)
    return bad


def check_groups(instances: Sequence[Instance], group: int) -> None:
    """Raise ValueError when a group of ``group`` consecutive instances holds a conflict."""
    for s in range(0, len(instances), group):
        if bad := conflicts(instances[s : s + group]):
            raise ValueError(f"MQuAKE cases {', '.join(bad[:5])} use facts another edit of their group of {group} "
                             "overwrites (a v1 data set): use --batch-size 1 or the conflict-free CF-3k-v2")


def unique_edits(instances: Sequence[Instance]) -> list[EditRequest]:
    """The group's requested rewrites, each once, in order."""
    seen: dict[str, EditRequest] = {}
    for inst in instances:
        for e in inst.edits:
            seen.setdefault(e.id, e)
    return list(seen.values())


def run_editor(lm: LoadedModel, editor_cls: Any, hparams: Any, instances: Sequence[Instance], group: int,
               prompts: Prompts, opts: MquakeOptions = MquakeOptions(),
               report: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Edit each group of ``group`` instances into the unedited model, score the group, restore.

    Returns ``{"hparams", "metrics", "edit_seconds", "eval_seconds", "edits", "cases"}``; raises
    RuntimeError when the editor does not give the unedited model back."""
    import time

    from baselines.closed_form import ClosedFormHparams
    from neuraldb.models import fingerprint

    base = lm.fingerprint
    cases: list[dict[str, Any]] = []
    edit_s = eval_s = 0.0
    n_edits = 0
    check_groups(instances, group)
    for start in range(0, len(instances), group):
        chunk = instances[start : start + group]
        edits = unique_edits(chunk)
        # a group's edits are one closed-form batch
        hp = hparams.replace(batch_size=len(edits)) if isinstance(hparams, ClosedFormHparams) else hparams
        editor = editor_cls(lm, hp)
        t = time.perf_counter()
        editor.edit(edits)
        edit_s += time.perf_counter() - t
        n_edits += len(edits)
        t = time.perf_counter()
        try:
            cases += score(lm, chunk, prompts, edited=True, opts=opts)
        finally:
            editor.restore()
        eval_s += time.perf_counter() - t
        if report:
            report("instances", start + len(chunk), len(instances))
    if fingerprint(lm.model) != base:
        raise RuntimeError(f"{editor_cls.name} did not restore the unedited model")
    return {"hparams": hparams.to_dict(), "metrics": metrics(cases), "edit_seconds": edit_s, "eval_seconds": eval_s,
            "edits": n_edits, "cases": cases}
