"""Choose NeuralDB's gate rule by measurement: the plain cosine gate at several γ against per-fact
look-alike radii (``gate=radius``: :mod:`neuraldb.radius`) at several margins and caps, or, with
``--gate relation``, the relation gate at several subject thresholds γ and relation thresholds ρ.

Which fact fires where depends on keys and thresholds only, so no residual is optimised: the keys
of the first ``--n`` records are computed as the editor computes them
(:meth:`NeuralDBEditor.gate_keys`), every scored sequence (edit prompt, paraphrases and
neighbourhood / locality prompts, each followed by each scored answer, as scoring runs them) is run
up to the layer where the gate decides, with the gate traced, and each rule is applied to the traces
(the relation gate: one trace per γ, since γ decides which facts' subjects count as seen).

* ``rates``: per rule, the share of edit / paraphrase prompts where the record's own fact fires
  (what efficacy and generalisation need) and of neighbourhood prompts where any fact fires on a
  prompt token, by whose fact (own, mentioned, same_ending, unrelated: :mod:`evals.firing`).
  Choose on training records (``--dataset counterfact-train`` or ``knowedit-cf-train``).
* with ``--cases FILE`` (a ``compare`` / ``eval`` per-case file with ``pre`` and ``neuraldb`` rows
  on the same records, run with the editor's defaults for the chosen gate, ``--hparam`` as run, or
  ``--run-hparam`` as run when the rules are of other hparams, e.g. ``key=dual`` replayed on a run
  of the default gate):
  each rule's efficacy, generalisation and specificity (and, on KnowEdit, locality by kind),
  *exactly* where the rule's firing on a scored sequence is the run's (the ``neuraldb`` scores) or
  nothing (the unedited scores: the gate returns the base output bit for bit); any other case is
  counted as ``partial`` and given the ``neuraldb`` scores, so rules with few partial cases are the
  ones to trust.

Usage:  python benchmarks/sweep_gate.py --n 1000 --out benchmarks/results/sweep-gate-train.json
        python benchmarks/sweep_gate.py --dataset counterfact --n 1000 \\
            --cases benchmarks/results/compare-counterfact-1000.cases.json \\
            --out benchmarks/results/sweep-gate-counterfact-1000.json
        python benchmarks/sweep_gate.py --n 1000 --hparam key=pooled --hparam pool_max=3 --margins none \
            --gammas 0.55,0.6,0.65,0.7,0.75,0.8 --out benchmarks/results/sweep-gate-pooled3-train.json
        python benchmarks/sweep_gate.py --n 1000 --hparam key=dual --pool-gammas 0.4,0.45,0.5,0.55 \\
            --gammas 0.6,0.65,0.7 --out benchmarks/results/sweep-gate-dual-train.json
        python benchmarks/sweep_gate.py --n 1000 --hparam key=tokens --token-gammas 0.3,0.4,0.5,0.6 \
            --gammas 0.6,0.65,0.7 --out benchmarks/results/sweep-gate-tokens-train.json
        python benchmarks/sweep_gate.py --gate relation --dataset knowedit-cf-train --n 50 \\
            --hparam relation_gamma=0.5 --gammas 0.65 --rhos 0.5,0.55,0.6,0.65,0.7 \\
            --cases benchmarks/results/knowedit-cf-train-50-relation.cases.json \\
            --out benchmarks/results/sweep-relation-knowedit-cf-train-50.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from evals import datasets, knowedit
from evals.evaluate import Dropped, edited_probes, without_dropped
from evals.explain import ORDER, cause_of, why_fired, worse
from evals.firing import Group, fired, rates, scored_rows, trace_groups
from evals.metrics import CaseScores, ZsreCase, counterfact_metrics, zsre_metrics
from neuraldb import models, radius
from neuraldb.facts import EditRequest
from neuraldb.files import write_json
from neuraldb.neuraldb_editor import GateKeys, NeuralDBEditor

Traced = dict[str, list[list[Group]]]  # family → per record → one group per scored prompt
Rule = tuple[Traced, torch.Tensor]  # the traces it reads and its threshold θ per fact [m]


def simulate(mine: list[Group], run: list[Group], theta: torch.Tensor, run_theta: torch.Tensor, pre: list,
             post: list, counts: dict[str, int]) -> list:
    """The scores of the scored prompts traced as ``mine`` under ``theta``, from the unedited
    (``pre``) and the run's (``post``; traced as ``run`` under ``run_theta``) scores; ``counts``
    tallies unchanged / as-run / partial prompts."""
    out = []
    for g_mine, g_run, s0, s1 in zip(mine, run, pre, post):
        a = frozenset().union(*(fired(t, theta) for t in g_mine))
        b = frozenset().union(*(fired(t, run_theta) for t in g_run))
        kind = "unchanged" if not a else "as_run" if a == b else "partial"
        counts[kind] += 1
        out.append(s0 if kind == "unchanged" else s1)
    return out


def scores_under(rule: Rule, run: Rule, cases: dict, requests: list[EditRequest], kind: str, tok: object,
                 dropped: Dropped | None = None) -> dict:
    """Efficacy, generalisation, specificity (and KnowEdit's locality) of ``rule`` replayed on the
    run's ``cases`` (:func:`simulate`), and its worse neighbourhood prompts by the cause of the
    firing behind them (:mod:`evals.explain`'s classes). ``dropped``: the prompts left out of
    specificity and locality (edited probes, :func:`evals.evaluate.edited_probes`), as ``eval`` does."""
    dropped = dropped or {}
    (traced, theta), (run_traced, run_theta) = rule, run
    pre = {c["id"]: c for c in cases["pre"]}
    kept_pre = [without_dropped(c, dropped) for c in cases["pre"]]
    post = {c["id"]: c for c in cases["neuraldb"]}
    counts = {"unchanged": 0, "as_run": 0, "partial": 0}
    out, simulated = [], []

    def sim(fam: str, i: int, s0: list, s1: list) -> list:
        return simulate(traced[fam][i], run_traced[fam][i], theta, run_theta, s0, s1, counts)

    subjects, flipped = [r.subject for r in requests], Counter[str]()
    for i, r in enumerate(requests):
        c0, c1 = pre[r.id], post[r.id]
        rw = sim("rewrite", i, [c0["rewrite"]], [c1["rewrite"]])[0]
        para = sim("paraphrase", i, c0["paraphrase"], c1["paraphrase"])
        neigh = sim("neighborhood", i, c0["neighborhood"], c1["neighborhood"])
        nb = dropped.get(r.id, (frozenset(), frozenset()))[0]
        for j, (before, after) in enumerate(zip(c0["neighborhood"], neigh)):  # worse neighbours, by cause
            if j not in nb and worse(kind, before, after):
                flipped[cause_of(why_fired(traced["neighborhood"][i][j], -1, theta, r.locality[j][0], subjects,
                                           tok, False))] += 1
        neigh = [x for j, x in enumerate(neigh) if j not in nb]
        if isinstance(rw, (int, float)):  # ZsRE: token accuracies
            out.append(ZsreCase(float(rw), tuple(para), tuple(neigh)))
        else:
            out.append(CaseScores(tuple(rw), tuple(map(tuple, para)), tuple(map(tuple, neigh))))
        if "locality_tokens" in c1:  # KnowEdit: the locality answers' tokens follow the same firing
            loc = sim("neighborhood", i, c0["locality_tokens"], c1["locality_tokens"])
            simulated.append(without_dropped(c1 | {"locality_tokens": loc}, dropped))
    m = zsre_metrics(out) if out and isinstance(out[0], ZsreCase) else counterfact_metrics(out)  # type: ignore[arg-type]
    got = {k: m[k] for k in ("efficacy", "generalization", "specificity")}
    if simulated:
        ke = knowedit.metrics(simulated, kept_pre)
        got |= {k: v for k, v in ke.items() if k.startswith("locality_")}
    return got | {"cases": counts, "neighborhood_worse": {"total": sum(flipped.values())} | {
        k: flipped[k] for k in (*ORDER, "none")}}


def trace(editor: NeuralDBEditor, gk: GateKeys, kind: str, requests: list[EditRequest]) -> tuple[Traced, torch.Tensor]:
    """Every scored sequence of ``requests`` traced through ``gk``'s gate (installed, then removed)."""
    try:
        g, layer, theta = editor.trace_gate(gk)
        return {fam: trace_groups(editor.lm, g, layer, v, len(requests))
                for fam, v in scored_rows(kind, requests).items()}, theta
    finally:
        editor.restore()


def cosine_rules(editor: NeuralDBEditor, gk: GateKeys, traced: Traced, requests: list[EditRequest],
                 args: argparse.Namespace) -> dict[str, Rule]:
    h, m = editor.hparams, len(requests)
    rules = {f"cosine γ={x}": (traced, torch.full((m,), float(x))) for x in args.gammas.split(",")}
    if args.margins == "none" or h.key != "last":  # look-alike radii are of last-token keys alone
        return rules
    closest = radius.radii(editor.lm, requests, gk.keys, h.layer, -1.0, 0.0, 1.0)  # the closest look-alike's cosine
    for margin in map(float, args.margins.split(",")):
        for cap in map(float, args.caps.split(",")):
            rules[f"radius γ={h.gamma} m={margin} cap={cap}"] = (
                traced, torch.clamp(torch.clamp(closest + margin, min=h.gamma), max=cap))
    return rules


def dual_rules(editor: NeuralDBEditor, gk: GateKeys, kind: str, requests: list[EditRequest],
               args: argparse.Namespace) -> dict[str, Rule]:
    """``key=dual`` (``key=tokens``): one trace per pool (token) threshold (it shifts the traced
    score); per γ, the rule "last token's key above γ and pool (every earlier subject token) above
    γ_pool (γ_token) + (γ − the run's γ)"; a one-token subject's threshold (``single_gamma``, when
    above γ) stays as it is."""
    h, rules = editor.hparams, {}
    raised = gk.theta > h.gamma
    field, given, label = (("token_gamma", args.token_gammas, "tokens") if h.key == "tokens"
                           else ("pool_gamma", args.pool_gammas, "pool"))
    for second in map(float, (given or str(getattr(h, field))).split(",")):
        ed = NeuralDBEditor(editor.lm, h.replace(**{field: second}), editor.store)
        traced, _ = trace(ed, gk, kind, requests)
        for x in map(float, args.gammas.split(",")):
            theta = torch.where(raised, torch.clamp(gk.theta, min=x), torch.tensor(x))
            rules[f"{h.key} γ={x} {label}>{round(second + x - h.gamma, 4)}"] = (traced, theta)
    return rules


def relation_rules(editor: NeuralDBEditor, gk: GateKeys, kind: str, requests: list[EditRequest],
                   args: argparse.Namespace) -> dict[str, Rule]:
    m, rules = len(requests), {}
    for gamma in map(float, args.gammas.split(",")):
        traced, _ = trace(editor, replace(gk, theta=torch.full((m,), gamma)), kind, requests)
        for rho in map(float, args.rhos.split(",")):
            rules[f"relation γ={gamma} ρ={rho}"] = (traced, torch.full((m,), rho))
    return rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--dataset", default="counterfact-train")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--gate", choices=("cosine", "relation"), default="cosine",
                    help="cosine: cosine γ and radius rules; relation: subject γ × relation ρ")
    ap.add_argument("--gammas", default="0.65,0.7,0.75,0.8,0.85")
    ap.add_argument("--margins", default="0,0.02,0.05", help="radius margins, or none: no radius rules")
    ap.add_argument("--caps", default="0.8,0.85,0.9,0.95")
    ap.add_argument("--rhos", default="0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--pool-gammas", help="with --hparam key=dual: the pool thresholds γ_pool to trace "
                                          "(default: the hparam's)")
    ap.add_argument("--token-gammas", help="with --hparam key=tokens: the earlier-token thresholds γ_token to "
                                           "trace (default: the hparam's)")
    ap.add_argument("--hparam", action="append", default=[], help="KEY=VALUE of the editor (as in the run)")
    ap.add_argument("--cases", help="per-case file with 'pre' and 'neuraldb' rows on the same records")
    ap.add_argument("--run-hparam", action="append", help="KEY=VALUE the --cases run was made with, when not "
                    "the --hparam ones (give gate=cosine for a run with every default)")
    ap.add_argument("--keep-edited-probes", action="store_true",
                    help="count neighbourhood / locality prompts that are another edit's prompt (eval's flag)")
    ap.add_argument("--out", default="benchmarks/results/sweep-gate-train.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = datasets.load(args.dataset)
    records = datasets.select(spec.records, args.n)
    requests = [r.request for r in records]
    dropped = {} if args.keep_edited_probes else edited_probes([records])  # a sequential run: all N at once
    lm = models.load(args.model)
    hp = NeuralDBEditor.default_hparams(lm).parse([f"gate={args.gate}", *args.hparam])
    hp.validate(lm)
    editor = NeuralDBEditor(lm, hp)
    t0 = time.perf_counter()
    gk = editor.gate_keys(requests)
    keys_s = time.perf_counter() - t0
    run = trace(editor, gk, spec.kind, requests)
    if args.run_hparam is not None:  # the cases were run with other hparams: trace those for the comparison
        run_hp = NeuralDBEditor.default_hparams(lm).parse(args.run_hparam)
        run_ed = NeuralDBEditor(lm, run_hp)
        run = trace(run_ed, run_ed.gate_keys(requests), spec.kind, requests)
    if args.gate == "relation":
        rules = relation_rules(editor, gk, spec.kind, requests, args)
    elif hp.key in ("dual", "tokens"):
        rules = dual_rules(editor, gk, spec.kind, requests, args)
    else:
        rules = cosine_rules(editor, gk, run[0], requests, args)
    prompts = [[p for p, _ in r.locality] for r in requests]
    subjects = [r.subject for r in requests]
    table = {}
    for name, (traced, theta) in rules.items():
        first = {k: [[pair[0] for pair in ts] for ts in v] for k, v in traced.items()}
        table |= rates([ts[0] for ts in first["rewrite"]], first["paraphrase"], first["neighborhood"], prompts,
                       subjects, lm.tokenizer, {name: theta}, ending_anywhere=args.gate == "relation")
    result = {"model": lm.name, "dataset": args.dataset, "facts": len(requests), "gate": args.gate,
              "hparams": hp.to_dict(), "layer": hp.layer, "gamma": hp.gamma, "keys_seconds": round(keys_s, 1),
              "rates": table}
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
        result["simulated"] = {name: scores_under(rule, run, cases, requests, spec.kind, lm.tokenizer, dropped)
                               for name, rule in rules.items()}
        result["edited_probes_left_out"] = sum(len(nb) + len(loc) for nb, loc in dropped.values())
    write_json(args.out, result)
    show(result)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def show(result: dict) -> None:
    sim = result.get("simulated")
    loc = sorted({k for s in (sim or {}).values() for k in s if k.startswith("locality_")})
    t = Table(title=f"gate rules on {result['dataset']} ({result['facts']} facts, gate {result['gate']})")
    for c in ("rule", "own fires: edit", "paraphrase", "neighbour fires", "same ending", "foreign on edit (digit)",
              *(("Efficacy", "Generalization", "Specificity", *loc, "worse (shared last word)", "partial")
                if sim else ())):
        t.add_column(c, justify="left" if c == "rule" else "right")
    for name, r in result["rates"].items():
        row = [name, f"{r['rewrite_own_fires_pct']:.1f}", f"{r['paraphrase_own_fires_pct']:.1f}",
               f"{r['neighbourhood_any_fires_pct']:.1f}", f"{r['neighbourhood_fact_pct']['same_ending']:.1f}",
               f"{r.get('rewrite_foreign_fires', 'n/a')} ({r.get('rewrite_foreign_digit_fires', 'n/a')})"]
        if sim:
            s = sim[name]
            row += [_pct(s.get(k)) for k in ("efficacy", "generalization", "specificity", *loc)]
            w = s.get("neighborhood_worse", {})
            row.append(f"{w.get('total', 'n/a')} ({w.get('shared_last_word', 'n/a')})")
            row.append(str(s["cases"]["partial"]))
        t.add_row(*row)
    Console().print(t)


if __name__ == "__main__":
    main()
