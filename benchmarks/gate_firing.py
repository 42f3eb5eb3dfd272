"""Where NeuralDB's gate fires in generated text, and what the edits do to fluency.

CounterFact's fluency samples 100-token continuations of prompts about the edited subject. This script
edits the first ``--n`` CounterFact records with NeuralDB, samples the first ``--prompts`` generation
prompts of each record (ROME's top-k 5, 100 tokens, seeded) from the edited and from the unedited model,
then runs the edited model's sampled token ids through the gated model once more with the gate traced.
Each token where the gate fires is counted as:

* ``own_subject``: the record's own fact, at the last token of a mention of its subject (intended);
* ``own_elsewhere``: the record's own fact, at any other token;
* ``other_mentioned``: another record's fact whose subject occurs in the text;
* ``other_spurious``: another record's fact whose subject does not occur in the text.

Output: JSON with those counts (in the prompt and in the generated part, totals over all texts) and the
fluency (mean 2-/3-gram entropy ×100, per case) of the edited and unedited texts — the unedited model is
the baseline of the same run.

Usage:  python benchmarks/gate_firing.py --n 50 --out benchmarks/results/gate_firing.json
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from evals import datasets
from evals.generate import sample_ids, sample_text
from evals.metrics import fluency_by_case
from neuraldb import models
from neuraldb.files import write_json
from neuraldb.neuraldb_editor import NeuralDBEditor

KINDS = ("own_subject", "own_elsewhere", "other_mentioned", "other_spurious")


def mention_ends(tok: object, ids: list[int], subject: str) -> set[int]:
    """Indices of the last token of each mention of ``subject`` in the decoded ``ids``."""
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]  # type: ignore[attr-defined]
    text = tok.decode(ids)  # type: ignore[attr-defined]
    return {next(i for i, e in enumerate(ends) if e >= m.end()) for m in re.finditer(re.escape(subject), text)}


@torch.no_grad()
def classify(editor: NeuralDBEditor, prompt_ids: list[int], new_ids: list[int], fact: int,
             subjects: list[str]) -> Counter[str]:
    """Counts of fired tokens of ``prompt_ids + new_ids`` by kind and by part (prompt / generated)."""
    lm = editor.lm
    ids = prompt_ids + new_ids
    text = lm.tokenizer.decode(ids)
    own_ends = mention_ends(lm.tokenizer, ids, subjects[fact])
    with editor.tracing() as trace:
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    firing = trace[0]
    counts: Counter[str] = Counter(tokens=len(ids), generated_tokens=len(new_ids))
    for pos in torch.nonzero(firing.fired[0]).flatten().tolist():
        j = int(firing.index[0, pos])
        if j == fact:
            kind = "own_subject" if pos in own_ends else "own_elsewhere"
        else:
            kind = "other_mentioned" if subjects[j] in text else "other_spurious"
        counts[f"{kind}_{'prompt' if pos < len(prompt_ids) else 'generated'}"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50, help="CounterFact records edited")
    ap.add_argument("--prompts", type=int, default=2, help="generation prompts sampled per record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/gate_firing.json")
    args = ap.parse_args()
    ds = datasets.load("counterfact")
    records = datasets.select(ds.records, args.n)
    lm = models.load(args.model)
    editor = NeuralDBEditor(lm)
    requests = [r.request for r in records]
    editor.edit(requests)
    by_id = {r.id: r for r in requests}
    subjects = [by_id[fid].subject for fid in editor.store.ids]
    order = {fid: i for i, fid in enumerate(editor.store.ids)}
    jobs = [(k, p) for k, r in enumerate(records) for p in r.generation_prompts[: args.prompts]]
    prompts = [p for _, p in jobs]
    edited_ids = sample_ids(lm, prompts, seed=args.seed)
    with editor.disabled():
        base_ids = sample_ids(lm, prompts, seed=args.seed)
    total: Counter[str] = Counter()
    for (k, _), (row, new) in zip(jobs, edited_ids):
        total += classify(editor, row, new, order[requests[k].id], subjects)
    editor.restore()
    edited, base = ([sample_text(lm, r, n) for r, n in runs] for runs in (edited_ids, base_ids))

    def per_case(texts: list[str]) -> list[list[str]]:
        return [[t for (k, _), t in zip(jobs, texts) if k == case] for case in range(len(records))]

    fired = {k: v for k, v in total.items() if "tokens" not in k}
    result = {
        "model": lm.name, "facts": len(requests), "texts": len(jobs), "gamma": editor.hparams.gamma,
        "layer": editor.hparams.layer, "tokens": total["tokens"], "generated_tokens": total["generated_tokens"],
        "fired": dict(sorted(fired.items())),
        "fired_per_100_generated_tokens": {
            kind: 100.0 * total[f"{kind}_generated"] / max(1, total["generated_tokens"]) for kind in KINDS},
        "fluency_edited": fluency_by_case(per_case(edited)), "fluency_unedited": fluency_by_case(per_case(base)),
        "examples": [{"prompt": p, "edited": e, "unedited": b} for (_, p), e, b in list(zip(jobs, edited, base))[:5]],
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "examples"})


if __name__ == "__main__":
    main()
