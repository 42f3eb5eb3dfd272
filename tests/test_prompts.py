"""Where a subject's key is read when its last token merges with the text after it."""

from __future__ import annotations

import torch

from neuraldb.facts import EditRequest
from neuraldb.hooks import capture
from neuraldb.keys import subject_keys
from neuraldb.prompts import encode, encode_with_subject, subject_last_token


def test_a_token_running_past_the_subject_is_skipped():
    # "made ?" as tokens "made", " (", "A", "-", "5", ")?"; the subject "(A-5)" is chars 5..10
    offsets = [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9), (9, 11)]
    assert subject_last_token(offsets, 5, 10) == 4  # "5", not ")?"
    assert subject_last_token(offsets, 5, 11) == 5  # the subject "(A-5)?" ends with that token
    assert subject_last_token([(0, 4), (4, 6)], 4, 5) == 1  # the subject's only token: kept


def test_merged_punctuation_does_not_become_a_key(smollm2):
    """ZsRE "What company made USS Leedstown (APA-56)?": SmolLM2 tokenises ")?" as one token. A key
    read there is a question mark's key: its cosine with an unrelated question's "?" is above γ.
    The key read at the subject's own last token stays below γ on every token of that question."""
    tok = smollm2.tokenizer
    req = EditRequest("ship", "What company made {}?", "USS Leedstown (APA-56)", " Bethlehem Steel")
    e = encode_with_subject(tok, req.template, req.subject)
    assert tok.decode([e.ids[e.subject_last]]) == "6"
    assert tok.decode([e.ids[e.subject_last + 1]]) == ")?"
    layer = 6
    key = subject_keys(smollm2, [req], ["{}"], [layer]).keys[layer][0]
    other = _keys(smollm2, encode(tok, "What country is Shmavon Shmavonyan from?").ids, layer)
    merged = _keys(smollm2, e.ids, layer)[e.subject_last + 1]
    assert float(other[-1] @ merged) > 0.65  # what the old rule stored would fire on "?"
    assert float((other @ torch.nn.functional.normalize(key, dim=0)).max()) < 0.65


def _keys(lm, ids: tuple[int, ...], layer: int) -> torch.Tensor:
    """Unit-norm FFN keys ``[seq, d_ff]`` of ``ids`` at ``layer``."""
    with torch.no_grad(), capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)}) as got:
        lm.model(torch.tensor([ids]))
    return torch.nn.functional.normalize(got["k"][0].float(), dim=-1)
