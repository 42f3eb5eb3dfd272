"""Recompute a saved result's metrics from its per-case scores, with and without the prompts that are
another edit's prompt (``evals.evaluate.edited_probes``), for results written before that rule.

    python benchmarks/rescore.py benchmarks/results/knowedit-cf-500-relation.json

Per-case scores are kept for the largest N only, so only that point is recomputed; the model is not
loaded. Prints one Rich table per rule and writes ``RESULT.rescored.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evals import datasets
from evals.evaluate import EvalOptions, metrics
from evals.protocol import Protocol, dropped, select_records
from evals.runner import cases_path, read_result
from neuraldb.files import write_json

SHOWN = ("efficacy", "generalization", "specificity", "edit_succ", "locality_relation_specificity",
         "locality_forgetfulness")


def rescore(result: dict[str, Any], cases: dict[str, Any]) -> dict[str, Any]:
    """``{"n", "left_out", "rows": {rule: {row: metrics}}}`` at the result's largest N."""
    p = result["protocol"]
    protocol = Protocol(result["dataset"]["name"], tuple(p["n"]), p["batch_size"], p["sequential"], p["sample_seed"])
    ds = datasets.load(protocol.dataset)
    records = select_records(ds, protocol)
    ids = [r.request.id for r in records]
    if [c["id"] for c in cases["pre"]] != ids:
        raise SystemExit("the per-case file's records are not the protocol's first N: another data file?")
    n = protocol.n[-1]
    kind = result["dataset"]["kind"]
    edited = dropped(protocol, records, EvalOptions(), n) or {}
    out: dict[str, Any] = {"n": n, "left_out": sum(len(a) + len(b) for a, b in edited.values()), "rows": {}}
    for keep in (True, False):
        left = None if keep else edited
        rule = "counted (before)" if keep else "left out (now)"
        out["rows"][rule] = {row: metrics(kind, got, None if row == "pre" else cases["pre"], left)
                             for row, got in cases.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result = read_result(a.result, "result")
    cases = json.loads(cases_path(a.result).read_text(encoding="utf-8"))
    got = rescore(result, cases)
    console = Console()
    for rule, rows in got["rows"].items():
        table = Table(title=f"{a.result.name} at {got['n']} edits: {got['left_out']} neighbourhood / locality "
                            f"prompts are another edit's prompt, {rule}")
        table.add_column("row")
        for m in SHOWN:
            table.add_column(m, justify="right")
        for row, m in rows.items():
            table.add_row(row, *("n/a" if m.get(k) is None else f"{m[k]:.1f}" for k in SHOWN))
        console.print(table)
    write_json(a.out or a.result.with_name(a.result.name.removesuffix(".json") + ".rescored.json"),
               got | {"source": str(a.result)})


if __name__ == "__main__":
    main()
