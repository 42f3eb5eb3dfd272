"""Batched continuation of prompts: seeded top-k sampling (ROME's ``generate_fast``, for
fluency) and greedy decoding with a stop string (MQuAKE's answers).

Prompts are sorted by token length and left-padded in batches (attention mask and position ids
make the padding invisible), with a KV cache. Sampling forks the global RNG: it is reproducible
from ``seed`` and leaves the caller's RNG state untouched.

Greedy decoding of few-shot prompts (MQuAKE's 8-shot and chain-of-thought prompts are 300–600
tokens, the question after them 10–30) runs the shared prefix once: prompts are ordered by their
token ids, so prompts with the same few-shot block are neighbours, and a batch whose rows share
at least ``share`` leading tokens reuses that prefix's keys and values. The split is made on
token ids, never on text, so every row sees exactly the tokens of its whole prompt.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from neuraldb.hooks import cache_from, prefix_cache
from neuraldb.models import LoadedModel

Prefix = tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]  # token ids, per-layer (k, v)


@torch.no_grad()
def _prefix(lm: LoadedModel, ids: tuple[int, ...]) -> Prefix | None:
    """Keys and values of ``ids`` (``[1, heads, len, head_dim]`` per layer), or None when the
    model's cache does not keep every position (a sliding-window layer shorter than ``ids``)."""
    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True, logits_to_keep=1)
    kv = prefix_cache(out.cache, len(ids))
    return (ids, kv) if all(k.shape[-2] == len(ids) for k, _ in kv) else None


@torch.no_grad()
def _continue(lm: LoadedModel, rows: list[list[int]], new_tokens: list[int], top_k: int,
              stop_ids: frozenset[int] = frozenset(), prefix: Prefix | None = None) -> list[list[int]]:
    """Up to ``new_tokens[i]`` tokens after row i (top-k sampled; ``top_k=1``: greedy), ending
    early once every row has produced a token of ``stop_ids``.

    With ``prefix``, every row starts with its P token ids: only the rest is run, on top of the
    prefix's keys and values (expanded to the batch); rows are left-padded after the prefix."""
    n_prefix = len(prefix[0]) if prefix else 0
    rows = [r[n_prefix:] for r in rows]
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    dev = lm.device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[1] * n_prefix + [0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    last = positions[:, -1:]
    cache = None
    if prefix:
        batch = len(rows)
        cache = cache_from([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix[1]],
                           lm.model.config)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions[:, n_prefix:], cache=cache,
                   use_cache=True, logits_to_keep=1)
    steps = max(new_tokens)
    new: list[list[int]] = [[] for _ in rows]
    stopped = [False] * len(rows)
    for step in range(steps):
        logits = out.logits[:, -1].float()
        if top_k == 1:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            top = logits.topk(top_k, dim=-1)
            nxt = top.indices.gather(1, torch.multinomial(torch.softmax(top.values, -1), 1))
        for i, t in enumerate(nxt[:, 0].tolist()):
            if step < new_tokens[i] and not stopped[i]:
                new[i].append(t)
                stopped[i] = t in stop_ids
        if step + 1 == steps or (stop_ids and all(s or len(n) >= k for s, n, k in zip(stopped, new, new_tokens))):
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        last = last + 1
        out = lm.model(input_ids=nxt, attention_mask=mask, position_ids=last, cache=out.cache, use_cache=True)
    return new


def _encode(lm: LoadedModel, prompts: list[str]) -> list[list[int]]:
    return [list(lm.tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def _by_length(encoded: list[list[int]], idx: list[int], batch_size: int) -> list[list[int]]:
    """Batches of the indices ``idx``, sorted by token length."""
    order = sorted(idx, key=lambda i: len(encoded[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _batches(lm: LoadedModel, prompts: list[str], batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt, and batches of prompt indices sorted by length."""
    encoded = _encode(lm, prompts)
    return encoded, _by_length(encoded, list(range(len(prompts))), batch_size)


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def shared_groups(encoded: list[list[int]], share: int) -> list[tuple[int, list[int]]]:
    """Prompts grouped by a shared prefix of at least ``share`` tokens: ``(n, indices)`` with n the
    group's common leading tokens, leaving every row at least one token of its own; prompts that
    share too little with their neighbours form one group with n = 0 (last)."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i])
    groups: list[tuple[int, list[int]]] = []
    alone: list[int] = []
    run, n = order[:1], 0

    def close() -> None:
        m = min([n] + [len(encoded[i]) - 1 for i in run])
        if len(run) > 1 and m >= share:
            groups.append((m, run))
        else:
            alone.extend(run)

    for a, b in zip(order, order[1:]):
        c = _common(encoded[a], encoded[b])
        if c >= share:
            n = c if len(run) == 1 else min(n, c)
            run.append(b)
        else:
            close()
            run, n = [b], 0
    if run:
        close()
    return groups + ([(0, alone)] if alone else [])


def sample_ids(lm: LoadedModel, prompts: list[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
               batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """Per prompt, its token ids and the top-k sampled ids after them, at most ``max_length`` tokens in
    total, never stopping at end-of-text; in order."""
    encoded, batches = _batches(lm, prompts, batch_size)
    out: list[tuple[list[int], list[int]]] = [([], [])] * len(prompts)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for idx in batches:
            rows = [encoded[i] for i in idx]
            budget = [max(0, max_length - len(r)) for r in rows]
            new = _continue(lm, rows, budget, top_k) if max(budget) else [[] for _ in rows]
            for i, row, extra in zip(idx, rows, new):
                out[i] = (row, extra)
    return out


def sample_text(lm: LoadedModel, prompt_ids: list[int], new_ids: list[int]) -> str:
    """A sample as fluency reads it: prompt included, special tokens dropped, blank lines joined."""
    return lm.tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True).replace("\n\n", " ")


def sample_texts(lm: LoadedModel, prompts: list[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = 64) -> list[str]:
    """:func:`sample_ids` as texts (:func:`sample_text`)."""
    return [sample_text(lm, row, extra) for row, extra in sample_ids(lm, prompts, max_length, top_k, seed, batch_size)]


@lru_cache(maxsize=8)
def _ids_containing(tok: object, text: str) -> frozenset[int]:
    vocab = len(tok)  # type: ignore[arg-type]
    return frozenset(i for i in range(vocab) if text in tok.decode([i]))  # type: ignore[attr-defined]


def _within_window(lm: LoadedModel, span: int) -> bool:
    """True when ``span`` cache positions fit a sliding-window layer. Rows are padded after the shared prefix,
    and a sliding window counts cache positions, not position ids: a padded row's prefix would look farther
    away than it is, so a prefix is shared only when nothing can leave the window."""
    window = getattr(lm.model.config, "sliding_window", None)
    return window is None or span <= window


def greedy_continuations(lm: LoadedModel, prompts: list[str], max_new_tokens: int, stop: str | None = "\n",
                         batch_size: int = 32, share: int = 32) -> list[str]:
    """Greedy continuation of each prompt (new text only), cut before ``stop`` when it occurs;
    decoding ends once every row has produced ``stop`` or ``max_new_tokens`` tokens.

    Prompts sharing at least ``share`` leading tokens (:func:`shared_groups`) run that prefix once
    (``share=0``: never; models with a sliding window: only when the batch fits in it)."""
    encoded = _encode(lm, prompts)
    groups = shared_groups(encoded, share) if share else [(0, list(range(len(prompts))))]
    stop_ids = _ids_containing(lm.tokenizer, stop) if stop else frozenset()
    out = [""] * len(prompts)
    for n, members in groups:
        prefix = _prefix(lm, tuple(encoded[members[0]][:n])) if n else None
        for idx in _by_length(encoded, members, batch_size):
            span = max(len(encoded[i]) for i in idx) + max_new_tokens  # padding included
            use = prefix if prefix and _within_window(lm, span) else None
            new = _continue(lm, [encoded[i] for i in idx], [max_new_tokens] * len(idx), 1, stop_ids, use)
            for i, toks in zip(idx, new):
                text = lm.tokenizer.decode(toks, skip_special_tokens=True)
                out[i] = text.split(stop)[0] if stop else text
    return out
