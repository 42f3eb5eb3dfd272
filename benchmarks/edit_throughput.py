"""Facts per second of NeuralDB editing under each residual solver, and what each one's edits do.

In one run, on the same records, each solver (``--hparam solver=…``, :data:`neuraldb.targets.SOLVERS`)
edits the first N records of a benchmark into SmolLM2 with NeuralDB's defaults otherwise:

* ``reference``: methods.md §2.1(a)/§2.2 step 2 — one fact at a time, the rewriting prompts + the
  KL prompt, Adam until the total loss is below ``early_stop_loss`` (MEMIT's rule; in practice
  all ``steps``), a full forward pass (all layers, logits at every position) per step;
* ``batched``: the same rule, facts batched, layers below the edit layer and the prefix before the
  subject computed once, logits only where the loss reads them (the first fast path);
* ``fast``: batched, 4× Adam's step, each fact stopping once its target NLL is below
  ``early_stop_loss``, the loss on the bare prompt and two context templates (the previous default);
* ``fast8``: ``fast`` with 8× Adam's step (the default).

Each edits through :meth:`NeuralDBEditor.edit` (timed: residuals, keys, store), then the edited
model is scored the way ``neuraldb eval`` scores it (efficacy, generalization = paraphrases,
specificity) and restored. Output: JSON with seconds, facts/s and the ratio to the first solver
listed (the reference by default), mean steps, the metrics, and the largest relative difference of
each solver's residuals from the first's; the commit it ran at.

Usage:  python benchmarks/edit_throughput.py --n 100 [--dataset zsre] [--solvers reference,fast8]
        a solver may carry its own hyperparameters: ``fast+lr=0.25+steps=20``
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from evals import datasets
from evals.evaluate import EvalOptions, metrics, score_records
from neuraldb import models
from neuraldb.files import write_json
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.targets import SOLVERS

KEEP = ("efficacy", "generalization", "specificity")
# the reference protocol, the earlier defaults, the default
DEFAULT_SOLVERS = ("reference", "batched", "fast", "fast8")


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "neuraldb", "baselines", "evals"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+uncommitted changes" if dirty else "")


def _number(raw: str) -> int | float | str:
    """``raw`` as an int, else a float, else as given (for a field whose default is None)."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def define(spec: str) -> None:
    """Register a solver variant ``NAME=BASE:FIELD=VALUE;…`` (fields of :class:`Solver`) for this run."""
    name, _, rest = spec.partition("=")
    base, _, changes = rest.partition(":")
    values = {}
    for item in filter(None, changes.split(";")):
        key, _, raw = item.partition("=")
        current = getattr(SOLVERS[base], key)
        values[key] = (None if raw.lower() == "none" else raw if isinstance(current, str)
                       else type(current)(raw) if current is not None else _number(raw))
    SOLVERS[name] = replace(SOLVERS[base], **values)


def run_solver(lm: models.LoadedModel, spec: str, records: list, kind: str, extra: list[str]) -> dict:
    solver, *assignments = spec.split("+")
    editor_hp = NeuralDBEditor.default_hparams(lm).parse([f"solver={solver}", *extra, *assignments])
    editor = NeuralDBEditor(lm, editor_hp)
    requests = [r.request for r in records]
    t0 = time.perf_counter()
    editor.edit(requests)
    seconds = time.perf_counter() - t0
    steps = editor.last_targets.steps.float().mean() if editor.last_targets is not None else float("nan")
    cases = score_records(lm, kind, records, EvalOptions(generation_every=0))
    got = metrics(kind, cases)
    residuals = editor.store.residuals.clone()
    editor.restore()
    return {"name": spec, "solver": solver, "hparams": editor.hparams.to_dict(), "seconds": seconds,
            "facts_per_s": len(records) / seconds, "mean_steps": float(steps),
            **{k: got.get(k) for k in KEEP}, "_residuals": residuals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--dataset", default="counterfact", help="counterfact, zsre, counterfact-train, zsre-train, …")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                    help="comma-separated; the first is the one ratios and residual differences are taken against")
    ap.add_argument("--hparam", action="append", default=[], help="KEY=VALUE for every solver (repeatable)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=BASE:FIELD=VALUE;…",
                    help="a solver variant for a sweep, e.g. 'fast-t5=fast:fit_templates=none' (repeatable)")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/edit_throughput-DATASET-N.json)")
    args = ap.parse_args()
    for spec in args.define:
        define(spec)
    at = commit()  # the code measured: read before the run (later commits must not be credited with it)
    ds = datasets.load(args.dataset)
    records = datasets.select(ds.records, args.n)
    lm = models.load(args.model)
    rows = [run_solver(lm, spec, records, ds.spec.kind, args.hparam) for spec in args.solvers.split(",")]
    first = rows[0]
    for row in rows:
        row["speedup"] = row["facts_per_s"] / first["facts_per_s"]
        diff = (row["_residuals"] - first["_residuals"]).norm(dim=1) / first["_residuals"].norm(dim=1).clamp(min=1e-12)
        row["max_rel_residual_diff"] = float(diff.max())
    for row in rows:
        del row["_residuals"]
    result = {
        "benchmark": "edit_throughput", "model": args.model, "dataset": args.dataset, "n_facts": len(records),
        "commit": at, "against": first["name"],
        "solver_definitions": {name: asdict(SOLVERS[name]) for name in {r["solver"] for r in rows}},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "solvers": rows,
    }
    out = Path(args.out or f"benchmarks/results/edit_throughput-{args.dataset}-{args.n}.json")
    write_json(out, result)
    for row in rows:
        print(f"{row['name']:>16}  {row['seconds']:8.1f} s  {row['facts_per_s']:.3f} facts/s  ×{row['speedup']:.2f}  "
              f"steps {row['mean_steps']:.1f}  eff {row['efficacy']:.1f}  gen {row['generalization']:.1f}  "
              f"spec {row['specificity']:.1f}  Δres {row['max_rel_residual_diff']:.2e}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
