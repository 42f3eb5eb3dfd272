"""The gate's lookup alone: milliseconds per call of token-key scoring against m stored facts,
scoring every stored form (``exact``) and through the inverted-file candidate stage (``ivf``,
:mod:`neuraldb.index`), one decode step of ``--batch`` rows (a KV-cached call, as in generation).

Generation tokens/s (``benchmarks/gate_overhead.py``) varies by ±5 % between runs on this machine,
which hides a 1–2 % cost; the lookup's own time, next to the time of a decode step of the model
measured in the same run, does not. Stored keys are random unit vectors shaped as a store of token
keys holds them (two forms per fact, of 4 and 3 tokens): they do not cluster, so the index's lists
are as unhelpful as they get, and nothing fires (every form is cold).

Usage:  python benchmarks/gate_lookup.py --sizes 10000,100000 --batches 1,8 --out benchmarks/results/gate_lookup.json
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
from neuraldb.neuraldb_editor import NeuralDBEditor


def per_call_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - t0) / repeats


def decode_step_ms(lm: models.LoadedModel, batch: int, repeats: int) -> float:
    """One KV-cached decode step of ``batch`` rows after a 10-token prompt, no gate."""
    ids = torch.randint(100, 1000, (batch, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lm.model(input_ids=ids, use_cache=True)
        step = ids[:, -1:]

        def run() -> None:
            lm.model(input_ids=step, cache=out.past_key_values, use_cache=False)

        return per_call_ms(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="results/gate_lookup.json")
    args = ap.parse_args()
    lm = models.load(args.model)
    h = NeuralDBEditor.default_hparams(lm)
    d = lm.arch.d_ff
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    steps = {b: decode_step_ms(lm, b, args.repeats) for b in batches}
    rows = []
    for m in [int(x) for x in args.sizes.split(",")]:
        windows = torch.tensor([4, 3]).repeat(m)

        def unit(n: int) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)

        fields = dict(keys=unit(int((windows - 1).sum())), windows=windows, facts=torch.arange(m).repeat_interleave(2),
                      first=unit(2 * m), last=unit(2 * m), shift=h.gamma - h.token_gamma,
                      single_shift=h.gamma - h.single_gamma, first_gamma=h.first_gamma)
        t0 = time.perf_counter()
        index = Search("ivf", h.nprobe).build(fields["last"])
        build_s = time.perf_counter() - t0
        stored = {"exact": gate.StoredTokens(**fields), "ivf": gate.StoredTokens(**fields, index=index)}
        for b in batches:
            x = torch.randn(b, 1, d, generator=g)
            starts = torch.full((b,), -1)
            for name, s in stored.items():
                ms = per_call_ms(lambda s=s, x=x, m=m, st=starts: s.scores(x, m, h.gamma, st), args.repeats)
                rows.append({"facts": m, "forms": 2 * m, "batch": b, "search": name, "lookup_ms": ms,
                             "decode_step_ms": steps[b], "share_of_step_pct": 100 * ms / steps[b],
                             "index_build_s": build_s if name == "ivf" else 0.0})
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "gate_lookup", "model": args.model, "layer": h.layer, "nprobe": h.nprobe, "rows": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
