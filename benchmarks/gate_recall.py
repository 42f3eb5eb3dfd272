"""Does the inverted file (``--hparam search=ivf``, :mod:`neuraldb.index`) keep the gate's decisions?
Real subject keys of every fact available, padded with keys of real text, probed by real tokens.

Stored: the last-token keys of every form of the facts of ``--datasets`` (:func:`neuraldb.keys.token_keys`
at the edit layer, one forward per prompt, no residual optimisation), padded to ``--pad`` keys with
the keys of WikiText tokens (each a stand-in form: tokens of real sentences are where false fires come
from). Queries: held-out WikiText tokens, and every token of the stored facts' edit prompts and
paraphrases. For each query token the exact rule scores every stored form; the index scores the
forms of the lists the token probes. A token's decision is *kept* when every form whose last-token
cosine exceeds γ is among the probed ones — then the gate's decision (fired or not, which fact) is
the exact one whatever the earlier subject tokens say (a form below γ never fires) — and *top-1 kept*
when at least the best form above γ is probed. Reported per query kind, for each ``--nprobe``.

Usage:  python benchmarks/gate_recall.py --pad 100000 --out benchmarks/results/gate_recall.json
        python benchmarks/gate_recall.py --datasets counterfact --limit 200 --pad 20000   (a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from baselines.covariance import StatsConfig, corpus_windows
from evals import datasets
from neuraldb import models
from neuraldb.hooks import capture, stop_after
from neuraldb.index import KeyIndex
from neuraldb.keys import token_keys
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.templates import context_templates

DATASETS = "counterfact-mend,zsre,zsre-train,knowedit-cf,knowedit-cf-train,knowedit-zsre"


def text_keys(lm: models.LoadedModel, layer: int, windows: list[list[int]], batch: int = 16) -> torch.Tensor:
    """Unit keys ``[tokens, d_ff]`` at ``layer`` of every token but each window's first (the sink)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i : i + batch], device=lm.device)
            with capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)}) as got, \
                    stop_after(lm.model, lm.arch.layer_path(layer)):
                lm.backbone(input_ids=ids)
            out.append(got["k"][:, 1:].reshape(-1, got["k"].shape[-1]).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def prompt_keys(lm: models.LoadedModel, layer: int, prompts: list[str]) -> torch.Tensor:
    """Unit keys of every token of ``prompts`` but the first, one prompt per forward."""
    tok = lm.tokenizer
    return text_keys(lm, layer, [tok(p)["input_ids"] for p in prompts], batch=1)


def decisions(queries: torch.Tensor, stored: torch.Tensor, index: KeyIndex, gamma: float) -> dict[str, float]:
    """Share of query tokens whose forms above γ are all probed (kept) and whose best one is (top-1)."""
    kept = top = firing = 0
    for i in range(0, len(queries), 256):
        q = queries[i : i + 256]
        cos = q @ stored.T
        above = cos > gamma
        probe = (q @ index.centroids.T).topk(min(index.nprobe, len(index.centroids)), dim=-1).indices
        lists = torch.zeros(len(q), len(index.centroids), dtype=torch.bool).scatter_(1, probe, True)
        probed = lists[:, index.assignment]  # [q, n]: each stored key's list was probed by the token
        kept += int((~above | probed).all(1).sum())
        best = cos.argmax(1)
        fires = above.any(1)
        firing += int(fires.sum())
        top += int((~fires | probed[torch.arange(len(q)), best]).sum())
    n = len(queries)
    return {"tokens": n, "firing_tokens": firing, "kept": kept / n, "top1_kept": top / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--datasets", default=DATASETS)
    ap.add_argument("--limit", type=int, default=0, help="facts per data set (0: all)")
    ap.add_argument("--pad", type=int, default=100_000, help="stored keys in all, WikiText tokens filling up")
    ap.add_argument("--queries", type=int, default=20_000, help="held-out WikiText query tokens")
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--out", default="results/gate_recall.json")
    args = ap.parse_args()
    lm = models.load(args.model)
    h = NeuralDBEditor.default_hparams(lm)
    templates = context_templates(lm, h.n_templates, h.template_length, h.seed)
    requests = []
    for name in args.datasets.split(","):
        records = datasets.load(name).records
        requests += [r.request for r in (records[: args.limit] if args.limit else records)]
    t0 = time.perf_counter()
    forms = []
    for i in range(0, len(requests), 500):
        forms.append(token_keys(lm, requests[i : i + 500], templates, h.layer).last)
        print(f"keys of {min(i + 500, len(requests))}/{len(requests)} facts", flush=True)
    facts_keys = torch.nn.functional.normalize(torch.cat(forms).float(), dim=1)
    keys_s = time.perf_counter() - t0
    need = max(0, args.pad - len(facts_keys)) + args.queries
    text = text_keys(lm, h.layer, [w for w in corpus_windows(lm, StatsConfig(n_tokens=need + need // 100 + 4096,
                                                                              max_length=128)) if len(w) == 128])
    order = torch.randperm(len(text), generator=torch.Generator().manual_seed(0))
    pad = text[order[: max(0, args.pad - len(facts_keys))]]
    held = text[order[len(pad) : len(pad) + args.queries]]
    stored = torch.cat([facts_keys, pad])
    prompts = [q for r in requests for q in (r.prompt, *r.paraphrases)]
    own = prompt_keys(lm, h.layer, prompts[:: max(1, len(prompts) // 10_000)])  # ~10,000, spread over the sets
    rows = []
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        t0 = time.perf_counter()
        index = KeyIndex.build(stored, nprobe)
        build_s = time.perf_counter() - t0
        for kind, q in (("wikitext", held), ("edit and paraphrase prompts", own)):
            rows.append({"nprobe": nprobe, "lists": len(index.centroids), "queries": kind, "build_s": build_s,
                         **decisions(q, stored, index, h.gamma)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "gate_recall", "model": args.model, "layer": h.layer, "gamma": h.gamma,
              "datasets": args.datasets, "facts": len(requests), "fact_forms": len(facts_keys),
              "stored_keys": len(stored), "fact_keys_seconds": keys_s, "rows": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
