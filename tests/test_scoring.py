"""Candidate scoring: each prompt run once for all its candidates gives what one whole forward pass per
(prompt, candidate) pair gives."""

from __future__ import annotations

import pytest
import torch

from neuraldb.prompts import encode
from neuraldb.scoring import score_candidates
from tests.conftest import ARCHS, tiny_model

PAIRS = [("The Eiffel Tower is located in the city of", " Paris"),
         ("The Eiffel Tower is located in the city of", " Rome is the capital of Italy"),
         ("Michael Jordan plays", " basketball"),
         ("Michael Jordan plays", " the guitar"),
         ("The mother tongue of Danielle Darrieux is", " French"),
         ("Berlin is the capital of", " Germany. Rome is the capital of Italy and John Lennon plays the guitar"),
         ("Toko Yasuda", " plays the guitar"),
         # longer than the tiny Gemma's 16-token sliding window: its candidates are run whole
         ("The language of Michel Rocard is French and English is spoken in London. Rome is the capital of",
          " Italy and Berlin is the capital of Germany")]


def _reference(lm, prompt: str, candidate: str) -> tuple[float, tuple[bool, ...]]:
    e = encode(lm.tokenizer, prompt, target=candidate)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([e.ids])).logits[0].float()
    logp = torch.log_softmax(logits[e.n_prompt - 1 : -1], -1)
    target = torch.tensor(e.ids[e.n_prompt:])
    return float(logp.gather(1, target.view(-1, 1)).mean()), tuple((logp.argmax(-1) == target).tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_score_like_whole_sequences(arch):
    lm = tiny_model(arch)
    got = score_candidates(lm, PAIRS, batch_size=3)
    for pair, score in zip(PAIRS, got):
        lp, correct = _reference(lm, *pair)
        assert score.mean_logprob == pytest.approx(lp, abs=1e-4), pair
        assert score.correct == correct, pair


def test_reference_path_agrees():
    from neuraldb.scoring import score_whole_sequences

    lm = tiny_model("llama")
    for a, b in zip(score_candidates(lm, PAIRS, 4), score_whole_sequences(lm, PAIRS, 4)):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4) and a.correct == b.correct
