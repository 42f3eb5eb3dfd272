"""Batched scoring of candidate continuations, and the edit report printed by ``neuraldb edit``.

A candidate o = (o_1..o_T) after prompt p is scored by its length-normalised log-probability
(1/T)·Σ_t log P(o_t | p, o_<t) (MEMIT's convention). Every distinct prompt is run once for all its
candidates (CounterFact asks each prompt for two), many prompts per forward pass, and logits are
computed only at the T positions of each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuraldb.facts import EditRequest
from neuraldb.hooks import cache_from, prefix_cache
from neuraldb.models import LoadedModel
from neuraldb.prompts import Encoded, aligned_batch, encode


@dataclass(frozen=True)
class CandidateScore:
    """How the model scores one candidate o = (o_1..o_T) after its prompt.

    ``mean_logprob``: (1/T)·Σ_t log P(o_t | p, o_<t); ``correct``: per target token, whether it is
    the teacher-forced argmax (length T); ``argmax``: the teacher-forced argmax token ids (length T).
    """

    mean_logprob: float
    correct: tuple[bool, ...]
    argmax: tuple[int, ...] = ()


@torch.no_grad()
def score_candidates(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[CandidateScore]:
    """Score every (prompt, candidate) pair; results are in the order of ``pairs``.

    Each distinct prompt is run once (``batch_size`` prompts per pass, grouped by length, left-padded) and
    gives the logits of its candidates' first tokens; a candidate's later tokens are run on top of its
    prompt's keys and values (``batch_size`` candidates per pass). Prompt and candidate are tokenised
    separately (MEMIT's convention), so a prompt's ids do not depend on the candidate. Logits are computed
    only where a candidate token is read.
    """
    encoded = _encode_pairs(lm, pairs)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        by_prompt.setdefault(e.ids[: e.n_prompt], []).append(i)
    prompts = sorted(by_prompt, key=len)
    token_lp: list[list[float]] = [[0.0] * e.n_target for e in encoded]
    top: list[list[int]] = [[-1] * e.n_target for e in encoded]
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        _score_chunk(lm, chunk, [by_prompt[p] for p in chunk], encoded, token_lp, top, batch_size)
    return _scores(encoded, token_lp, top)


def _scores(encoded: list[Encoded], token_lp: list[list[float]], top: list[list[int]]) -> list[CandidateScore]:
    out = []
    for e, lp, ids in zip(encoded, token_lp, top):
        target = e.ids[e.n_prompt:]
        out.append(CandidateScore(sum(lp) / len(lp), tuple(a == b for a, b in zip(ids, target)), tuple(ids)))
    return out


def _encode_pairs(lm: LoadedModel, pairs: list[tuple[str, str]]) -> list[Encoded]:
    encoded = [encode(lm.tokenizer, p, target=c) for p, c in pairs]
    if any(e.n_target == 0 for e in encoded):
        bad = next(pairs[i] for i, e in enumerate(encoded) if e.n_target == 0)
        raise ValueError(f"empty candidate after prompt {bad[0]!r}")
    return encoded


def _read(lm: LoadedModel, hidden: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[int]]:
    """Log-probability of ``tokens`` under the logits of ``hidden`` ``[n, d_model]``, and the argmax
    token id at each row."""
    logp = torch.log_softmax(lm.logits(hidden).float(), -1)
    target = torch.tensor(tokens, device=hidden.device).view(-1, 1)
    return logp.gather(1, target).squeeze(1).cpu().tolist(), logp.argmax(-1).cpu().tolist()


def _score_chunk(lm: LoadedModel, prompts: list[tuple[int, ...]], members: list[list[int]], encoded: list[Encoded],
                 token_lp: list[list[float]], top: list[list[int]], batch_size: int) -> None:
    """Fill ``token_lp`` / ``top`` for the pairs of ``prompts`` (``members[b]``: pair indices of prompt b)."""
    dev, pad = lm.device, lm.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    cache = cache_from([], lm.model.config)
    hidden = lm.backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         cache=cache, use_cache=True).last_hidden_state[:, -1]
    first = [(b, i) for b, idx in enumerate(members) for i in idx]
    lp, ok = _read(lm, hidden[[b for b, _ in first]], [encoded[i].ids[encoded[i].n_prompt] for _, i in first])
    for (_, i), v, h in zip(first, lp, ok):
        token_lp[i][0], top[i][0] = v, h
    longer = [(b, i) for b, i in first if encoded[i].n_target > 1]
    kv = prefix_cache(cache, width)
    cached = all(k.shape[-2] == width for k, _ in kv)  # False: a sliding-window layer dropped positions
    for s in range(0, len(longer), batch_size):
        part = longer[s : s + batch_size]
        if cached:
            _continue_candidates(lm, part, kv, mask, encoded, token_lp, top)
        else:  # run these pairs whole
            _score_whole(lm, [i for _, i in part], encoded, token_lp, top)


def _continue_candidates(lm: LoadedModel, pairs: list[tuple[int, int]], kv: list[tuple[torch.Tensor, torch.Tensor]],
                         mask: torch.Tensor, encoded: list[Encoded], token_lp: list[list[float]],
                         top: list[list[int]]) -> None:
    """Tokens 2..T of each candidate, run after its prompt's keys and values (``kv``: ``[prompts, heads,
    width, head_dim]`` per layer; ``pairs``: (prompt row, pair index)); candidates right-padded."""
    dev, pad = lm.device, lm.tokenizer.pad_token_id
    rows = torch.tensor([b for b, _ in pairs], device=dev)
    tails = [list(encoded[i].ids[encoded[i].n_prompt : -1]) for _, i in pairs]  # inputs predicting tokens 2..T
    width = max(len(t) for t in tails)
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=dev)
    own = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=dev)
    full = torch.cat([mask[rows], own], 1)
    positions = (full.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1]:]
    cache = cache_from([(k[rows], v[rows]) for k, v in kv], lm.model.config)
    hidden = lm.backbone(input_ids=ids, attention_mask=full, position_ids=positions, cache=cache,
                         use_cache=True).last_hidden_state
    at = [(r, t) for r, tail in enumerate(tails) for t in range(len(tail))]
    lp, ok = _read(lm, hidden[[r for r, _ in at], [t for _, t in at]],
                   [encoded[pairs[r][1]].ids[encoded[pairs[r][1]].n_prompt + t + 1] for r, t in at])
    for (r, t), v, h in zip(at, lp, ok):
        i = pairs[r][1]
        token_lp[i][t + 1], top[i][t + 1] = v, h


def _score_whole(lm: LoadedModel, idx: list[int], encoded: list[Encoded], token_lp: list[list[float]],
                 top: list[list[int]], first: int = 1) -> None:
    """Tokens ``first``..T of the pairs ``idx``, each pair run as one right-padded sequence."""
    dev = lm.device
    chunk = [encoded[i] for i in idx]
    batch = aligned_batch(chunk, lm.tokenizer.pad_token_id, anchors=[0] * len(chunk))
    hidden = lm.backbone(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                         position_ids=batch.position_ids.to(dev)).last_hidden_state
    at = [(r, t) for r, e in enumerate(chunk) for t in range(first, e.n_target)]
    lp, ok = _read(lm, hidden[[r for r, _ in at], [chunk[r].n_prompt - 1 + t for r, t in at]],
                   [chunk[r].ids[chunk[r].n_prompt + t] for r, t in at])
    for (r, t), v, h in zip(at, lp, ok):
        token_lp[idx[r]][t], top[idx[r]][t] = v, h


@torch.no_grad()
def score_whole_sequences(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[CandidateScore]:
    """The same scores as :func:`score_candidates`, each (prompt, candidate) pair run as its own sequence
    (``batch_size`` per pass, grouped by length): the reference the benchmark compares against."""
    encoded = _encode_pairs(lm, pairs)
    token_lp: list[list[float]] = [[0.0] * e.n_target for e in encoded]
    top: list[list[int]] = [[-1] * e.n_target for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    for start in range(0, len(order), batch_size):
        _score_whole(lm, order[start : start + batch_size], encoded, token_lp, top, first=0)
    return _scores(encoded, token_lp, top)


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
