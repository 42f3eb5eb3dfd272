"""Metrics on hand-checkable cases."""

from __future__ import annotations

import math

import pytest

from evals.metrics import CaseScores, counterfact_metrics, fluency, harmonic_mean, ngram_entropy, token_accuracy

L = math.log


def test_counterfact_scores_from_known_probabilities():
    cases = [
        # rewrite P(new)=.6 > P(true)=.2; paraphrases: one of two prefers new; neighbours: both keep true
        CaseScores((L(0.6), L(0.2)), ((L(0.5), L(0.1)), (L(0.1), L(0.3))), ((L(0.1), L(0.7)), (L(0.2), L(0.4)))),
        # rewrite fails; one paraphrase prefers new; one neighbour flipped to new
        CaseScores((L(0.1), L(0.3)), ((L(0.4), L(0.2)),), ((L(0.5), L(0.25)),)),
    ]
    m = counterfact_metrics(cases)
    assert m["efficacy"] == pytest.approx(50.0)
    assert m["efficacy_magnitude"] == pytest.approx(100 * ((0.6 - 0.2) + (0.1 - 0.3)) / 2)
    assert m["generalization"] == pytest.approx(100 * (0.5 + 1.0) / 2), "per case first, then over cases"
    assert m["generalization_magnitude"] == pytest.approx(100 * (((0.4 + -0.2) / 2) + 0.2) / 2)
    assert m["specificity"] == pytest.approx(100 * (1.0 + 0.0) / 2), "per case first, then over cases"
    assert m["specificity_magnitude"] == pytest.approx(100 * ((0.6 + 0.2) / 2 - 0.25) / 2)
    assert m["score"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 50))


def test_missing_prompts_are_unavailable_not_zero():
    m = counterfact_metrics([CaseScores((L(0.5), L(0.1)))])
    assert m["efficacy"] == 100.0
    assert m["generalization"] is None and m["specificity"] is None and m["score"] is None
    assert fluency([]) is None
    assert harmonic_mean([50.0, 0.0]) == 0.0


def test_token_accuracy_counts_positions():
    assert token_accuracy([5, 7, 9], [5, 8, 9]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])


def test_ngram_entropy_by_hand():
    # tokens: a b a b .  → bigrams (a,b)×2 (b,a)×1 (b,.)×1 ; trigrams (a,b,a) (b,a,b) (a,b,.) once each
    h2 = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25))  # 1.5 bits
    h3 = math.log2(3)
    assert ngram_entropy("a b a b.") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert fluency(["a b a b.", "x y"]) == pytest.approx(100 * ((2 / 3 * h2 + 4 / 3 * h3) / 2 + (2 / 3 * 0) / 2) / 2)
