"""Greedy decoding with a shared few-shot prefix gives the tokens of decoding each prompt alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evals import generate
from evals.generate import greedy_continuations, shared_groups
from neuraldb.models import LoadedModel
from tests.conftest import _config, tiny_model, tiny_tokenizer

FEW_SHOT = ("The Eiffel Tower is located in the city of Paris. Rome is the capital of Italy. "
            "Berlin is the capital of Germany. Michael Jordan plays the sport of basketball.\n")
PROMPTS = [FEW_SHOT + "Q: The mother tongue of Danielle Darrieux is",
           FEW_SHOT + "Q: Toko Yasuda plays the",
           "John Lennon performs on the",
           FEW_SHOT + "Q: The language of Michel Rocard is",
           "The capital of Italy is",
           FEW_SHOT + "Q: Rome is"]


def test_groups_share_the_longest_common_prefix():
    encoded = [[1, 2, 3, 4, 9], [1, 2, 3, 5], [7, 8], [1, 2, 3, 4, 8], [7, 8, 9]]
    assert shared_groups(encoded, share=3) == [(3, [3, 0, 1]), (0, [2, 4])]
    assert shared_groups(encoded, share=4) == [(4, [3, 0]), (0, [1, 2, 4])]
    # a row never gives up its last token to the prefix
    assert shared_groups([[1, 2, 3], [1, 2, 3, 4]], share=2) == [(2, [0, 1])]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gptj"])
def test_shared_prefix_decodes_like_each_prompt_alone(arch, monkeypatch):
    lm = tiny_model(arch)
    alone = [greedy_continuations(lm, [p], 6, stop=None, share=0)[0] for p in PROMPTS]
    runs: list[int] = []
    real = generate._prefix
    monkeypatch.setattr(generate, "_prefix", lambda lm_, ids: runs.append(len(ids)) or real(lm_, ids))
    shared = greedy_continuations(lm, PROMPTS, 6, stop=None, batch_size=3, share=8)
    assert shared == alone
    assert len(runs) == 1 and runs[0] > 20, "the few-shot block is run once for its four prompts"


def test_no_shared_prefix_where_a_sliding_window_would_see_the_padding():
    """Window larger than the few-shot block but smaller than block + padding + new tokens: decoding must
    still equal each prompt alone (a padded row's prefix would otherwise fall out of the window)."""
    n_block = len(tiny_tokenizer()(FEW_SHOT)["input_ids"])
    config = _config("gemma3_text", len(tiny_tokenizer()))
    config.sliding_window = n_block + 5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lm = LoadedModel("tiny-gemma-window", model, tiny_tokenizer())
    prompts = [FEW_SHOT + "Q: The mother tongue of Danielle Darrieux is", FEW_SHOT + "Q: Rome is"]
    alone = [greedy_continuations(lm, [p], 6, stop=None, share=0)[0] for p in prompts]
    assert greedy_continuations(lm, prompts, 6, stop=None, share=8) == alone
