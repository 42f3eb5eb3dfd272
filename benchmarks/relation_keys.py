"""Can a key tell two questions about the same subject apart? Cosines on KnowEdit training records.

For each KnowEdit WikiData_Counterfact training record, the key (input of the FFN output
projection) of the edit prompt is compared, at several layers, with the key of

* ``relation``: the record's Relation_Specificity prompts (same subject, another relation: the gate
  should *not* fire there),
* ``alias``: its Subject_Aliasing prompts (the same relation of the subject under another name),
* ``prefixed``: the edit prompt behind an unrelated sentence (the same question in context: it
  *should* fire),

read at two places: ``subject`` — the edit prompt's key at the subject's last token (NeuralDB's
key) against the best-matching token of the other prompt (position 0 left out), as the gate takes
the best — and ``last`` — the prompt's last token of both. Output:
per place, kind and layer, the mean, quartiles and share above 0.65 / 0.8 (JSON).

Usage:  python benchmarks/relation_keys.py --n 150 --out benchmarks/results/relation_keys.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from neuraldb import models
from neuraldb.files import write_json
from neuraldb.hooks import capture, stop_after
from neuraldb.models import LoadedModel
from neuraldb.prompts import encode


@torch.no_grad()
def keys(lm: LoadedModel, text: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """Unit keys ``[T, d_ff]`` of every token of ``text`` at each layer."""
    ids = torch.tensor([encode(lm.tokenizer, text).ids], device=lm.device)
    with capture(lm.model, inputs={str(k): lm.arch.w_out_path(k) for k in layers}) as got:
        with stop_after(lm.model, lm.arch.layer_path(max(layers))):
            lm.backbone(input_ids=ids)
    return {k: torch.nn.functional.normalize(got[str(k)][0].float().cpu(), dim=-1) for k in layers}


def subject_last(lm: LoadedModel, prompt: str, subject: str) -> int | None:
    """Index of the subject's last token in ``prompt`` (None when absent or at position 0)."""
    at = prompt.find(subject)
    if at < 0:
        return None
    enc = encode(lm.tokenizer, prompt, (at, at + len(subject)))
    return enc.subject_last if enc.subject_last > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--layers", default="4,6,8,10,12,15")
    ap.add_argument("--out", default="benchmarks/results/relation_keys.json")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    path = Path(os.environ.get("NEURALDB_DATA", "../shared/data")) / "knowedit/wiki_counterfact/train_cf.json"
    records = json.loads(path.read_text(encoding="utf-8"))[: args.n]
    lm = models.load(args.model)
    cos: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        p, s = r["prompt"], r["subject"]
        own, at = keys(lm, p, layers), subject_last(lm, p, s)
        if at is None:
            continue
        others = [("relation", q["prompt"]) for q in r.get("locality", {}).get("Relation_Specificity", [])]
        others += [("alias", q["prompt"]) for q in r.get("portability", {}).get("Subject_Aliasing", [])]
        others.append(("prefixed", "The following is a fact. " + p))
        for kind, q in others:
            k = keys(lm, q, layers)
            for layer in layers:
                cos[("subject", kind, layer)].append(float((k[layer][1:] @ own[layer][at]).max()))
                cos[("last", kind, layer)].append(float(k[layer][-1] @ own[layer][-1]))
    summary = {}
    for (place, kind, layer), v in sorted(cos.items()):
        t = torch.tensor(v)
        summary[f"{place}/{kind}/{layer}"] = {
            "n": len(v), "mean": round(float(t.mean()), 3),
            "quartiles": [round(float(x), 3) for x in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75]))],
            "above_0.65": round(float((t > 0.65).float().mean()), 3),
            "above_0.8": round(float((t > 0.8).float().mean()), 3)}
    write_json(args.out, {"model": lm.name, "records": len(records), "layers": layers, "cosines": summary})
    table = Table(title=f"cosine to the edit prompt's key ({lm.name}, {len(records)} KnowEdit training records)")
    for c in ("read at", "prompt", *(f"layer {k}" for k in layers)):
        table.add_column(c, justify="right")
    for place in ("subject", "last"):
        for kind in ("relation", "alias", "prefixed"):
            table.add_row(place, kind, *(f"{summary[f'{place}/{kind}/{k}']['mean']:.3f}" for k in layers))
    Console().print(table)


if __name__ == "__main__":
    main()
