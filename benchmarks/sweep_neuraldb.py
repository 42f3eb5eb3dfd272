"""Choose NeuralDB's edit layer and γ for a model by measurement.

Edits N CounterFact records from the *training* split (never the records reported elsewhere),
once per layer (the residuals do not depend on γ), then scores every γ on the same edits:

* efficacy: edit prompt prefers target_new over the true target;
* generalisation: rephrased prompt prefers target_new;
* locality kept: the locality prompt keeps its pre-edit preference (own answer vs target_new).

Usage:  python benchmarks/sweep_neuraldb.py --model smollm2-135m --layers 4,6,8,10,12 \
            --gammas 0.5,0.6,0.65,0.7,0.75,0.8 --n 100 --out results/sweep-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from neuraldb import models
from neuraldb.facts import EditRequest, load_facts
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.scoring import mean_logprobs


def prefer(lm: models.LoadedModel, prompts: list[str], a: list[str], b: list[str]) -> list[bool]:
    lp = mean_logprobs(lm, [p for pair in zip(zip(prompts, a), zip(prompts, b)) for p in pair]).tolist()
    return [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]


def scores(lm: models.LoadedModel, reqs: list[EditRequest]) -> dict[str, list[bool]]:
    paraphrased = [r for r in reqs if r.paraphrases]
    local = [(p, a, r.target_new) for r in reqs for p, a in r.locality]
    return {
        "efficacy": prefer(lm, [r.prompt for r in reqs], [r.target_new for r in reqs], [r.target_true for r in reqs]),
        "generalization": prefer(lm, [r.paraphrases[0] for r in paraphrased], [r.target_new for r in paraphrased],
                                 [r.target_true for r in paraphrased]),
        "locality": prefer(lm, [p for p, _, _ in local], [a for _, a, _ in local], [n for _, _, n in local]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--data", default=None, help="CounterFact MEND-format training file")
    ap.add_argument("--layers", default="4,6,8,10,12")
    ap.add_argument("--gammas", default="0.5,0.6,0.65,0.7,0.75,0.8")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--clamp", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = args.data or str(Path(os.environ.get("NEURALDB_DATA", "../shared/data"))
                            / "counterfact/easyedit_mend/counterfact-train.json")
    reqs = load_facts(data, limit=args.n)
    lm = models.load(args.model)
    pre = scores(lm, reqs)
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        base = NeuralDBEditor.default_hparams(lm)
        h = replace(base, layer=layer, **{k: v for k, v in
                                          {"steps": args.steps, "lr": args.lr, "clamp_norm_factor": args.clamp}.items()
                                          if v is not None})
        editor = NeuralDBEditor(lm, h)
        t0 = time.time()
        editor.edit(reqs)
        seconds = time.time() - t0
        for gamma in [float(x) for x in args.gammas.split(",")]:
            editor.store.gamma = gamma
            editor.install()
            post = scores(lm, reqs)
            kept = [a == b for a, b in zip(pre["locality"], post["locality"])]
            row = {"layer": layer, "gamma": gamma, "edit_seconds": round(seconds, 1),
                   "efficacy": 100 * sum(post["efficacy"]) / len(reqs),
                   "generalization": 100 * sum(post["generalization"]) / max(1, len(post["generalization"])),
                   "locality_kept": 100 * sum(kept) / max(1, len(kept)),
                   "mean_nll": float(editor.last_targets.nll.mean())}
            rows.append(row)
            print(json.dumps(row), flush=True)
        editor.restore()
        save(args, data, reqs, editor, pre, rows)  # after every layer: a stopped sweep keeps its rows
    table = Table(title=f"NeuralDB sweep on {args.model}, {len(reqs)} CounterFact train records")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)


def save(args: argparse.Namespace, data: str, reqs: list, editor: NeuralDBEditor, pre: dict, rows: list) -> None:
    if not args.out:
        return
    result = {"model": args.model, "data": data, "n": len(reqs), "hparams": editor.hparams.to_dict(),
              "pre": {k: 100 * sum(v) / max(1, len(v)) for k, v in pre.items()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
