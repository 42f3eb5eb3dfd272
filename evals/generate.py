"""Seeded top-k sampling of continuations, as ROME's ``generate_fast`` does for fluency.

Each prompt gets one sample of at most ``max_length`` tokens in total (prompt included), drawn
from the top ``top_k`` next-token probabilities at every step, without stopping at end-of-text.
Prompts are sorted by token length and left-padded in batches (attention mask and position ids
make the padding invisible). The global RNG is forked: sampling is reproducible from ``seed``
and leaves the caller's RNG state untouched.
"""

from __future__ import annotations

import torch

from neuraldb.models import LoadedModel


@torch.no_grad()
def _sample_batch(lm: LoadedModel, rows: list[list[int]], max_length: int, top_k: int) -> list[list[int]]:
    """Left-pad ``rows`` and sample until every row holds ``max_length`` tokens (KV cache)."""
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    dev = lm.device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    steps = max_length - min(len(r) for r in rows)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new: list[torch.Tensor] = []
    last = pos[:, -1:]
    for step in range(steps):
        top = out.logits[:, -1].float().topk(top_k, dim=-1)
        nxt = top.indices.gather(1, torch.multinomial(torch.softmax(top.values, -1), 1))
        new.append(nxt)
        if step + 1 == steps:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        last = last + 1
        out = lm.model(input_ids=nxt, attention_mask=mask, position_ids=last, cache=out.cache, use_cache=True)
    sampled = torch.cat(new, dim=1).tolist() if new else [[] for _ in rows]
    return [r + s[: max(0, max_length - len(r))] for r, s in zip(rows, sampled)]


def sample_texts(lm: LoadedModel, prompts: list[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = 64) -> list[str]:
    """One sampled text per prompt (prompt included, decoded, blank lines joined), in order."""
    tok = lm.tokenizer
    encoded = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts = [""] * len(prompts)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [encoded[i] for i in idx]
            done = _sample_batch(lm, rows, max_length, top_k) if min(map(len, rows)) < max_length else rows
            for i, row in zip(idx, done):
                texts[i] = tok.decode(row, skip_special_tokens=True).replace("\n\n", " ")
    return texts
