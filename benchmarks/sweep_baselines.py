"""Choose MEMIT's and AlphaEdit's layers, λ and null-space threshold for a small model by measurement.

Edits N CounterFact records from the *training* split (never the records reported elsewhere) in
one batch, from the unedited model, once per configuration, and scores efficacy,
generalisation and locality kept (as ``benchmarks/sweep_neuraldb.py``). Targets depend only on
the last layer and the target hyperparameters, so they are computed once per layer set and
shared (MEMIT's ``--use_cache``); the statistics come from the on-disk cache.

Usage:  python benchmarks/sweep_baselines.py --model smollm2-135m --layer-sets 2-6,3-7,4-8 \\
            --lambdas 5000,15000,50000 --thresholds 1e-2,2e-2,5e-2 --n 100 \\
            --out benchmarks/results/sweep-baselines-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from sweep_neuraldb import scores  # noqa: E402  (benchmarks/ is the script's folder)

from baselines.alphaedit import AlphaEditEditor
from baselines.memit import MEMITEditor
from neuraldb import models
from neuraldb.data import data_file
from neuraldb.facts import load_facts
from neuraldb.files import write_json


def layer_set(text: str) -> tuple[int, ...]:
    a, _, b = text.partition("-")
    return tuple(range(int(a), int(b) + 1)) if b else (int(a),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layer-sets", default="2-6,3-7,4-8")
    ap.add_argument("--lambdas", default="5000,15000,50000")
    ap.add_argument("--thresholds", default="1e-2,2e-2,5e-2")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = str(data_file("counterfact/easyedit_mend/counterfact-train.json"))
    reqs = load_facts(data, limit=args.n)
    lm = models.load(args.model)
    pre = scores(lm, reqs)
    cache: dict[tuple[Any, ...], Any] = {}
    rows: list[dict[str, Any]] = []
    for layers in [layer_set(x) for x in args.layer_sets.split(",")]:
        configs = [(MEMITEditor, {"mom2_update_weight": float(x)}) for x in args.lambdas.split(",")]
        configs += [(AlphaEditEditor, {"nullspace_threshold": float(x)}) for x in args.thresholds.split(",")]
        for cls, extra in configs:
            hp = cls.default_hparams(lm).replace(layers=layers, batch_size=args.n, **extra)
            editor = cls(lm, hp, target_cache=cache)
            t0 = time.time()
            try:
                editor.edit(reqs)
                seconds = time.time() - t0
                post = scores(lm, reqs)
            finally:
                editor.restore()  # the next configuration starts from the unedited model
            kept = [a == b for a, b in zip(pre["locality"], post["locality"])]
            row = {"editor": cls.name, "layers": f"{layers[0]}-{layers[-1]}", **extra,
                   "edit_seconds": round(seconds, 1),
                   "efficacy": 100 * sum(post["efficacy"]) / len(reqs),
                   "generalization": 100 * sum(post["generalization"]) / max(1, len(post["generalization"])),
                   "locality_kept": 100 * sum(kept) / max(1, len(kept))}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every configuration: a stopped sweep keeps its rows
                write_json(args.out, {"model": args.model, "data": data, "n": len(reqs),
                                      "pre": {k: 100 * sum(v) / max(1, len(v)) for k, v in pre.items()},
                                      "stats": hp.stats_config().__dict__, "rows": rows})
    table = Table(title=f"MEMIT / AlphaEdit sweep on {args.model}, {len(reqs)} CounterFact train records, one batch")
    for col in ("editor", "layers", "λ / threshold", "efficacy", "generalization", "locality_kept", "edit_seconds"):
        table.add_column(col)
    for r in rows:
        knob = r.get("mom2_update_weight", r.get("nullspace_threshold"))
        table.add_row(r["editor"], r["layers"], f"{knob:g}", f"{r['efficacy']:.0f}", f"{r['generalization']:.0f}",
                      f"{r['locality_kept']:.0f}", f"{r['edit_seconds']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
