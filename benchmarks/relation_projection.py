"""Can the key at the prompt's last token say *which relation* is asked? Raw keys against a learned projection.

A relation-aware gate needs a second key that is alike for two phrasings of one question and unlike for
another question about the same subject. This benchmark reads, at one layer, the key (input of the FFN
output projection) at the last token of prompt pairs from the **training** records:

* should match — ``cf_para``: a CounterFact-train edit prompt and its paraphrase; ``cf_neigh``: the edit
  prompt and a neighbourhood prompt (another subject, same relation); ``Subject_Aliasing``: a KnowEdit
  training edit prompt and the same question about the subject's alias;
* should not match — ``Relation_Specificity`` and ``Forgetfulness``: the KnowEdit edit prompt and another
  question about the same subject.

It fits a :class:`neuraldb.relation.RelationMap` (the gate's own fit: a linear map ``W`` [d_ff, rank] on
standardised keys with a margin loss (pairs that should match
above ``--pos`` cosine, the others below ``--neg``)) on 80 % of the records (split by record, seeded) and
reports, on the held-out 20 %, the median cosine and the share above 0.5 of each pair kind, for the raw
key and for the projection, in one run (JSON).

Usage:  python benchmarks/relation_projection.py --layer 14 --n-cf 2000
        (writes benchmarks/results/relation_projection.json)
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from evals import datasets
from neuraldb import models, relation
from neuraldb.files import write_json

MATCH = {"cf_para": 1, "cf_neigh": 1, "Subject_Aliasing": 1, "Relation_Specificity": 0, "Forgetfulness": 0}


@dataclass(frozen=True)
class Pair:
    record: str
    kind: str
    a: str
    b: str

    @property
    def label(self) -> int:
        return MATCH[self.kind]


def pairs(n_cf: int) -> list[Pair]:
    """Prompt pairs of the first ``n_cf`` CounterFact-train records and all KnowEdit-cf training records."""
    out = []
    for i, r in enumerate(datasets.load("counterfact-train").records[:n_cf]):
        q = r.request
        prompt = q.template.format(q.subject)
        out += [Pair(f"cf{i}", "cf_para", prompt, p) for p in q.paraphrases]
        out += [Pair(f"cf{i}", "cf_neigh", prompt, p) for p, _ in q.locality[:1]]
    for i, r in enumerate(datasets.load("knowedit-cf-train").records):
        q = r.request
        prompt = q.template.format(q.subject)
        out += [Pair(f"ke{i}", pr.kind, prompt, pr.prompt) for pr in r.probes if pr.kind in MATCH]
    return out


def summary(c: torch.Tensor, ps: list[Pair], mask: torch.Tensor) -> dict[str, dict[str, float]]:
    out = {}
    for kind in MATCH:
        sel = mask & torch.tensor([p.kind == kind for p in ps])
        v = c[sel]
        out[kind] = {"n": int(sel.sum()), "median": round(float(v.median()), 3),
                     "above_0.5": round(100 * float((v > 0.5).float().mean()), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--n-cf", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--pos", type=float, default=0.8)
    ap.add_argument("--neg", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/relation_projection.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ps = pairs(args.n_cf)
    records = sorted({p.record for p in ps})
    random.Random(args.seed).shuffle(records)
    held = set(records[: len(records) // 5])
    test = torch.tensor([p.record in held for p in ps])
    lm = models.load(args.model)
    texts = sorted({t for p in ps for t in (p.a, p.b)})
    with Progress() as bar:
        task = bar.add_task(f"keys at layer {args.layer}", total=len(texts))
        keys = relation.last_token_keys(lm, texts, args.layer, progress=lambda n: bar.advance(task, n))
    row = {t: i for i, t in enumerate(texts)}
    a = keys[torch.tensor([row[p.a] for p in ps])]
    b = keys[torch.tensor([row[p.b] for p in ps])]
    y = torch.tensor([p.label for p in ps], dtype=torch.bool)
    m = relation.fit(a[~test], b[~test], y[~test], args.layer, args.rank, args.pos, args.neg, args.steps, args.seed)
    raw = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    proj = (m.project(a) * m.project(b)).sum(-1)
    result = {"model": lm.name, "layer": args.layer, "rank": args.rank, "pairs": len(ps),
              "records": len(records), "held_out_records": len(held), "margins": [args.pos, args.neg],
              "steps": args.steps, "seed": args.seed,
              "held_out": {"raw": summary(raw, ps, test), "projected": summary(proj, ps, test)},
              "train": {"raw": summary(raw, ps, ~test), "projected": summary(proj, ps, ~test)}}
    write_json(args.out, result)
    table = Table(title=f"last-token key cosine, held-out training records (layer {args.layer}, {lm.name})")
    for c in ("pair", "should match", "raw median", "raw > 0.5 %", "projected median", "projected > 0.5 %"):
        table.add_column(c, justify="right")
    for kind in MATCH:
        r, p = result["held_out"]["raw"][kind], result["held_out"]["projected"][kind]
        table.add_row(kind, "yes" if MATCH[kind] else "no", f"{r['median']:.3f}", f"{r['above_0.5']:.1f}",
                      f"{p['median']:.3f}", f"{p['above_0.5']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
