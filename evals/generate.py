"""Seeded top-k sampling of continuations, as ROME's ``generate_fast`` does for fluency.

Each prompt gets one sample of at most ``max_length`` tokens in total (prompt included), drawn
from the top ``top_k`` next-token probabilities at every step, without stopping at end-of-text.
Prompts of equal token length share a batch, so no padding ever enters the model. The global RNG
is forked: sampling is reproducible from ``seed`` and leaves the caller's RNG state untouched.
"""

from __future__ import annotations

import torch

from neuraldb.models import LoadedModel


@torch.no_grad()
def _sample_batch(lm: LoadedModel, ids: torch.Tensor, new_tokens: int, top_k: int) -> torch.Tensor:
    """``ids [B, T]`` → ``[B, T + new_tokens]`` by top-k sampling with a KV cache."""
    out = lm.model(input_ids=ids, use_cache=True)
    seq = ids
    for step in range(new_tokens):
        logits = out.logits[:, -1].float()
        top = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, -1), 1)
        nxt = top.indices.gather(1, pick)
        seq = torch.cat([seq, nxt], dim=1)
        if step + 1 < new_tokens:
            out = lm.model(input_ids=nxt, cache=out.cache, use_cache=True)
    return seq


def sample_texts(lm: LoadedModel, prompts: list[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = 32) -> list[str]:
    """One sampled text per prompt (prompt included, decoded, blank lines joined), in order."""
    tok = lm.tokenizer
    encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(len(e), []).append(i)
    texts = [""] * len(prompts)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), batch_size):
                idx = group[start : start + batch_size]
                ids = torch.tensor([encoded[i] for i in idx], device=lm.device)
                seq = _sample_batch(lm, ids, max(0, max_length - length), top_k) if length < max_length else ids
                for i, row in zip(idx, seq.tolist()):
                    texts[i] = tok.decode(row, skip_special_tokens=True).replace("\n\n", " ")
    return texts
