"""Generation speed with the NeuralDB gate holding 0, 1k and 10k facts, relative to no gate.

The stored keys/residuals are real-shaped (unit-norm random keys, random residuals); what is
measured is the cost of the lookup (one matmul per forward at the edit layer). ``--keys`` lists the
subject keys to measure in one run: ``last`` (one key per fact), ``dual`` (and a pooled key per
fact, window 3), ``tokens`` (two forms per fact, of 4 and 3 tokens, with first-token keys). Random keys never match a
prompt, so with ``tokens`` no fact is hot and the cost measured is the gate's on text that names no
stored subject (:meth:`neuraldb.gate.StoredTokens.scores`). Greedy generation
of ``--new-tokens`` tokens after each prompt. Each row is ``--repeats`` rounds of no-gate, gated,
gated, no-gate runs (ABBA, then BAAB), means compared, so a slow phase of the machine affects both
sides of a ratio alike.

``--search exact,ivf`` measures token keys scored against every stored form and through the
inverted-file candidate stage (:mod:`neuraldb.index`; random keys do not cluster, so the lists are
as large as they get); ``--batch 8`` generates eight prompts at once. The install time (index build
included) is recorded beside each row.

Usage:  python benchmarks/gate_overhead.py --keys last,dual,tokens --out benchmarks/results/gate_overhead_keys.json
        python benchmarks/gate_overhead.py --keys tokens --search exact,ivf --sizes 0,10000,100000 [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from neuraldb import gate, models
from neuraldb.index import Search
from neuraldb.neuraldb_editor import NeuralDBEditor, NeuralDBHparams

PROMPTS = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is",
           "Michael Jordan plays the sport of", "The capital of Germany is"]


def tokens_per_s(lm: models.LoadedModel, new_tokens: int, repeats: int, batch: int = 1) -> float:
    """Generated tokens per second: the prompts one by one (``batch`` 1), or ``batch`` prompts at once
    (the prompts repeated to fill it, left-padded), best of ``repeats``."""
    groups = [[p] for p in PROMPTS] if batch == 1 else [[PROMPTS[i % len(PROMPTS)] for i in range(batch)]]
    tok = lm.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    best = float("inf")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for group in groups:
                enc = tok(group, return_tensors="pt", padding=True).to(lm.device)
                with torch.no_grad():
                    lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
            best = min(best, time.perf_counter() - t0)
    finally:
        tok.padding_side = side
    return sum(len(g) for g in groups) * new_tokens / best


def subjects(key: str, m: int, d_ff: int, h: NeuralDBHparams, g: torch.Generator,
             search: Search = Search()) -> gate.StoredSubjects:
    """Random unit keys of ``m`` facts shaped as ``key`` stores them."""
    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, d_ff, generator=g), dim=1)

    if key == "dual":
        return gate.StoredSubjects(unit(m), h.gamma, torch.full((m,), 3), unit(m), h.gamma - h.pool_gamma)
    if key == "tokens":
        windows = torch.tensor([4, 3]).repeat(m)
        tokens = gate.StoredTokens(unit(int((windows - 1).sum())), windows, torch.arange(m).repeat_interleave(2),
                                   unit(2 * m), unit(2 * m), h.gamma - h.token_gamma, h.gamma - h.single_gamma,
                                   h.first_gamma)
        return gate.StoredSubjects(unit(m), h.gamma, tokens=tokens, search=search)
    return gate.StoredSubjects(unit(m), h.gamma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--sizes", default="0,1000,10000")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keys", default="last,tokens", help="comma-separated: last, dual, tokens")
    ap.add_argument("--search", default="exact", help="comma-separated, for token keys: exact, ivf")
    ap.add_argument("--batch", type=int, default=1, help="prompts generated together (1: one by one)")
    ap.add_argument("--out", default="results/gate_overhead.json")
    args = ap.parse_args()
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if not keys or (bad := set(keys) - {"last", "dual", "tokens"}):
        raise SystemExit(f"--keys: unknown key(s) {', '.join(sorted(bad)) if keys else '(none)'}")
    lm = models.load(args.model)
    h = NeuralDBEditor.default_hparams(lm)
    path = lm.arch.w_out_path(h.layer)
    g = torch.Generator().manual_seed(0)
    tokens_per_s(lm, args.new_tokens, 1)  # warm-up
    rows, bases = [], []
    searches = [s.strip() for s in args.search.split(",") if s.strip()]
    runs = [(key, s) for key in keys for s in (searches if key == "tokens" else ["exact"])]
    for m in [int(x) for x in args.sizes.split(",")]:
        for key, search in runs:  # paired with no-gate runs in ABBA order, so a drift hits both sides alike
            residuals = torch.randn(m, lm.arch.d_model, generator=g) * 0.01
            stored = subjects(key, m, lm.arch.d_ff, h, g, Search(search))
            t0 = time.perf_counter()
            g_ = gate.install(lm.model, path, stored, residuals)
            install_s = time.perf_counter() - t0
            plain, gated = [], []
            for order in range(args.repeats):  # the no-gate side: the wrapper switched off (one call, no lookup)
                for on in ((False, True, True, False) if order % 2 == 0 else (True, False, False, True)):
                    g_.enabled = on
                    (gated if on else plain).append(tokens_per_s(lm, args.new_tokens, 1, args.batch))
            gate.unload(lm.model)
            base, tps = sum(plain) / len(plain), sum(gated) / len(gated)
            bases.append(base)
            rows.append({"key": key, "search": search, "facts": m, "batch": args.batch, "tokens_per_s": tps,
                         "no_gate_tokens_per_s": base, "relative_to_no_gate": tps / base,
                         "overhead_pct": 100.0 * (base / tps - 1.0), "install_seconds": install_s})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "gate_overhead", "model": args.model, "layer": h.layer, "keys": keys,
              "new_tokens": args.new_tokens,
              "prompts": len(PROMPTS), "no_gate_tokens_per_s": sum(bases) / len(bases), "rows": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
