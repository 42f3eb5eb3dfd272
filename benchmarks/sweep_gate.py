"""Choose NeuralDB's gate rule by measurement: the plain cosine gate at several γ against per-fact
look-alike radii (``gate=radius``: :mod:`neuraldb.radius`) at several margins and caps.

Which fact fires where depends on keys and thresholds only, so no residual is optimised: the keys
of the first ``--n`` records are computed as the editor computes them, every scored sequence (edit
prompt, paraphrases and neighbourhood prompts, each followed by each scored answer, as scoring runs
them) is run up to the edit layer with the gate traced, and each rule is applied to the traces.

* ``rates``: per rule, the share of edit / paraphrase prompts where the record's own fact fires
  (what efficacy and generalisation need) and of neighbourhood prompts where any fact fires on a
  prompt token, by whose fact (own, mentioned, same_ending, unrelated: :mod:`evals.firing`).
  Choose on training records (``--dataset counterfact-train``, the default).
* with ``--cases FILE`` (a ``compare`` / ``eval`` per-case file with ``pre`` and ``neuraldb`` rows
  on the same records, run with the plain gate at the preset γ): each rule's efficacy,
  generalisation and specificity, *exactly* where the rule's firing on a scored sequence is the
  run's (the ``neuraldb`` scores) or nothing (the unedited scores: the gate returns the base output
  bit for bit); a rule's thresholds are never below γ, so any other case fires a strict subset
  (``partial``: counted, and given the ``neuraldb`` scores).

Usage:  python benchmarks/sweep_gate.py --n 1000 --out benchmarks/results/sweep-gate-train.json
        python benchmarks/sweep_gate.py --dataset counterfact --n 1000 \\
            --cases benchmarks/results/compare-counterfact-1000.cases.json \\
            --out benchmarks/results/sweep-gate-counterfact-1000.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from evals import datasets
from evals.firing import Group, fired, rates, trace_groups
from evals.metrics import CaseScores, counterfact_metrics
from neuraldb import gate, models, radius
from neuraldb.facts import EditRequest
from neuraldb.files import write_json
from neuraldb.keys import subject_keys
from neuraldb.neuraldb_editor import NeuralDBEditor


def simulate(pairs: list[Group], pre: list, post: list, theta: torch.Tensor, run: torch.Tensor,
             counts: dict[str, int]) -> list:
    """The scores of ``pairs`` under ``theta``, from the unedited (``pre``) and the plain-gate run's
    (``post``) scores; ``counts`` tallies exact / partial cases."""
    out = []
    for group, s0, s1 in zip(pairs, pre, post):
        mine = frozenset().union(*(fired(t, theta) for t in group))
        theirs = frozenset().union(*(fired(t, run) for t in group))
        kind = "unchanged" if not mine else "as_run" if mine == theirs else "partial"
        counts[kind] += 1
        out.append(s0 if kind == "unchanged" else s1)
    return out


def scores_under(theta: torch.Tensor, run: torch.Tensor, traced: dict[str, list[list[Group]]], cases: dict,
                 requests: list[EditRequest]) -> dict:
    pre = {c["id"]: c for c in cases["pre"]}
    post = {c["id"]: c for c in cases["neuraldb"]}
    counts = {"unchanged": 0, "as_run": 0, "partial": 0}
    out = []
    for i, r in enumerate(requests):
        c0, c1 = pre[r.id], post[r.id]
        rw = simulate(traced["rewrite"][i], [c0["rewrite"]], [c1["rewrite"]], theta, run, counts)[0]
        para = simulate(traced["paraphrase"][i], c0["paraphrase"], c1["paraphrase"], theta, run, counts)
        neigh = simulate(traced["neighborhood"][i], c0["neighborhood"], c1["neighborhood"], theta, run, counts)
        out.append(CaseScores(tuple(rw), tuple(map(tuple, para)), tuple(map(tuple, neigh))))
    m = counterfact_metrics(out)
    return {k: m[k] for k in ("efficacy", "generalization", "specificity")} | {"cases": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--dataset", default="counterfact-train")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--gammas", default="0.65,0.7,0.75,0.8,0.85")
    ap.add_argument("--margins", default="0,0.02,0.05")
    ap.add_argument("--caps", default="0.8,0.85,0.9,0.95")
    ap.add_argument("--cases", help="per-case file with 'pre' and 'neuraldb' rows on the same records")
    ap.add_argument("--out", default="benchmarks/results/sweep-gate-train.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    records = datasets.select(datasets.load(args.dataset).records, args.n)
    requests = [r.request for r in records]
    lm = models.load(args.model)
    editor = NeuralDBEditor(lm)
    h = editor.hparams
    t0 = time.perf_counter()
    keys = subject_keys(lm, requests, editor.templates(), [h.layer],
                        skip_first=h.target_config().skip_first_token_keys).keys[h.layer]
    closest = radius.radii(lm, requests, keys, h.layer, -1.0, 0.0, 1.0)  # cosine of the closest look-alike
    radius_s = time.perf_counter() - t0
    m = len(requests)
    g = gate.install(lm.model, editor.path, torch.nn.functional.normalize(keys, dim=1), torch.zeros(m, lm.arch.d_model),
                     -1.0)
    true = [r.target_true or "" for r in requests]
    rows = {
        "rewrite": [(i, r.prompt, (r.target_new, true[i])) for i, r in enumerate(requests)],
        "paraphrase": [(i, p, (r.target_new, true[i])) for i, r in enumerate(requests) for p in r.paraphrases],
        "neighborhood": [(i, p, (r.target_new, a)) for i, r in enumerate(requests) for p, a in r.locality],
    }
    traced = {k: trace_groups(lm, g, h.layer, v, m) for k, v in rows.items()}
    gate.unload(lm.model)
    rules = {f"cosine γ={x}": torch.full((m,), float(x)) for x in args.gammas.split(",")}
    for margin in map(float, args.margins.split(",")):
        for cap in map(float, args.caps.split(",")):
            rules[f"radius γ={h.gamma} m={margin} cap={cap}"] = torch.clamp(
                torch.clamp(closest + margin, min=h.gamma), max=cap)
    prompts = [[p for p, _ in r.locality] for r in requests]
    first = {k: [[pair[0] for pair in ts] for ts in v] for k, v in traced.items()}
    table = rates([ts[0] for ts in first["rewrite"]], first["paraphrase"], first["neighborhood"], prompts,
                  [r.subject for r in requests], lm.tokenizer, rules)
    result = {"model": lm.name, "dataset": args.dataset, "facts": m, "layer": h.layer, "gamma": h.gamma,
              "look_alike_seconds": round(radius_s, 1),
              "facts_with_look_alikes": int((closest > -1).sum()), "rates": table}
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
        run = torch.full((m,), h.gamma)
        result["simulated"] = {name: scores_under(theta, run, traced, cases, requests) for name, theta in rules.items()}
    write_json(args.out, result)
    show(result)


def show(result: dict) -> None:
    t = Table(title=f"gate rules on {result['dataset']} ({result['facts']} facts, layer {result['layer']})")
    for c in ("rule", "own fires: edit", "paraphrase", "neighbour fires", "same ending",
              *(("Efficacy", "Generalization", "Specificity", "partial") if "simulated" in result else ())):
        t.add_column(c, justify="left" if c == "rule" else "right")
    for name, r in result["rates"].items():
        row = [name, f"{r['rewrite_own_fires_pct']:.1f}", f"{r['paraphrase_own_fires_pct']:.1f}",
               f"{r['neighbourhood_any_fires_pct']:.1f}", f"{r['neighbourhood_fact_pct']['same_ending']:.1f}"]
        if "simulated" in result:
            s = result["simulated"][name]
            row += [f"{s['efficacy']:.1f}", f"{s['generalization']:.1f}", f"{s['specificity']:.1f}",
                    str(s["cases"]["partial"])]
        t.add_row(*row)
    Console().print(t)


if __name__ == "__main__":
    main()
