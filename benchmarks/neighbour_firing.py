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

import torch

from evals import datasets
from evals.firing import Trace, flips, rates, trace_all
from neuraldb import gate, models
from neuraldb.files import write_json
from neuraldb.keys import subject_keys
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.prompts import encode

GAMMAS = (0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


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
    g = gate.install(lm.model, editor.path, gate.StoredSubjects(torch.nn.functional.normalize(keys, dim=1), h.gamma),
                     torch.zeros(len(requests), lm.arch.d_model))
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
              "by_gamma": rates(rewrite, para, [[t[0] for t in ts] for ts in neigh], prompts, subjects, tok,
                                {str(g): torch.full((len(requests),), g) for g in GAMMAS})}
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
        result["at_store_gamma"] = flips(cases, requests, neigh, prompts, torch.full((len(requests),), h.gamma), tok)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "at_store_gamma"}, indent=1))
    if "at_store_gamma" in result:
        print(json.dumps({k: v for k, v in result["at_store_gamma"].items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
