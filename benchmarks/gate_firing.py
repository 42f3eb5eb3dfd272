"""Where NeuralDB's gate fires in generated text, and what the edits do to fluency.

CounterFact's fluency samples 100-token continuations of prompts about the edited subject. This script
edits the first ``--n`` CounterFact records with NeuralDB, samples ``--prompts`` generation prompts per
record (ROME's top-k 5, 100 tokens, seeded) from the edited and from the unedited model, then runs every
edited-model text through the gated model once more with the gate traced. Each token where the gate fires
is counted as:

* ``own_subject``: the record's own fact, at the last token of a mention of its subject (intended);
* ``own_elsewhere``: the record's own fact, at any other token;
* ``other``: another record's fact (a spurious hit: that fact's subject is not in the text's prompt).

Output: JSON with those counts (in the prompt and in the generated part), tokens per text, and the fluency
(mean 2-/3-gram entropy ×100, per case) of the edited and unedited texts — the unedited model is the
baseline of the same run.

Usage:  python benchmarks/gate_firing.py --n 50 --out benchmarks/results/gate_firing.json
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from evals import datasets
from evals.generate import sample_texts
from evals.metrics import fluency_by_case
from neuraldb import models
from neuraldb.files import write_json
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.prompts import subject_last_token


def subject_ends(lm: models.LoadedModel, text: str, subject: str) -> tuple[list[int], set[int]]:
    """Token ids of ``text`` and the indices of the last token of each mention of ``subject``."""
    enc = lm.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ends = {subject_last_token(offsets, m.start(), m.end()) for m in re.finditer(re.escape(subject), text)}
    return list(enc["input_ids"]), ends


@torch.no_grad()
def classify(editor: NeuralDBEditor, text: str, prompt: str, fact: int, subject: str) -> Counter[str]:
    """Counts of fired tokens of ``text`` by kind and by part (prompt / generated)."""
    lm = editor.lm
    ids, ends = subject_ends(lm, text, subject)
    n_prompt = len(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    with editor.tracing() as trace:
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    firing = trace[0]
    counts: Counter[str] = Counter(tokens=len(ids), generated_tokens=len(ids) - n_prompt)
    for pos in torch.nonzero(firing.fired[0]).flatten().tolist():
        j = int(firing.index[0, pos])
        kind = "other" if j != fact else ("own_subject" if pos in ends else "own_elsewhere")
        part = "prompt" if pos < n_prompt else "generated"
        counts[f"{kind}_{part}"] += 1
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
    records = [r for r in datasets.select(ds.records, args.n)]
    lm = models.load(args.model)
    editor = NeuralDBEditor(lm)
    requests = [r.request for r in records]
    editor.edit(requests)
    order = {fid: i for i, fid in enumerate(editor.store.ids)}
    jobs = [(k, p) for k, r in enumerate(records) for p in r.generation_prompts[: args.prompts]]
    prompts = [p for _, p in jobs]
    edited = sample_texts(lm, prompts, seed=args.seed)
    with editor.disabled():
        base = sample_texts(lm, prompts, seed=args.seed)
    total: Counter[str] = Counter()
    for (k, prompt), text in zip(jobs, edited):
        total += classify(editor, text, prompt, order[requests[k].id], requests[k].subject)
    editor.restore()

    def per_case(texts: list[str]) -> list[list[str]]:
        return [[t for (k, _), t in zip(jobs, texts) if k == case] for case in range(len(records))]

    fired = {k: v for k, v in total.items() if "tokens" not in k}
    result = {
        "model": lm.name, "facts": len(requests), "texts": len(jobs), "gamma": editor.hparams.gamma,
        "layer": editor.hparams.layer, "tokens": total["tokens"], "generated_tokens": total["generated_tokens"],
        "fired": dict(sorted(fired.items())),
        "fired_per_100_generated_tokens": {
            kind: 100.0 * sum(v for k, v in fired.items() if k.startswith(kind) and k.endswith("generated"))
            / max(1, total["generated_tokens"]) for kind in ("own_subject", "own_elsewhere", "other")},
        "fluency_edited": fluency_by_case(per_case(edited)), "fluency_unedited": fluency_by_case(per_case(base)),
        "examples": [{"prompt": p, "edited": e, "unedited": b} for (_, p), e, b in list(zip(jobs, edited, base))[:5]],
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "examples"})


if __name__ == "__main__":
    main()
