"""Batched scoring of candidate continuations, and the edit report printed by ``neuraldb edit``.

A candidate o = (o_1..o_T) after prompt p is scored by its length-normalised log-probability
(1/T)·Σ_t log P(o_t | p, o_<t) (MEMIT's convention); many (prompt, candidate) pairs share one
forward pass and logits are computed only at the T positions of each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuraldb.facts import EditRequest
from neuraldb.models import LoadedModel
from neuraldb.prompts import aligned_batch, encode


@dataclass(frozen=True)
class CandidateScore:
    """How the model scores one candidate o = (o_1..o_T) after its prompt.

    ``mean_logprob``: (1/T)·Σ_t log P(o_t | p, o_<t); ``correct``: per target token, whether it is
    the teacher-forced argmax (length T).
    """

    mean_logprob: float
    correct: tuple[bool, ...]


@torch.no_grad()
def score_candidates(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[CandidateScore]:
    """Score every (prompt, candidate) pair, ``batch_size`` sequences per forward pass.

    Pairs are grouped by length so that a batch carries little padding; logits are computed only
    at the candidates' positions. Results are in the order of ``pairs``.
    """
    encoded = [encode(lm.tokenizer, p, target=c) for p, c in pairs]
    if any(e.n_target == 0 for e in encoded):
        bad = next(pairs[i] for i, e in enumerate(encoded) if e.n_target == 0)
        raise ValueError(f"empty candidate after prompt {bad[0]!r}")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    out: list[CandidateScore | None] = [None] * len(encoded)
    dev = lm.device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [encoded[i] for i in idx]
        batch = aligned_batch(chunk, lm.tokenizer.pad_token_id, anchors=[0] * len(chunk))
        hidden = lm.backbone(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                             position_ids=batch.position_ids.to(dev)).last_hidden_state
        rows = [i for i, e in enumerate(chunk) for _ in range(e.n_target)]
        cols = [e.n_prompt - 1 + t for e in chunk for t in range(e.n_target)]
        tokens = torch.tensor([e.ids[e.n_prompt + t] for e in chunk for t in range(e.n_target)], device=dev)
        logp = torch.log_softmax(lm.logits(hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)])
                                 .float(), -1)
        token_lp = logp.gather(1, tokens.view(-1, 1)).squeeze(1).cpu().tolist()
        hit = (logp.argmax(-1) == tokens).cpu().tolist()
        pos = 0
        for i, e in zip(idx, chunk):
            lp, ok = token_lp[pos : pos + e.n_target], hit[pos : pos + e.n_target]
            out[i] = CandidateScore(sum(lp) / e.n_target, tuple(bool(h) for h in ok))
            pos += e.n_target
    return out  # type: ignore[return-value]


def mean_logprobs(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 64) -> torch.Tensor:
    """``[N]`` mean per-token log-probability of each candidate after its prompt."""
    return torch.tensor([s.mean_logprob for s in score_candidates(lm, pairs, batch_size)], dtype=torch.float32)


@dataclass
class PreferenceScores:
    """Per request: does the edit prompt prefer ``target_new`` over ``target_true``; per locality
    prompt: does it prefer its own answer over ``target_new``."""

    edit_prefers_new: list[bool]
    locality_prefers_true: list[bool]
    edit_p_new: list[float]


def preferences(lm: LoadedModel, requests: list[EditRequest]) -> PreferenceScores:
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.target_true:
            pairs += [(r.prompt, r.target_new), (r.prompt, r.target_true)]
    for r in requests:
        for prompt, answer in r.locality:
            pairs += [(prompt, answer), (prompt, r.target_new)]
    lp = mean_logprobs(lm, pairs).tolist()
    n_edit = 2 * sum(1 for r in requests if r.target_true)
    edit, loc = lp[:n_edit], lp[n_edit:]
    return PreferenceScores(
        edit_prefers_new=[edit[i] > edit[i + 1] for i in range(0, len(edit), 2)],
        locality_prefers_true=[loc[i] > loc[i + 1] for i in range(0, len(loc), 2)],
        edit_p_new=[float(torch.tensor(edit[i]).exp()) for i in range(0, len(edit), 2)],
    )


def edit_report(before: PreferenceScores, after: PreferenceScores) -> dict[str, float | int | None]:
    """Efficacy (edit prompts now preferring the new target) and locality retention (locality
    prompts whose pre-edit preference is unchanged)."""
    n = len(after.edit_prefers_new)
    kept = [a == b for a, b in zip(before.locality_prefers_true, after.locality_prefers_true)]
    return {
        "n_edits": n,
        "rewritten": sum(after.edit_prefers_new),
        "efficacy": 100.0 * sum(after.edit_prefers_new) / n if n else None,
        "efficacy_pre": 100.0 * sum(before.edit_prefers_new) / n if n else None,
        "locality_prompts": len(kept),
        "locality_kept": 100.0 * sum(kept) / len(kept) if kept else None,
        "locality_true_pre": 100.0 * sum(before.locality_prefers_true) / len(kept) if kept else None,
        "locality_true_post": 100.0 * sum(after.locality_prefers_true) / len(kept) if kept else None,
    }
