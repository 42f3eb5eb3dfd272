"""Score a model (edited or not) on benchmark records: per-case raw scores, then metrics.

One call scores every prompt of every record in length-grouped batches
(:func:`neuraldb.scoring.score_candidates`): CounterFact cases by length-normalised
log-probabilities of the new and the true object (§7.1), ZsRE cases by teacher-forced token
accuracy (§7.2). Generations for fluency / consistency are sampled for every
``generation_every``-th case that has generation prompts (ROME's ``generation_test_interval``).
Per-case scores are kept so that metrics for the first N cases can be computed at any N. Records
with KnowEdit probes are also scored by KnowEdit's definitions (:mod:`evals.knowedit`), whose
locality compares each case with the same case on the unedited model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from evals import knowedit
from evals.consistency import ReferenceTexts
from evals.datasets import EvalRecord, Kind
from evals.generate import sample_texts
from evals.metrics import CaseScores, ZsreCase, counterfact_metrics, fluency_by_case, pct, zsre_metrics
from neuraldb.models import LoadedModel
from neuraldb.scoring import CandidateScore, score_candidates


@dataclass(frozen=True)
class EvalOptions:
    """How records are scored. ``generation_every``: sample generations for every k-th case
    (0 = never); ``max_length`` / ``top_k`` / ``seed``: the sampler (ROME: 100, 5);
    ``keep_edited_probes``: count neighbourhood and locality prompts that are the edit prompt of a
    fact edited in the run (False: left out, :func:`edited_probes`)."""

    generation_every: int = 1
    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    batch_size: int = 64
    keep_edited_probes: bool = False

    def validate(self) -> None:
        if self.generation_every < 0 or self.max_length < 2 or self.top_k < 1 or self.batch_size < 1:
            raise ValueError(f"invalid evaluation options: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_pairs(kind: Kind, rec: EvalRecord) -> list[tuple[str, str]]:
    """The (prompt, candidate) pairs a case needs, in a fixed order: the benchmark's own, then
    those of its KnowEdit probes (:func:`evals.knowedit.pairs`)."""
    return _own_pairs(kind, rec) + knowedit.pairs(rec.probes)


def _own_pairs(kind: Kind, rec: EvalRecord) -> list[tuple[str, str]]:
    r = rec.request
    if kind == "zsre":
        return [(r.prompt, r.target_new), *((p, r.target_new) for p in r.paraphrases), *r.locality]
    true = r.target_true or ""
    pairs = [(r.prompt, r.target_new), (r.prompt, true)]
    for p in r.paraphrases:
        pairs += [(p, r.target_new), (p, true)]
    for q, answer in r.locality:
        pairs += [(q, r.target_new), (q, answer)]
    return pairs


def _case(kind: Kind, rec: EvalRecord, s: list[CandidateScore]) -> dict[str, Any]:
    """Raw per-case scores as JSON: CounterFact [lp_new, lp_true] pairs, ZsRE token accuracies, and
    KnowEdit's fields for a record with probes (``s[0]`` is always the edit prompt's new target)."""
    own = len(_own_pairs(kind, rec))
    case = _own_case(kind, rec, s[:own])
    if rec.probes:
        case |= knowedit.case_fields(s[0], rec.probes, s[own:])
    return case


def _own_case(kind: Kind, rec: EvalRecord, s: list[CandidateScore]) -> dict[str, Any]:
    r = rec.request
    if kind == "zsre":
        acc = [sum(c.correct) / len(c.correct) for c in s]
        k = len(r.paraphrases)
        return {"id": r.id, "rewrite": acc[0], "paraphrase": acc[1 : 1 + k], "neighborhood": acc[1 + k :]}
    lp = [c.mean_logprob for c in s]
    pairs = [[lp[i], lp[i + 1]] for i in range(0, len(lp), 2)]
    k = len(r.paraphrases)
    return {"id": r.id, "rewrite": pairs[0], "paraphrase": pairs[1 : 1 + k], "neighborhood": pairs[1 + k :]}


def score_records(lm: LoadedModel, kind: Kind, records: Sequence[EvalRecord], opts: EvalOptions,
                  references: ReferenceTexts | None = None,
                  progress: Callable[[str, int, int], None] | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Per-case scores of ``records`` on the model as it is now.

    CounterFact cases without a true object cannot be scored by preference and raise ValueError.
    ``progress(stage, done, total)`` reports the generation stage; ``offset``: the index of
    ``records[0]`` in the whole selection (which cases get generations does not depend on chunking).
    """
    if kind == "counterfact" and (bad := next((r.request.id for r in records if not r.request.target_true), None)):
        raise ValueError(f"case {bad}: CounterFact scoring needs target_true")
    per_case = [case_pairs(kind, r) for r in records]
    flat = [p for pairs in per_case for p in pairs]
    scores = score_candidates(lm, flat, opts.batch_size)
    cases, pos = [], 0
    for rec, pairs in zip(records, per_case):
        cases.append(_case(kind, rec, scores[pos : pos + len(pairs)]))
        pos += len(pairs)
    if opts.generation_every:
        _generate(lm, records, cases, opts, references, progress, offset)
    return cases


def _generate(lm: LoadedModel, records: Sequence[EvalRecord], cases: list[dict[str, Any]], opts: EvalOptions,
              references: ReferenceTexts | None, progress: Callable[[str, int, int], None] | None,
              offset: int) -> None:
    chosen = [i for i, r in enumerate(records) if r.generation_prompts and (offset + i) % opts.generation_every == 0]
    prompts = [p for i in chosen for p in records[i].generation_prompts]
    if not prompts:
        return
    texts = sample_texts(lm, prompts, opts.max_length, opts.top_k, opts.seed)
    pos = 0
    for n, i in enumerate(chosen):
        k = len(records[i].generation_prompts)
        cases[i]["texts"] = texts[pos : pos + k]
        pos += k
        if references is not None:
            cases[i]["consistency"] = references.score(cases[i]["texts"], records[i].relation_id,
                                                       records[i].target_new_id)
        if progress:
            progress("generation", n + 1, len(chosen))


Dropped = dict[str, tuple[frozenset[int], frozenset[int]]]


def edited_probes(groups: Sequence[Sequence[EvalRecord]]) -> Dropped:
    """The prompts that must keep their answer but were themselves edited: per case id, the indices
    of its neighbourhood prompts (``request.locality``) and of its KnowEdit locality probes (in
    order) whose text is the edit prompt of a record edited together with it (``groups``: the sets of
    records whose edits are in the model when each is scored: all N in a sequential run, the batch
    otherwise). Their answer is meant to change, so specificity and locality leave them out (the
    same for every row, the unedited one included). Only cases with such prompts are listed."""
    out: Dropped = {}
    for group in groups:
        edited = {r.request.prompt.strip() for r in group}
        for r in group:
            nb = frozenset(i for i, (q, _) in enumerate(r.request.locality) if q.strip() in edited)
            loc = frozenset(i for i, p in enumerate(x for x in r.probes if x.family == "locality")
                            if p.prompt.strip() in edited)
            if nb or loc:
                out[r.request.id] = (nb, loc)
    return out


def without_dropped(case: dict[str, Any], dropped: Dropped) -> dict[str, Any]:
    """``case`` without the neighbourhood prompts and locality probes ``dropped`` lists for it."""
    if case["id"] not in dropped:
        return case
    nb, loc = dropped[case["id"]]
    out = case | {"neighborhood": [x for i, x in enumerate(case["neighborhood"]) if i not in nb]}
    if "locality_tokens" in case:
        out["locality_tokens"] = [x for i, x in enumerate(case["locality_tokens"]) if i not in loc]
    return out


def metrics(kind: Kind, cases: Sequence[dict[str, Any]],
            reference: Sequence[dict[str, Any]] | None = None,
            dropped: Dropped | None = None) -> dict[str, float | None]:
    """Metrics (×100) of per-case scores; unavailable families are None. Cases with KnowEdit
    fields also get KnowEdit's metrics, their locality against ``reference`` (the unedited model's
    cases; None: ``cases`` are the unedited model's). ``dropped``: prompts left out of
    specificity and locality, in ``cases`` and ``reference`` alike (:func:`edited_probes`)."""
    if dropped:
        cases = [without_dropped(c, dropped) for c in cases]
        reference = None if reference is None else [without_dropped(c, dropped) for c in reference]
    if kind == "zsre":
        out = zsre_metrics([ZsreCase(c["rewrite"], tuple(c["paraphrase"]), tuple(c["neighborhood"])) for c in cases])
        if any(c.get("texts") for c in cases):
            out["fluency"] = fluency_by_case([c.get("texts", ()) for c in cases])
    else:
        out = counterfact_metrics([CaseScores(tuple(c["rewrite"]), tuple(map(tuple, c["paraphrase"])),
                                              tuple(map(tuple, c["neighborhood"]))) for c in cases])
        out["fluency"] = fluency_by_case([c.get("texts", ()) for c in cases])
        rs = [c["consistency"] for c in cases if c.get("consistency") is not None]
        out["consistency"] = pct(sum(rs) / len(rs)) if rs else None
    if cases and all("edit_acc" in c for c in cases):
        out |= knowedit.metrics(cases, cases if reference is None else reference)
    return out
