"""(prompt, candidate) pairs per second of evaluation scoring: each prompt run once for all its candidates
(ours, :func:`neuraldb.scoring.score_candidates`) vs each pair run as its own sequence (the reference,
:func:`neuraldb.scoring.score_whole_sequences`), on the pairs the CounterFact protocol scores, in one run.

Both are batched the same way (``--batch-size`` sequences per pass, grouped by length). Output: JSON with
pairs/s for each, the ratio, and the largest difference between their scores.

Usage:  python benchmarks/scoring_throughput.py --n 100 --out benchmarks/results/scoring_throughput.json
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from evals import datasets
from evals.evaluate import case_pairs
from neuraldb import models
from neuraldb.files import write_json
from neuraldb.scoring import score_candidates, score_whole_sequences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--n", type=int, default=100, help="records (CounterFact: 26 pairs each)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/scoring_throughput.json")
    args = ap.parse_args()
    ds = datasets.load(args.dataset)
    pairs = [p for rec in datasets.select(ds.records, args.n) for p in case_pairs(ds.kind, rec)]
    lm = models.load(args.model)
    timed = {}
    for name, fn in (("reference", score_whole_sequences), ("ours", score_candidates)):
        start = time.perf_counter()
        timed[name] = (fn(lm, pairs, args.batch_size), time.perf_counter() - start)
    (ref, t_ref), (ours, t_ours) = timed["reference"], timed["ours"]
    result = {
        "model": lm.name, "dataset": args.dataset, "records": args.n, "pairs": len(pairs),
        "distinct_prompts": len({p for p, _ in pairs}), "batch_size": args.batch_size,
        "reference_seconds": t_ref, "ours_seconds": t_ours,
        "reference_pairs_per_s": len(pairs) / t_ref, "ours_pairs_per_s": len(pairs) / t_ours,
        "speedup": t_ref / t_ours,
        "max_abs_logprob_diff": max(abs(a.mean_logprob - b.mean_logprob) for a, b in zip(ref, ours)),
        "argmax_disagreements": sum(a.correct != b.correct for a, b in zip(ref, ours)),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
