"""(prompt, candidate) pairs per second of evaluation scoring: each prompt run once for all its candidates
(ours, :func:`neuraldb.scoring.score_candidates`) vs each pair run as its own sequence (the reference,
:func:`neuraldb.scoring.score_whole_sequences`), on the pairs the CounterFact protocol scores, in one run.

Both are batched the same way (``--batch-size`` sequences per pass, grouped by length); after an untimed
warm-up each runs twice, in the order reference, ours, ours, reference. Output: JSON with pairs/s for
each (mean of its two runs), the ratio, and the largest difference between their scores.

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
    sides = {"reference": score_whole_sequences, "ours": score_candidates}
    for fn in sides.values():  # untimed warm-up: first-call kernel and allocator setup
        fn(lm, pairs[: args.batch_size], args.batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    scores = {}
    for name in ("reference", "ours", "ours", "reference"):  # ABBA: drift in machine load cancels
        start = time.perf_counter()
        scores[name] = sides[name](lm, pairs, args.batch_size)
        seconds[name].append(time.perf_counter() - start)
    ref, ours = scores["reference"], scores["ours"]
    t_ref, t_ours = (sum(seconds[k]) / 2 for k in ("reference", "ours"))
    result = {
        "model": lm.name, "dataset": args.dataset, "records": args.n, "pairs": len(pairs),
        "distinct_prompts": len({p for p, _ in pairs}), "batch_size": args.batch_size,
        "runs": "warm-up, then reference, ours, ours, reference; seconds are the mean of each side's two runs",
        "reference_seconds": t_ref, "ours_seconds": t_ours, "seconds_each_run": seconds,
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
