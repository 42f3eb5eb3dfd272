"""Results of an evaluation run as tables (Rich, Markdown), a PNG of metrics against the number
of edits, and the regression check CI uses.

A result is the JSON written by ``neuraldb eval`` / ``compare``: ``pre`` and ``editors[name]``
each carry ``points`` = {N: {metric: value or None}}. Tables follow the NeuralDB paper's layout
(methods brief §6.1): one row per method, "a → b" when several N were evaluated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from neuraldb import distributed

COLUMNS = {
    "counterfact": [("efficacy", "Efficacy"), ("generalization", "Generalization"), ("specificity", "Specificity"),
                    ("fluency", "Fluency"), ("consistency", "Consistency"), ("score", "Score")],
    "zsre": [("efficacy", "Efficacy"), ("generalization", "Generalization"), ("specificity", "Specificity"),
             ("score", "Score")],
    "mquake": [("edit_wise", "Edit-wise"), ("instance_wise", "Instance-wise"), ("multihop", "Multi-hop"),
               ("multihop_cot", "Multi-hop CoT")],
}
# A data set with KnowEdit probes (evals.knowedit) gets these columns after its own (no consistency).
KNOWEDIT_COLUMNS = [("edit_succ", "Edit Succ."), ("portability_subject_aliasing", "Port. alias"),
                    ("portability_reasoning", "Port. reason"), ("portability_logical_generalization", "Port. logic"),
                    ("locality_relation_specificity", "Loc. relation"), ("locality_forgetfulness", "Loc. forget")]
NAMES = {"neuraldb": "NeuralDB", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


def columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, label) of the table of ``result``: its kind's, and KnowEdit's when it has them."""
    cols = COLUMNS[result["dataset"]["kind"]]
    pre = result["pre"]["points"] if result.get("pre") else {}
    if any("edit_succ" in point for point in pre.values()):
        own = [c for c in cols if c[0] not in ("consistency", "score", "fluency")]
        return own + KNOWEDIT_COLUMNS + [("fluency", "Fluency")]
    return cols


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: Pre-edited, then each editor; cells "a → b" over the evaluated N."""
    cols = columns(result)
    ns = [str(n) for n in result["protocol"]["n"]]
    entries = [("Pre-edited", result["pre"])] + [(NAMES.get(k, k), v) for k, v in result["editors"].items()]
    out = []
    for name, entry in entries:
        pts = entry["points"]
        out.append([name] + [" → ".join(_fmt(pts[n].get(key)) for n in ns if n in pts) for key, _ in cols])
    return ["Method"] + [label for _, label in cols], out


def title(result: dict[str, Any]) -> str:
    p, d = result["protocol"], result["dataset"]
    ns = " → ".join(map(str, p["n"]))
    if d["kind"] == "mquake":
        return f"{d['name']} on {result['model']['name']}: {ns} instances, edited in groups of {p['batch_size']}"
    mode = "sequential" if p["sequential"] else "one batch at a time, restored"
    return f"{d['name']} on {result['model']['name']}: {ns} edits, batches of {p['batch_size']} ({mode})"


def rich_table(result: dict[str, Any]) -> Table:
    header, body = rows(result)
    table = Table(title=title(result))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in body:
        table.add_row(*r)
    return table


def timings(result: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(method, edit seconds, evaluation seconds) per editor."""
    return [(NAMES.get(k, k), v["edit_seconds"], v["eval_seconds"]) for k, v in result["editors"].items()]


def markdown(result: dict[str, Any]) -> str:
    header, body = rows(result)
    lines = [f"# {title(result)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    units = ("MQuAKE accuracies ×100 (instances; edit-wise over rewrites)" if result["dataset"]["kind"] == "mquake"
             else "Metrics ×100 (fluency: weighted 2-/3-gram entropy ×100)")
    lines += ["", f"{units}; n/a = not available for this data.", "",
              "| method | edit time (s) | evaluation time (s) |", "|---|---:|---:|"]
    lines += [f"| {m} | {e:.0f} | {v:.0f} |" for m, e, v in timings(result)]
    lines += _general_markdown(result)
    d, p, m = result["dataset"], result["protocol"], result["model"]
    which = "first" if p["sample_seed"] is None else f"seeded sample (seed {p['sample_seed']}) of"
    lines += ["", "## Protocol", "",
              f"* model: {m['name']} (fingerprint `{m['fingerprint']}`)",
              f"* dataset: {d['name']} — " + ", ".join(f"`{f['path']}` sha256 `{f['sha256'][:16]}…`"
                                                       for f in d["files"]),
              f"* records: {which} {d['selected']} (ids sha256 `{d['records_sha256'][:16]}…`)",
              f"* {'instances' if d['kind'] == 'mquake' else 'edits'}: {', '.join(map(str, p['n']))}; "
              f"batch size {p['batch_size']}; evaluation {p['evaluation']}",
              f"* evaluation options: {result['evaluation']}",
              f"* versions: {result['versions']}"]
    for name, entry in result["editors"].items():
        lines.append(f"* {name} hyperparameters: `{entry['hparams']}`")
    if "mquake" in result:  # its report, one heading level down
        sub = markdown(result["mquake"]).splitlines()
        lines += [""] + [("#" + line) if line.startswith("#") else line for line in sub]
    return "\n".join(lines) + "\n"


def _general_markdown(result: dict[str, Any]) -> list[str]:
    """lm-eval results (value ± stderr) per task and metric, one column per row of the result."""
    runs = [("Pre-edited", result["pre"].get("general"))] + [
        (NAMES.get(k, k), v.get("general")) for k, v in result["editors"].items()]
    runs = [(name, g) for name, g in runs if g]
    if not runs:
        return []
    lines = ["", "## General abilities (lm-eval)", "", "| task | metric | " + " | ".join(n for n, _ in runs) + " |",
             "|---|---|" + "---:|" * len(runs)]
    for task, scores in runs[0][1].items():
        if "unavailable" in scores:
            lines.append(f"| {task} | — | " + " | ".join("unavailable" for _ in runs) + " |")
            continue
        for metric in (k for k in scores if k != "n" and not k.endswith("_stderr")):
            cells = []
            for _, g in runs:
                v, e = g.get(task, {}).get(metric), g.get(task, {}).get(f"{metric}_stderr")
                cells.append("n/a" if v is None else f"{v:.4f}" + (f" ± {e:.4f}" if e is not None else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict[str, Any], path: Path) -> bool:
    """PNG of each metric against the number of edits; False (nothing written) with fewer than two N."""
    ns = [str(n) for n in result["protocol"]["n"]]
    if len(ns) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(k, label) for k, label in columns(result)
            if any(e["points"].get(n, {}).get(k) is not None for e in result["editors"].values() for n in ns)]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.0), squeeze=False)
    x = [int(n) for n in ns]
    for ax, (key, label) in zip(axes[0], cols):
        pre = [result["pre"]["points"][n].get(key) for n in ns]
        if all(v is not None for v in pre):
            ax.plot(x, pre, "k--", label="Pre-edited")
        for name, entry in result["editors"].items():
            ax.plot(x, [entry["points"][n].get(key) for n in ns], "o-", label=NAMES.get(name, name))
        ax.set_title(label)
        ax.set_xlabel("edits")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if distributed.is_main():  # under torchrun only rank 0 writes
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    plt.close(fig)
    return True


COMPARABLE = [("model", "model", "fingerprint"), ("dataset", "dataset", "name"), ("data files", "dataset", "files"),
              ("records", "dataset", "records_sha256"), ("protocol", "protocol", "n"),
              ("batch size", "protocol", "batch_size"), ("protocol", "protocol", "sequential")]
GATED = ("efficacy", "generalization", "specificity", "fluency", "consistency",
         "edit_wise", "instance_wise", "multihop", "multihop_cot", "edit_succ", "portability_subject_aliasing",
         "portability_reasoning", "portability_logical_generalization", "locality_relation_specificity",
         "locality_forgetfulness")


def check(result: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> list[str]:
    """Each metric of ``baseline`` (editors and N it has) that ``result`` lost more than
    ``tolerance`` points on, or does not report, as one line; empty when the result holds. A
    baseline of another model, dataset, record selection or protocol is itself a failure."""
    result = json.loads(json.dumps(result))  # as saved: tuples become lists
    failures = [f"baseline differs in {what}: {baseline.get(a, {}).get(b)} vs {result.get(a, {}).get(b)}"
                for what, a, b in COMPARABLE if baseline.get(a, {}).get(b) != result.get(a, {}).get(b)]
    for name, entry in baseline.get("editors", {}).items():
        got = result.get("editors", {}).get(name)
        if got is None:
            failures.append(f"{name}: not in the result")
            continue
        for n, base_metrics in entry["points"].items():
            now = got["points"].get(n)
            if now is None:
                failures.append(f"{name}@{n}: not evaluated")
                continue
            for key in GATED:
                want = base_metrics.get(key)
                if want is None:
                    continue
                have = now.get(key)
                if have is None:
                    failures.append(f"{name}@{n} {key}: unavailable (baseline {want:.1f})")
                elif have < want - tolerance:
                    failures.append(f"{name}@{n} {key}: {have:.1f} < baseline {want:.1f} − {tolerance:g}")
    if "mquake" in baseline:
        failures += [f"MQuAKE: {f}" for f in check(result.get("mquake") or {}, baseline["mquake"], tolerance)]
    return failures
