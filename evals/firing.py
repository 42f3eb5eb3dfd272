"""Which stored fact fires where: traces of the NeuralDB gate over scored prompts, classified.

A fact can change a score only at tokens where it is the best-matching stored key and its cosine
exceeds its threshold θ (γ, or its radius: :mod:`neuraldb.radius`); everywhere else the gated model
is the base model bit for bit. Whether a fact fires depends on the keys and thresholds alone, not
on the residuals, so a trace needs only a forward up to the edit layer with the gate recording
(per token) the best fact and its cosine. Each firing is classified by whose fact fired — the
record's own, another whose subject occurs in the prompt (``mentioned``), another whose subject
ends in the fired token's text (``same_ending``: a key taken at a generic last word such as
' Island' or ' II') or any other (``unrelated``) — and where: a prompt token or an answer token.
Used by ``neuraldb explain`` and the firing benchmarks.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from neuraldb import gate
from neuraldb.facts import EditRequest
from neuraldb.hooks import stop_after
from neuraldb.models import LoadedModel
from neuraldb.prompts import Encoded, aligned_batch, encode


@dataclass
class Trace:
    """One traced sequence: ``index`` the best stored fact and ``cosine`` its cosine per token
    (``[seq]`` each); ``ids`` its token ids, of which the first ``n_prompt`` are the prompt's."""

    index: torch.Tensor
    cosine: torch.Tensor
    ids: tuple[int, ...]
    n_prompt: int

    def scored(self) -> range:
        """Positions whose firing can change a score: with an answer, all but the last token (the
        last answer token predicts nothing that is scored); a bare prompt, all of them."""
        return range(len(self.ids) - 1 if len(self.ids) > self.n_prompt else len(self.ids))


@torch.no_grad()
def trace_all(lm: LoadedModel, g: gate.GatedProjection, layer: int, rows: list[Encoded],
              batch_size: int = 64) -> list[Trace]:
    """Run ``rows`` up to the edit layer in right-padded batches with the gate traced."""
    out: list[Trace] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        b = aligned_batch(chunk, lm.tokenizer.pad_token_id, anchors=[0] * len(chunk))
        g.trace = []
        with stop_after(lm.model, lm.arch.layer_path(layer)):
            lm.backbone(input_ids=b.input_ids.to(lm.device), attention_mask=b.attention_mask.to(lm.device),
                        position_ids=b.position_ids.to(lm.device))
        f = g.trace[0]
        g.trace = None
        out += [Trace(f.index[k, : len(r.ids)], f.cosine[k, : len(r.ids)], r.ids, r.n_prompt)
                for k, r in enumerate(chunk)]
    return out


def fires_own(t: Trace, own: int, theta: torch.Tensor) -> bool:
    n = len(t.scored())
    return bool(((t.index[:n] == own) & (t.cosine[:n] > theta[t.index[:n]])).any())


WHO = ("own", "mentioned", "same_ending", "unrelated")


def kinds(t: Trace, own: int, theta: torch.Tensor, prompt: str, subjects: list[str], tok: object,
          ending_anywhere: bool = False) -> set[str]:
    """Kinds of firing at the scored positions of ``t`` (empty: nothing fires). Whose fact: the
    record's own; another whose subject occurs in the prompt (``mentioned``: that subject was itself
    edited); another whose subject ends in the fired token's text (``same_ending``: a key taken at a
    generic last word such as ' Island' or ' II'; with ``ending_anywhere``, for the relation gate,
    which fires at the question's end: the subject's last word is a word of the prompt); any other
    (``unrelated``). Where: a prompt token or an answer token."""
    out = set()
    for pos in t.scored():
        if float(t.cosine[pos]) <= float(theta[t.index[pos]]):
            continue
        j = int(t.index[pos])
        text = tok.decode([t.ids[pos]]).strip()  # type: ignore[attr-defined]
        ending = (_last_word(subjects[j]) in re.findall(r"\w+", prompt)) if ending_anywhere else (
            bool(text) and subjects[j].endswith(text))
        who = "own" if j == own else "mentioned" if subjects[j] in prompt else "same_ending" if ending else "unrelated"
        out.add(f"{who}_{'prompt' if pos < t.n_prompt else 'answer'}")
    return out


def foreign_tokens(t: Trace, own: int, theta: torch.Tensor, tok: object) -> list[tuple[str, int]]:
    """(text (stripped), fact) of every scored token of ``t`` where a fact other than ``own`` fires:
    on an edit prompt, what another fact overwrites (a lone digit: a key read at a number)."""
    return [(tok.decode([t.ids[p]]).strip(), int(t.index[p])) for p in t.scored()  # type: ignore[attr-defined]
            if int(t.index[p]) != own and float(t.cosine[p]) > float(theta[t.index[p]])]


def _last_word(text: str) -> str:
    words = re.findall(r"\w+", text)
    return words[-1] if words else text


def share(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / max(1, len(flags))


def rates(rewrite: list[Trace], para: list[list[Trace]], neigh: list[list[Trace]], prompts: list[list[str]],
          subjects: list[str], tok: object, rules: dict[str, torch.Tensor],
          ending_anywhere: bool = False) -> dict[str, dict]:
    """Firing rates (% of prompts; neighbourhood: prompt tokens only) under each named rule (θ per
    stored fact ``[m]``): the record's own fact on its rewrite and paraphrase prompts (what
    efficacy and generalisation need), and any fact on its neighbourhood prompts, by whose."""
    table = {}
    for name, theta in rules.items():
        nk = [{k for k in kinds(t, i, theta, p, subjects, tok, ending_anywhere) if k.endswith("_prompt")}
              for i, ts in enumerate(neigh) for t, p in zip(ts, prompts[i])]
        foreign = [foreign_tokens(t, i, theta, tok) for i, t in enumerate(rewrite)]
        table[name] = {
            "rewrite_own_fires_pct": share([fires_own(t, i, theta) for i, t in enumerate(rewrite)]),
            "rewrite_foreign_fires": sum(bool(f) for f in foreign),
            "rewrite_foreign_digit_fires": sum(any(x.isdigit() for x, _ in f) for f in foreign),
            # the same, without the facts that share the prompt's subject (ZsRE edits one subject several times)
            "rewrite_foreign_other_subject_fires": sum(any(subjects[j] != subjects[i] for _, j in f)
                                                       for i, f in enumerate(foreign)),
            "rewrite_foreign_other_subject_digit_fires": sum(
                any(x.isdigit() and subjects[j] != subjects[i] for x, j in f) for i, f in enumerate(foreign)),
            "rewrite_foreign_examples": [{"subject": subjects[i], "token": x, "fired": subjects[j]}
                                         for i, f in enumerate(foreign) for x, j in f[:1]][:50],
            "paraphrase_own_fires_pct": share([fires_own(t, i, theta) for i, ts in enumerate(para) for t in ts]),
            "neighbourhood_any_fires_pct": share([bool(k) for k in nk]),
            "neighbourhood_fact_pct": {who: share([f"{who}_prompt" in k for k in nk]) for who in WHO},
        }
    return table


def flips(cases: dict, requests: list[EditRequest], neigh: list[list[tuple[Trace, Trace]]],
          prompts: list[list[str]], theta: torch.Tensor, tok: object, tol: float = 1e-4) -> dict:
    """Neighbourhood prompts whose score changed (by more than ``tol`` in either log-probability;
    smaller differences are float noise between runs) or flipped true → new, by kind of firing over
    the prompt followed by either answer."""
    pre = {c["id"]: c["neighborhood"] for c in cases["pre"]}
    post = {c["id"]: c["neighborhood"] for c in cases["neuraldb"]}
    subjects = [r.subject for r in requests]
    changed: Counter[str] = Counter()
    flipped: Counter[str] = Counter()
    fired_unchanged = 0
    examples = []
    for i, req in enumerate(requests):
        for j, ((n0, t0), (n1, t1)) in enumerate(zip(pre[req.id], post[req.id])):
            k = set().union(*(kinds(t, i, theta, prompts[i][j], subjects, tok) for t in neigh[i][j]))
            if max(abs(n0 - n1), abs(t0 - t1)) <= tol:
                fired_unchanged += bool(k)
                continue
            changed.update({"total", *(k or {"none"})})
            if not (t0 > n0 and not t1 > n1):
                continue
            flipped.update({"total", *(k or {"none"})})
            whose = {w.rsplit("_", 1)[0] for w in k}
            flipped[f"only_{'+'.join(sorted(whose))}"] += 1
            if len(examples) < 12:
                t = neigh[i][j][0]
                pos = max(t.scored(), key=lambda q: float(t.cosine[q]))
                f = requests[int(t.index[pos])]
                examples.append({"prompt": prompts[i][j], "true": req.target_true, "record_subject": req.subject,
                                 "fired_at": tok.decode([t.ids[pos]]),  # type: ignore[attr-defined]
                                 "fired_subject": f.subject, "fired_new_target": f.target_new,
                                 "cosine": round(float(t.cosine[pos]), 3)})
    return {"changed": dict(sorted(changed.items())), "flipped": dict(sorted(flipped.items())),
            "fired_but_unchanged": fired_unchanged, "examples": examples}


def scored_rows(kind: str, requests: list[EditRequest]) -> dict[str, list[tuple[int, str, tuple[str, ...]]]]:
    """The scored sequences of each family as scoring runs them, (record, prompt, answers) rows:
    ``rewrite``, ``paraphrase`` and ``neighborhood`` (ZsRE: locality) prompts, each followed by the
    new target, and (CounterFact) by the true / locality answer."""
    if kind == "zsre":
        return {"rewrite": [(i, r.prompt, (r.target_new,)) for i, r in enumerate(requests)],
                "paraphrase": [(i, p, (r.target_new,)) for i, r in enumerate(requests) for p in r.paraphrases],
                "neighborhood": [(i, p, (a,)) for i, r in enumerate(requests) for p, a in r.locality]}
    true = [r.target_true or "" for r in requests]
    return {"rewrite": [(i, r.prompt, (r.target_new, true[i])) for i, r in enumerate(requests)],
            "paraphrase": [(i, p, (r.target_new, true[i])) for i, r in enumerate(requests) for p in r.paraphrases],
            "neighborhood": [(i, p, (r.target_new, a)) for i, r in enumerate(requests) for p, a in r.locality]}


Group = tuple[Trace, ...]  # one scored prompt, followed by each of its scored answers


def trace_groups(lm: LoadedModel, g: gate.GatedProjection, layer: int,
                 rows: list[tuple[int, str, tuple[str, ...]]], n: int) -> list[list[Group]]:
    """Trace (record, prompt, answers) rows as scoring runs them (the prompt followed by each
    answer): per record, one group of traces per row."""
    enc = [encode(lm.tokenizer, p, target=a) for _, p, answers in rows for a in answers]
    traces = trace_all(lm, g, layer, enc)
    out: list[list[Group]] = [[] for _ in range(n)]
    k = 0
    for i, _, answers in rows:
        out[i].append(tuple(traces[k : k + len(answers)]))
        k += len(answers)
    return out


def fired(t: Trace, theta: torch.Tensor) -> frozenset[tuple[int, int]]:
    """(position, fact) of every scored position where the best fact exceeds its threshold."""
    n = len(t.scored())
    hit = (t.cosine[:n] > theta[t.index[:n]]).nonzero().squeeze(1).tolist()
    return frozenset((p, int(t.index[p])) for p in hit)
