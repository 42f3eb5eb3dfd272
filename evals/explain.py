"""Why a NeuralDB result scored as it did: which stored fact fired on which scored prompt.

For a saved ``eval`` / ``compare`` result with a NeuralDB row, :func:`explain` rebuilds the store's
keys and thresholds (with ``gate=relation`` also the relation keys) as that row's editor built them
(same records, hyperparameters and context templates; keys and radii need no residual
optimisation: :meth:`NeuralDBEditor.gate_keys`), traces every scored sequence up to the layer where
the gate decides (:mod:`evals.firing`) and, with the per-case file, relates each score change to the
firing behind it:

* per family (edit prompt, paraphrases, neighbourhood / locality prompts): prompts scored, prompts
  where some fact fired, by kind — the record's ``own`` fact (edit and paraphrase prompts), a fact
  whose subject the prompt mentions (``same_subject``: on KnowEdit's relation-specificity prompts
  the record's own fact asked another relation), a fact whose subject ends in the fired token
  (``shared_last_word``; the relation gate fires at the question's end, so there: whose subject's
  last word the prompt holds), any ``other``;
* neighbourhood prompts that got worse (CounterFact: flipped from the true to the new object;
  ZsRE: lower token accuracy), by the kind of the firing behind them (``none``: nothing fired, so
  the change is float noise — the gate returns the base output bit for bit there);
* edit prompts the row missed, split into "own fact did not fire" and "fired, not enough";
* examples of flipped prompts with the fact that fired and the token it fired on.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from evals import datasets
from evals.firing import Group, kinds, scored_rows, trace_groups
from evals.protocol import records_sha
from neuraldb.models import LoadedModel
from neuraldb.neuraldb_editor import GateKeys, NeuralDBEditor, NeuralDBHparams

LABEL = {"mentioned": "same_subject", "same_ending": "shared_last_word", "own": "own", "unrelated": "other"}
ORDER = ("same_subject", "shared_last_word", "own", "other")  # the cause named when several fired


def check(result: dict[str, Any], editor: str = "neuraldb") -> None:
    """Raise ValueError (one line) unless ``result`` holds what :func:`explain` reads: a NeuralDB
    row ``editor`` with its hyperparameters, a sequential protocol with ``n``, the dataset's name and
    records hash. Cheap: run it before loading the model."""
    rows = result.get("editors")
    if not isinstance(rows, dict):
        raise ValueError("not an eval / compare result: no editors table")
    row = rows.get(editor)
    if not isinstance(row, dict):
        raise ValueError(f"the result has no {editor!r} row (rows: {', '.join(rows) or 'none'})")
    hp = row.get("hparams")
    if not isinstance(hp, dict) or "layer" not in hp or "gamma" not in hp:
        raise ValueError(f"row {editor!r} is not a NeuralDB row (its hyperparameters have no layer and gamma)")
    proto, d = result.get("protocol"), result.get("dataset")
    if not isinstance(proto, dict) or not isinstance(proto.get("n"), list) or not proto["n"]:
        raise ValueError("the result has no protocol with a list of edit counts n")
    if not proto.get("sequential", False):
        raise ValueError("explain needs a sequential run (with --no-sequential no store held all the facts at once)")
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("records_sha256"), str):
        raise ValueError("the result does not name its dataset and records hash")


def store_of(lm: LoadedModel, result: dict[str, Any], editor: str = "neuraldb") -> tuple[list, NeuralDBEditor,
                                                                                       GateKeys]:
    """(records, an editor with the row's hparams, what its store would hold to decide firing) of
    ``result``'s NeuralDB row."""
    check(result, editor)
    hp = NeuralDBHparams.from_saved(result["editors"][editor]["hparams"])
    hp.validate(lm)
    proto, d = result["protocol"], result["dataset"]
    records = datasets.select(datasets.load(d["name"]).records, max(proto["n"]), proto.get("sample_seed"))
    if records_sha(records) != d["records_sha256"]:
        raise ValueError(f"the records of {d['name']} here are not the ones the result was run on")
    ed = NeuralDBEditor(lm, hp)
    return records, ed, ed.gate_keys([r.request for r in records])


def why_fired(group: Group, own: int, theta: torch.Tensor, prompt: str, subjects: list[str], tok: Any,
         relation: bool) -> set[str]:
    return {LABEL[k.rsplit("_", 1)[0]] for t in group
            for k in kinds(t, own, theta, prompt, subjects, tok, ending_anywhere=relation)}


def cause_of(why: set[str]) -> str:
    return next((k for k in ORDER if k in why), "none")


def worse(kind: str, before: Any, after: Any, tol: float = 1e-4) -> bool:
    if kind == "zsre":
        return after < before - tol
    (n0, t0), (n1, t1) = before, after
    return t0 > n0 and not t1 > n1


def _hit(kind: str, score: Any) -> bool:
    return score >= 1.0 if kind == "zsre" else score[0] > score[1]


def explain(lm: LoadedModel, result: dict[str, Any], cases: dict[str, Any] | None = None,
            editor: str = "neuraldb", n_examples: int = 12) -> dict[str, Any]:
    """The firing analysis of ``result``'s NeuralDB row (see the module docstring) as JSON."""
    records, ed, gk = store_of(lm, result, editor)
    requests = [r.request for r in records]
    kind = result["dataset"]["kind"]
    m, tok = len(requests), lm.tokenizer
    relation = gk.relation is not None
    try:
        g, layer, theta = ed.trace_gate(gk)
        rows = scored_rows(kind, requests)
        traced = {fam: trace_groups(lm, g, layer, v, m) for fam, v in rows.items()}
    finally:
        ed.restore()
    subjects = [r.subject for r in requests]
    prompts = {fam: [[p for j, p, _ in v if j == i] for i in range(m)] for fam, v in rows.items()}
    gamma = float(result["editors"][editor]["hparams"]["gamma"])
    out: dict[str, Any] = {"model": lm.name, "dataset": result["dataset"]["name"], "facts": m, "layer": layer,
                           "gate": ed.hparams.gate,
                           "thresholds": {"min": float(gk.theta.min()), "mean": float(gk.theta.mean()),
                                          "raised": int((gk.theta > gamma).sum())}, "families": {}}
    # on neighbourhood prompts the cause is what matters (own=-1): the record's own fact firing on
    # another question about its subject is same_subject, on a look-alike shared_last_word
    why = {fam: [[why_fired(gr, -1 if fam == "neighborhood" else i, theta, p, subjects, tok, relation)
                  for gr, p in zip(traced[fam][i], prompts[fam][i])] for i in range(m)] for fam in rows}
    for fam in rows:
        flat = [w for ws in why[fam] for w in ws]
        out["families"][fam] = {"prompts": len(flat), "fired": sum(bool(w) for w in flat),
                                "fired_by_kind": {k: sum(k in w for w in flat) for k in ORDER}}
    if cases is not None:
        out |= _against_cases(kind, cases, editor, requests, traced, why, theta, tok, n_examples)
    return out


def _against_cases(kind: str, cases: dict[str, Any], editor: str, requests: list, traced: dict, why: dict,
                   theta: torch.Tensor, tok: Any, n_examples: int) -> dict[str, Any]:
    for row in ("pre", editor):
        if row not in cases:
            raise ValueError(f"the per-case file has no {row!r} rows")
    pre = {c["id"]: c for c in cases["pre"]}
    post = {c["id"]: c for c in cases[editor]}
    if missing := next((r.id for r in requests if r.id not in pre or r.id not in post), None):
        raise ValueError(f"the per-case file has no case {missing!r}: it is not this result's")
    flipped: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    examples = []
    for i, r in enumerate(requests):
        if not _hit(kind, post[r.id]["rewrite"]):
            missed["own_fact_did_not_fire" if "own" not in why["rewrite"][i][0] else "fired_not_enough"] += 1
        for j, (before, after) in enumerate(zip(pre[r.id]["neighborhood"], post[r.id]["neighborhood"])):
            if not worse(kind, before, after):
                continue
            cause = cause_of(why["neighborhood"][i][j])
            flipped[cause] += 1
            if len(examples) < n_examples and cause != "none":
                hits = [(t, p) for t in traced["neighborhood"][i][j] for p in t.scored()
                        if float(t.cosine[p]) > float(theta[t.index[p]])]  # fired, under any scored answer
                if not hits:
                    continue
                t, pos = max(hits, key=lambda h: float(h[0].cosine[h[1]]))
                f = requests[int(t.index[pos])]
                examples.append({"record": r.id, "prompt": r.locality[j][0], "answer": r.locality[j][1],
                                 "cause": cause, "fired_at": tok.decode([t.ids[pos]]), "fired_fact": f.id,
                                 "fired_subject": f.subject, "fired_new_target": f.target_new,
                                 "cosine": round(float(t.cosine[pos]), 3)})
    return {"neighborhood_worse": {"total": sum(flipped.values())} | {k: flipped[k] for k in (*ORDER, "none")},
            "rewrite_missed": {"total": sum(missed.values())} | dict(sorted(missed.items())), "examples": examples}


def tables(explained: dict[str, Any]) -> list[Any]:
    """Rich tables of :func:`explain`'s output: firing by family, then worse neighbours by cause."""
    from rich.table import Table

    t = Table(title=f"which stored fact fired: {explained['dataset']}, {explained['facts']} facts "
                    f"(layer {explained['layer']}; thresholds raised above γ: {explained['thresholds']['raised']})")
    for col in ("family", "prompts", "fired", *ORDER):
        t.add_column(col, justify="left" if col == "family" else "right")
    for fam, r in explained["families"].items():
        t.add_row(fam, str(r["prompts"]), str(r["fired"]), *(str(r["fired_by_kind"][k]) for k in ORDER))
    out = [t]
    if "neighborhood_worse" in explained:
        w, miss = explained["neighborhood_worse"], explained["rewrite_missed"]
        u = Table(title="neighbourhood prompts made worse, by the firing behind them; edit prompts missed")
        for col in ("worse", *ORDER, "none", "edit missed", "own did not fire", "fired, not enough"):
            u.add_column(col, justify="right")
        u.add_row(str(w["total"]), *(str(w[k]) for k in (*ORDER, "none")), str(miss["total"]),
                  str(miss.get("own_fact_did_not_fire", 0)), str(miss.get("fired_not_enough", 0)))
        out.append(u)
        if explained["examples"]:
            x = Table(title="examples")
            for col in ("prompt", "answer", "cause", "fired on", "fact's subject → new", "cos"):
                x.add_column(col)
            for e in explained["examples"]:
                x.add_row(e["prompt"], e["answer"], e["cause"], repr(e["fired_at"]),
                          f"{e['fired_subject']} →{e['fired_new_target']}", f"{e['cosine']:.3f}")
            out.append(x)
    return out
