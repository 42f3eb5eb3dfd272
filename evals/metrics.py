"""Editing metrics as defined by the ROME / MEMIT / AlphaEdit evaluation code (methods brief §7).

Everything here is a pure function of scores the model produced (log-probabilities, argmax
tokens, generated texts), so each metric can be checked by hand; batched scoring of a model
lives in :mod:`neuraldb.scoring`. A metric that cannot be computed (no paraphrases, no
reference files) is ``None`` — reported as unavailable, never as 0.

CounterFact (§7.1), for candidate o after prompt p, ``lp(o|p) = (1/T) Σ_t log P(o_t | p, o_<t)``:

* efficacy ES = mean over cases of 1[lp(new|p) > lp(true|p)]; magnitude EM = mean(P̄new − P̄true)
  with P̄ = exp(lp);
* generalisation PS: the same indicator averaged over a case's paraphrases, then over cases;
* specificity NS: 1[lp(true|q) > lp(new|q)] averaged over a case's neighbourhood prompts, then
  over cases (as ROME's summarize does);
* score S: harmonic mean of ES, PS, NS.

ZsRE (§7.2): teacher-forced top-1 token accuracy per case, averaged over cases.
Fluency: weighted bi-/tri-gram entropy of generations, H₂·2/3 and H₃·4/3 averaged (bits), ×100.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def pct(x: float | None) -> float | None:
    """A fraction as a percentage (None stays None)."""
    return None if x is None else 100.0 * x


@dataclass(frozen=True)
class CaseScores:
    """Log-probabilities of one CounterFact case.

    ``rewrite``: (lp_new, lp_true) on the edit prompt; ``paraphrase`` and ``neighborhood``: one
    (lp_new, lp_true) pair per prompt (may be empty).
    """

    rewrite: tuple[float, float]
    paraphrase: tuple[tuple[float, float], ...] = ()
    neighborhood: tuple[tuple[float, float], ...] = ()


def counterfact_metrics(cases: Sequence[CaseScores]) -> dict[str, float | None]:
    """ES, EM, PS, PM, NS, NM and S (×100); a metric with no prompts in any case is None."""
    es = [float(n > t) for n, t in (c.rewrite for c in cases)]
    em = [math.exp(n) - math.exp(t) for n, t in (c.rewrite for c in cases)]
    ps = [_mean([float(n > t) for n, t in c.paraphrase]) for c in cases if c.paraphrase]
    pm = [_mean([math.exp(n) - math.exp(t) for n, t in c.paraphrase]) for c in cases if c.paraphrase]
    ns = [_mean([float(t > n) for n, t in c.neighborhood]) for c in cases if c.neighborhood]
    nm = [_mean([math.exp(t) - math.exp(n) for n, t in c.neighborhood]) for c in cases if c.neighborhood]
    out = {"efficacy": pct(_mean(es)), "efficacy_magnitude": pct(_mean(em)),
           "generalization": pct(_mean(ps)), "generalization_magnitude": pct(_mean(pm)),  # type: ignore[arg-type]
           "specificity": pct(_mean(ns)), "specificity_magnitude": pct(_mean(nm))}
    out["score"] = harmonic_mean([out["efficacy"], out["generalization"], out["specificity"]])
    return out


@dataclass(frozen=True)
class ZsreCase:
    """Teacher-forced token accuracies of one ZsRE case: the edit prompt, each paraphrase, and
    each locality question against its gold answer (§7.2)."""

    rewrite: float
    paraphrase: tuple[float, ...] = ()
    neighborhood: tuple[float, ...] = ()


def zsre_metrics(cases: Sequence[ZsreCase]) -> dict[str, float | None]:
    """Efficacy, generalisation and specificity (×100: per case, then over cases) and their
    harmonic mean; a family with no prompts in any case is None."""
    out = {"efficacy": pct(_mean([c.rewrite for c in cases])),
           "generalization": pct(_mean([_mean(c.paraphrase) for c in cases if c.paraphrase])),  # type: ignore[misc]
           "specificity": pct(_mean([_mean(c.neighborhood) for c in cases if c.neighborhood]))}  # type: ignore[misc]
    out["score"] = harmonic_mean([out["efficacy"], out["generalization"], out["specificity"]])
    return out


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean; None when any value is unavailable, 0 when any value is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of target positions whose teacher-forced argmax equals the target token (§7.2)."""
    if len(predicted) != len(target) or not target:
        raise ValueError("token accuracy needs one prediction per target token, and at least one token")
    return sum(int(p == t) for p, t in zip(predicted, target)) / len(target)


# ROME tokenises with nltk.word_tokenize: Punkt sentences, then the Treebank word tokenizer. Punkt's
# model is a data download (not on PyPI), so sentences are split at [.!?] followed by a capital,
# digit or opening quote — Punkt also knows abbreviations ("Dr. Smith"), the one difference.
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def words(text: str) -> list[str]:
    """Word tokens as ``nltk.word_tokenize`` gives them (see the note above on sentences)."""
    from nltk.tokenize import NLTKWordTokenizer

    tok = NLTKWordTokenizer()
    return [w for sentence in _SENTENCE.split(text) for w in tok.tokenize(sentence)]


def ngram_entropy(text: str, weights: dict[int, float] | None = None) -> float:
    """Weighted mean over n of the n-gram entropy (bits) of ``text``: ``mean(w_n · H_n)`` with
    ``H_n = −Σ_g f(g) log₂ f(g)``; default n = 2, 3 with weights 2/3, 4/3 (ROME's fluency)."""
    weights = weights or {2: 2 / 3, 3: 4 / 3}
    toks = words(text)
    parts = []
    for n, w in weights.items():
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean n-gram entropy of generated texts ×100 (the papers' "Fluency"); None without texts."""
    return pct(_mean([ngram_entropy(t) for t in texts]))


def fluency_by_case(texts_per_case: Sequence[Sequence[str]]) -> float | None:
    """Fluency per case (its texts' mean entropy), then averaged over the cases that have texts."""
    per_case = [_mean([ngram_entropy(t) for t in texts]) for texts in texts_per_case if texts]
    return pct(_mean(per_case))  # type: ignore[arg-type]
