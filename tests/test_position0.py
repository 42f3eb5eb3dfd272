"""Why keys never come from position 0: on SmolLM2 every first token's FFN key is the same
attention-sink activation, whatever the token (README, "How NeuralDB edits")."""

from __future__ import annotations

import pytest
import torch

from neuraldb.hooks import capture


@pytest.mark.parametrize("layer,floor", [(6, 0.8), (8, 0.95)])
def test_first_token_keys_are_indistinguishable(smollm2, layer, floor):
    path = smollm2.arch.w_out_path(layer)
    texts = ["Apple was founded by", "The Eiffel Tower is in", "Michael Jordan plays", "Paris is the capital"]
    firsts, later = [], []
    for t in texts:
        ids = smollm2.tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture(smollm2.model, inputs={"k": path}) as got:
            smollm2.model(ids)
        firsts.append(got["k"][0, 0])
        later.append(got["k"][0, 1])
    f = torch.nn.functional.normalize(torch.stack(firsts), dim=-1)
    g = torch.nn.functional.normalize(torch.stack(later), dim=-1)
    off = ~torch.eye(len(texts), dtype=torch.bool)
    assert (f @ f.T)[off].min() > floor  # any two first tokens: far above γ = 0.65
    assert (g @ g.T)[off].mean() < 0.9  # second tokens: distinguishable
