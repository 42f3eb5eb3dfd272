"""Facts per second of NeuralDB editing: our batched implementation vs the reference protocol.

Both optimise the same residuals with the same loss, hyperparameters and stopping rule on the
same facts, in one run:

* reference: methods.md §2.1(a)/§2.2 step 2 — one fact at a time, 6 rewriting prompts + the KL
  prompt, up to 25 Adam steps, a full forward pass (all layers, logits at every position) per step;
* ours: :func:`neuraldb.targets.optimize` — facts batched, layers below the edit layer and the
  prefix before the subject computed once, logits only where the loss reads them.

Each side's residuals are then written into a store and scored the same way (efficacy:
P(target_new) > P(target_true) on the edit prompt). Output: JSON with facts/s, the ratio and
both efficacies.

Usage:  python benchmarks/edit_throughput.py --n 100 --out results/edit_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from neuraldb import models
from neuraldb.facts import load_facts
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.scoring import preferences
from neuraldb.targets import Targets, optimize, optimize_full_forward


def efficacy(editor: NeuralDBEditor, requests, targets: Targets) -> float:
    editor.store.remove(editor.store.ids)
    editor.store.add(requests, targets.keys, targets.delta)
    editor.install()
    scores = preferences(editor.lm, requests)
    editor.restore()
    return 100.0 * sum(scores.edit_prefers_new) / len(requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--data", default=None, help="fact file (default: CounterFact edit split in $NEURALDB_DATA)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default="results/edit_throughput.json")
    args = ap.parse_args()
    data = args.data or str(Path(os.environ.get("NEURALDB_DATA", "../shared/data"))
                            / "counterfact/easyedit_mend/counterfact-edit.json")
    requests = load_facts(data, limit=args.n)
    lm = models.load(args.model)
    editor = NeuralDBEditor(lm)
    h = editor.hparams.replace(batch_size=args.batch_size)
    templates = editor.templates()
    cfg = h.target_config()

    t0 = time.perf_counter()
    ours = optimize(lm, requests, templates, cfg, batch_size=h.batch_size)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = optimize_full_forward(lm, requests, templates, cfg)
    t_ref = time.perf_counter() - t0

    result = {
        "benchmark": "edit_throughput", "model": args.model, "data": data, "n_facts": len(requests),
        "hparams": h.to_dict(), "templates": templates,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "reference": {"seconds": t_ref, "facts_per_s": len(requests) / t_ref,
                      "mean_steps": float(ref.steps.float().mean()), "efficacy": efficacy(editor, requests, ref)},
        "ours": {"seconds": t_ours, "facts_per_s": len(requests) / t_ours,
                 "mean_steps": float(ours.steps.float().mean()), "efficacy": efficacy(editor, requests, ours)},
        "max_rel_residual_diff": float(((ours.delta - ref.delta).norm(dim=1) / ref.delta.norm(dim=1)).max()),
    }
    result["speedup"] = result["ours"]["facts_per_s"] / result["reference"]["facts_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("reference", "ours", "speedup", "max_rel_residual_diff")}, indent=2))


if __name__ == "__main__":
    main()
