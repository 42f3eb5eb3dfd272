"""Which stored facts fire on CounterFact's neighbourhood prompts, and what a higher γ would cost.

NeuralDB's specificity loss comes only from tokens of a neighbourhood prompt where some stored key
has cosine > γ with the token's key: everywhere else the gated model is the base model bit for bit.
Whether a key fires depends on the keys alone, not on the residuals, so this script needs no
optimisation: it computes the keys of the first ``--n`` CounterFact records as NeuralDB does (same
edit layer, context templates and averaging; batched differently, so equal up to float rounding,
which matters only for cosines within ~1e-6 of γ), and runs every rewrite, paraphrase and
neighbourhood prompt up to the edit layer with the gate traced (neighbourhood prompts once followed
by each scored answer, as scoring runs them). Per sequence it keeps, at each token, the best stored
fact and its cosine.

Output (JSON):

* ``by_gamma``: for each γ, the share of rewrite and paraphrase prompts where the record's own fact
  fires (what efficacy and generalisation need) and the share of neighbourhood prompts where any
  fact fires on a prompt token, split by whose fact: the record's own, another record's whose
  subject occurs in the prompt (``mentioned``: CounterFact's neighbourhood prompts are about other
  subjects, and at large N some of those subjects are edited too), or an ``unrelated`` one;
* with ``--cases FILE`` (a ``compare``/``eval`` per-case file with ``pre`` and ``neuraldb`` rows on
  the same records, run with the store's γ): the neighbourhood prompts whose score changed and those
  that flipped from the true to the new object, by kind of firing (whose fact × prompt or answer
  token), and how many fired without any change;
* ``examples``: flipped prompts with the fact of highest cosine over the prompt followed by the new
  answer (its scored positions) and the token where it is.

Usage:  python benchmarks/neighbour_firing.py --n 1000 \
            --cases benchmarks/results/compare-counterfact-1000.cases.json \
            --out benchmarks/results/neighbour_firing.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass

import torch

from evals import datasets
from neuraldb import gate, models
from neuraldb.facts import EditRequest
from neuraldb.files import write_json
from neuraldb.hooks import stop_after
from neuraldb.keys import subject_keys
from neuraldb.models import LoadedModel
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.prompts import Encoded, aligned_batch, encode

GAMMAS = (0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


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


def fires_own(t: Trace, own: int, gamma: float) -> bool:
    n = len(t.scored())
    return bool(((t.index[:n] == own) & (t.cosine[:n] > gamma)).any())


WHO = ("own", "mentioned", "same_ending", "unrelated")


def kinds(t: Trace, own: int, gamma: float, prompt: str, subjects: list[str], tok: object) -> set[str]:
    """Kinds of firing at the scored positions of ``t`` (empty: nothing fires). Whose fact: the
    record's own; another whose subject occurs in the prompt (``mentioned``: that subject was itself
    edited); another whose subject ends in the fired token's text (``same_ending``: a key taken at a
    generic last word such as ' Island' or ' II'); any other (``unrelated``). Where: a prompt token
    or an answer token."""
    out = set()
    for pos in t.scored():
        if float(t.cosine[pos]) <= gamma:
            continue
        j = int(t.index[pos])
        text = tok.decode([t.ids[pos]]).strip()  # type: ignore[attr-defined]
        who = ("own" if j == own else "mentioned" if subjects[j] in prompt
               else "same_ending" if text and subjects[j].endswith(text) else "unrelated")
        out.add(f"{who}_{'prompt' if pos < t.n_prompt else 'answer'}")
    return out


def share(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / max(1, len(flags))


def by_gamma(rewrite: list[Trace], para: list[list[Trace]], neigh: list[list[Trace]],
             prompts: list[list[str]], subjects: list[str], tok: object) -> dict[str, dict]:
    """Firing rates (% of prompts; neighbourhood: prompt tokens only) for each γ in :data:`GAMMAS`."""
    table = {}
    for gamma in GAMMAS:
        nk = [{k for k in kinds(t, i, gamma, p, subjects, tok) if k.endswith("_prompt")}
              for i, ts in enumerate(neigh) for t, p in zip(ts, prompts[i])]
        table[str(gamma)] = {
            "rewrite_own_fires_pct": share([fires_own(t, i, gamma) for i, t in enumerate(rewrite)]),
            "paraphrase_own_fires_pct": share([fires_own(t, i, gamma) for i, ts in enumerate(para) for t in ts]),
            "neighbourhood_any_fires_pct": share([bool(k) for k in nk]),
            "neighbourhood_fact_pct": {who: share([f"{who}_prompt" in k for k in nk]) for who in WHO},
        }
    return table


def flips(cases: dict, requests: list[EditRequest], neigh: list[list[tuple[Trace, Trace]]],
          prompts: list[list[str]], gamma: float, tok: object, tol: float = 1e-4) -> dict:
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
            k = set().union(*(kinds(t, i, gamma, prompts[i][j], subjects, tok) for t in neigh[i][j]))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=1000, help="first N CounterFact records")
    ap.add_argument("--cases", help="per-case file with 'pre' and 'neuraldb' rows on the same records")
    ap.add_argument("--out", default="benchmarks/results/neighbour_firing.json")
    args = ap.parse_args()
    records = datasets.select(datasets.load("counterfact").records, args.n)
    requests = [r.request for r in records]
    lm = models.load(args.model)
    tok = lm.tokenizer
    editor = NeuralDBEditor(lm)
    h = editor.hparams
    keys = subject_keys(lm, requests, editor.templates(), [h.layer],
                        skip_first=h.target_config().skip_first_token_keys).keys[h.layer]
    g = gate.install(lm.model, editor.path, torch.nn.functional.normalize(keys, dim=1),
                     torch.zeros(len(requests), lm.arch.d_model), h.gamma)
    rewrite = trace_all(lm, g, h.layer, [encode(tok, r.prompt) for r in requests])
    para_rows = [(i, encode(tok, p)) for i, r in enumerate(requests) for p in r.paraphrases]
    prompts = [[p for p, _ in r.locality] for r in requests]
    # each neighbourhood prompt followed by each scored answer (new, true), as scoring runs them
    neigh_rows = [(i, encode(tok, p, target=a)) for i, r in enumerate(requests) for p in prompts[i]
                  for a in (r.target_new, r.target_true)]
    para_t = trace_all(lm, g, h.layer, [e for _, e in para_rows])
    neigh_t = trace_all(lm, g, h.layer, [e for _, e in neigh_rows])
    gate.unload(lm.model)
    para: list[list[Trace]] = [[] for _ in requests]
    for (i, _), t in zip(para_rows, para_t):
        para[i].append(t)
    neigh: list[list[tuple[Trace, Trace]]] = [[] for _ in requests]
    for k in range(0, len(neigh_rows), 2):
        neigh[neigh_rows[k][0]].append((neigh_t[k], neigh_t[k + 1]))
    subjects = [r.subject for r in requests]
    result = {"model": lm.name, "facts": len(requests), "layer": h.layer, "gamma": h.gamma,
              "neighbourhood_prompts": sum(map(len, neigh)),
              "by_gamma": by_gamma(rewrite, para, [[t[0] for t in ts] for ts in neigh], prompts, subjects, tok)}
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
        result["at_store_gamma"] = flips(cases, requests, neigh, prompts, h.gamma, tok)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "at_store_gamma"}, indent=1))
    if "at_store_gamma" in result:
        print(json.dumps({k: v for k, v in result["at_store_gamma"].items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
