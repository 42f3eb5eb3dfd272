"""KnowEdit's metrics (Zhang et al. 2024, arXiv 2401.01286) as EasyEdit computes them.

A KnowEdit record carries, beside its edit, *probes*: portability prompts (``Subject_Aliasing``,
``Reasoning``, ``Logical_Generalization``) with ground truths that should follow from the edit,
and locality prompts (``Relation_Specificity``: other relations of the same subject;
``Forgetfulness``: other objects of a one-to-many relation) whose answers must not change.

* **Edit Succ.** — teacher-forced token accuracy of ``target_new`` after the edit prompt: the
  share of its tokens that are the argmax given the prompt and the target's earlier tokens.
* **Portability** (per kind) — the same token accuracy against the probe's ground truth; a
  record's score for a kind is the mean over its prompts of that kind.
* **Locality** (per kind) — teacher-forced on the probe's first listed answer, the share of answer
  positions whose argmax token after editing equals the argmax token before editing. It measures
  unchanged behaviour, not correctness (EasyEdit: ``np.mean(np.equal(post, pre))``).
* A kind's figure is the mean over the records that have it; **Portability** and **Locality**
  (overall) are, per record, the mean over the kinds it has, then the mean over records (EasyEdit's
  ``eval`` summary). ×100; ``None`` (reported ``n/a``) where no record has the family.
* **Fluency** — ROME's weighted 2-/3-gram entropy of a sample continuing the edit prompt (top-k 5,
  100 tokens including the prompt), which the record's ``generation_prompts`` give
  (:mod:`evals.evaluate`).

Where we differ from EasyEdit, on purpose:

* Prompt and answer are tokenised separately and concatenated (MEMIT / ROME's convention, used by
  every metric here); EasyEdit tokenises ``prompt + " " + answer`` as one string. The two differ
  only where the tokenizer would merge the prompt's end with the answer's start.
* A portability probe with aliases scores its best alias; EasyEdit scores only the first alias of
  the first group (``while isinstance(a, list): a = a[0]``).
* Every probe of a record is scored; older EasyEdit run scripts kept only the first of each kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuraldb.facts import target_text
from neuraldb.scoring import CandidateScore

PORTABILITY = ("Subject_Aliasing", "Reasoning", "Logical_Generalization")
LOCALITY = ("Relation_Specificity", "Forgetfulness")
KINDS = PORTABILITY + LOCALITY


@dataclass(frozen=True)
class Probe:
    """One KnowEdit probe: ``kind`` (one of :data:`KINDS`), the prompt, and its accepted answers
    (aliases, each with a leading space; locality reads the first)."""

    kind: str
    prompt: str
    answers: tuple[str, ...]

    @property
    def family(self) -> str:
        return "portability" if self.kind in PORTABILITY else "locality"


def _strings(value: Any) -> list[str]:
    """Every string in a (nested) ground-truth list, in order: ``[["Syria", "SY"]]`` → both."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def probes(rec: dict[str, Any]) -> tuple[Probe, ...]:
    """The probes of a raw KnowEdit record (``portability`` / ``locality`` dicts of kind → items);
    items without a prompt or a non-empty answer are left out."""
    out = []
    for family in ("portability", "locality"):
        groups = rec.get(family)
        if not isinstance(groups, dict):
            continue
        for kind in KINDS:
            for item in groups.get(kind) or []:
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    continue
                answers = tuple(dict.fromkeys(a for a in map(target_text, _strings(item.get("ground_truth"))) if a))
                if answers and item["prompt"].strip():
                    out.append(Probe(kind, item["prompt"].rstrip(), answers))
    return tuple(out)


def pairs(items: Sequence[Probe]) -> list[tuple[str, str]]:
    """(prompt, candidate) pairs to score, in order: every alias of a portability probe, the first
    answer of a locality probe."""
    return [(p.prompt, a) for p in items for a in (p.answers if p.family == "portability" else p.answers[:1])]


def case_fields(edit: CandidateScore, items: Sequence[Probe], scores: Sequence[CandidateScore]) -> dict[str, Any]:
    """Raw per-case KnowEdit scores as JSON: ``edit_acc`` (token accuracy of the edit), per
    portability probe ``[kind, best token accuracy]``, per locality probe ``[kind, argmax ids]``."""
    port, loc, pos = [], [], 0
    for p in items:
        n = len(p.answers) if p.family == "portability" else 1
        got = scores[pos : pos + n]
        pos += n
        if p.family == "portability":
            port.append([p.kind, max(_accuracy(s) for s in got)])
        else:
            loc.append([p.kind, list(got[0].argmax)])
    return {"edit_acc": _accuracy(edit), "portability": port, "locality_tokens": loc}


def _accuracy(s: CandidateScore) -> float:
    return sum(s.correct) / len(s.correct)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    if len(post) != len(pre):
        raise ValueError("locality: the pre-edit and post-edit answers have different lengths")
    return sum(int(a == b) for a, b in zip(post, pre)) / len(pre)


def record_scores(case: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Per kind, the record's mean score (portability: accuracy; locality: agreement of ``case``'s
    argmax tokens with ``reference``'s, the same record on the unedited model)."""
    by_kind: dict[str, list[float]] = {}
    for kind, acc in case["portability"]:
        by_kind.setdefault(kind, []).append(acc)
    ref = reference["locality_tokens"]
    if len(ref) != len(case["locality_tokens"]):
        raise ValueError(f"case {case.get('id')}: the pre-edit reference has other locality probes")
    for (kind, post), (ref_kind, pre) in zip(case["locality_tokens"], ref):
        if kind != ref_kind:
            raise ValueError(f"case {case.get('id')}: the pre-edit reference has other locality probes")
        by_kind.setdefault(kind, []).append(_agreement(post, pre))
    return {k: sum(v) / len(v) for k, v in by_kind.items()}


def metric_name(kind: str) -> str:
    """``Subject_Aliasing`` → ``portability_subject_aliasing``; ``Forgetfulness`` → ``locality_forgetfulness``."""
    family = "portability" if kind in PORTABILITY else "locality"
    return f"{family}_{kind.lower()}"


def metrics(cases: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """KnowEdit's figures (×100) of per-case scores against ``reference`` (the unedited model's
    cases, matched by id; for the unedited model itself every locality is 100)."""
    ref = {c["id"]: c for c in reference}
    missing = [c["id"] for c in cases if c["id"] not in ref]
    if missing:
        raise ValueError(f"locality needs the unedited model's scores of case {missing[0]}")
    per_record = [record_scores(c, ref[c["id"]]) for c in cases]
    out: dict[str, float | None] = {"edit_succ": _pct(_mean([c["edit_acc"] for c in cases]))}
    for family, kinds in (("portability", PORTABILITY), ("locality", LOCALITY)):
        for kind in kinds:
            out[metric_name(kind)] = _pct(_mean([r[kind] for r in per_record if kind in r]))
        out[family] = _pct(_mean([_mean([r[k] for k in kinds if k in r]) or 0.0
                                  for r in per_record if any(k in r for k in kinds)]))
    return out


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x
