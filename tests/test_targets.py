"""The fast residual optimisation equals the reference protocol, and batching does not change it."""

from __future__ import annotations

import pytest
import torch

from neuraldb.facts import EditRequest
from neuraldb.targets import TargetConfig, optimize, optimize_full_forward

from .conftest import tiny_model

TEMPLATES = ["{}", "Rome is the capital of Italy. {}", "John Lennon performs. {}"]
FACTS = [
    EditRequest("a", "The mother tongue of {} is", "Danielle Darrieux", " English", " French"),
    EditRequest("b", "{} plays the sport of", "Michael Jordan", " guitar", " basketball"),
    EditRequest("c", "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
]
CFG = TargetConfig(layer=1, steps=6, lr=0.5, early_stop_loss=-1.0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_fast_path_equals_full_forward_reference(arch):
    lm = tiny_model(arch)
    fast = optimize(lm, FACTS, TEMPLATES, CFG)
    ref = optimize_full_forward(lm, FACTS, TEMPLATES, CFG)
    torch.testing.assert_close(fast.delta, ref.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.keys, ref.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=1e-5)
    assert fast.loss.lt(ref.loss.new_tensor(float("inf"))).all()


def test_batched_equals_one_by_one_with_early_stopping():
    lm = tiny_model("llama")
    probe = optimize(lm, FACTS, TEMPLATES, TargetConfig(layer=2, steps=6, weight_decay=0.0, early_stop_loss=-1.0))
    # a threshold between the facts' losses after 6 steps, so that they stop at different steps
    cfg = TargetConfig(layer=2, steps=12, lr=0.5, weight_decay=0.0, early_stop_loss=float(probe.loss.median()))
    batched = optimize(lm, FACTS, TEMPLATES, cfg, batch_size=3)
    single = optimize(lm, FACTS, TEMPLATES, cfg, batch_size=1)
    assert batched.steps.tolist() == single.steps.tolist()
    assert len(set(batched.steps.tolist())) > 1, "the test needs facts that stop at different steps"
    torch.testing.assert_close(batched.delta, single.delta, rtol=1e-4, atol=1e-5)


def test_optimisation_lowers_the_target_loss_and_respects_the_clamp():
    lm = tiny_model("llama")
    cfg = TargetConfig(layer=1, steps=15, lr=0.5, clamp_norm_factor=2.0, weight_decay=0.0, kl_factor=0.0,
                       early_stop_loss=-1.0)
    first = optimize(lm, FACTS, TEMPLATES, TargetConfig(layer=1, steps=1, early_stop_loss=-1.0))
    out = optimize(lm, FACTS, TEMPLATES, cfg)
    assert (out.nll < first.nll).all()
    assert (out.delta.norm(dim=1) <= 2.0 * out.init.norm(dim=1) * (1 + 1e-5)).all()
