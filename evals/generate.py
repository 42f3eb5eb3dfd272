"""Batched continuation of prompts: seeded top-k sampling (ROME's ``generate_fast``, for
fluency) and greedy decoding with a stop string (MQuAKE's answers).

Prompts are sorted by token length and left-padded in batches (attention mask and position ids
make the padding invisible), with a KV cache. Sampling forks the global RNG: it is reproducible
from ``seed`` and leaves the caller's RNG state untouched.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from neuraldb.models import LoadedModel


@torch.no_grad()
def _continue(lm: LoadedModel, rows: list[list[int]], new_tokens: list[int], top_k: int,
              stop_ids: frozenset[int] = frozenset()) -> list[list[int]]:
    """Up to ``new_tokens[i]`` tokens after row i (top-k sampled; ``top_k=1``: greedy), ending
    early once every row has produced a token of ``stop_ids``."""
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    dev = lm.device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    last = (mask.cumsum(1) - 1).clamp(min=0)[:, -1:]
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True,
                   logits_to_keep=1)
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


def _batches(lm: LoadedModel, prompts: list[str], batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt, and batches of prompt indices sorted by length."""
    encoded = [list(lm.tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    return encoded, [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def sample_texts(lm: LoadedModel, prompts: list[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = 64) -> list[str]:
    """One sampled text per prompt of at most ``max_length`` tokens in total, prompt included,
    never stopping at end-of-text (decoded, blank lines joined), in order."""
    encoded, batches = _batches(lm, prompts, batch_size)
    texts = [""] * len(prompts)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for idx in batches:
            rows = [encoded[i] for i in idx]
            budget = [max(0, max_length - len(r)) for r in rows]
            new = _continue(lm, rows, budget, top_k) if max(budget) else [[] for _ in rows]
            for i, row, extra in zip(idx, rows, new):
                texts[i] = lm.tokenizer.decode(row + extra, skip_special_tokens=True).replace("\n\n", " ")
    return texts


@lru_cache(maxsize=8)
def _ids_containing(tok: object, text: str) -> frozenset[int]:
    vocab = len(tok)  # type: ignore[arg-type]
    return frozenset(i for i in range(vocab) if text in tok.decode([i]))  # type: ignore[attr-defined]


def greedy_continuations(lm: LoadedModel, prompts: list[str], max_new_tokens: int, stop: str | None = "\n",
                         batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt (new text only), cut before ``stop`` when it occurs;
    decoding ends once every row has produced ``stop`` or ``max_new_tokens`` tokens."""
    encoded, batches = _batches(lm, prompts, batch_size)
    stop_ids = _ids_containing(lm.tokenizer, stop) if stop else frozenset()
    out = [""] * len(prompts)
    for idx in batches:
        new = _continue(lm, [encoded[i] for i in idx], [max_new_tokens] * len(idx), 1, stop_ids)
        for i, toks in zip(idx, new):
            text = lm.tokenizer.decode(toks, skip_special_tokens=True)
            out[i] = text.split(stop)[0] if stop else text
    return out
