"""Context templates: short model-generated prefixes that make edits robust to preceding text.

As in MEMIT: the bare template ``"{}"`` plus one text sampled from the model (top-k 5, at most
``length`` tokens including the seed word) for each seed word, braces removed, followed by
``". {}"``. Unlike MEMIT the sampling is seeded and the result is stored with the edits, so the
same model and seed always give the same templates.
"""

from __future__ import annotations

import torch

from neuraldb.models import LoadedModel

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_texts(lm: LoadedModel, seeds: tuple[str, ...], length: int, seed: int, top_k: int = 5) -> list[str]:
    """One top-k sample per seed word, ``length`` tokens at most (seed word included)."""
    tok, model = lm.tokenizer, lm.model
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for word in seeds:  # one at a time: no padding, so each sample is independent of the others
        ids = tok(word, add_special_tokens=True, return_tensors="pt")["input_ids"].to(lm.device)
        n_special = len(tok(word, add_special_tokens=True)["input_ids"]) - len(
            tok(word, add_special_tokens=False)["input_ids"])
        while ids.shape[1] - n_special < length:
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            top = logits.topk(top_k)
            probs = torch.softmax(top.values, -1)
            nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
            ids = torch.cat([ids, nxt.view(1, 1).to(ids.device)], dim=1)
        texts.append(tok.decode(ids[0, n_special:], skip_special_tokens=True))
    return texts


def context_templates(lm: LoadedModel, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` followed by ``n`` generated prefixes ending in ``". {}"``."""
    seeds = tuple(SEED_WORDS[i % len(SEED_WORDS)] for i in range(n))
    texts = sample_texts(lm, seeds, length, seed) if n else []
    return ["{}"] + [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]
