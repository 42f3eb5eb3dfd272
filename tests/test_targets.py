"""The fast residual optimisation equals the reference protocol, and batching does not change it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from neuraldb.facts import EditRequest
from neuraldb.hooks import get_module
from neuraldb.prompts import encode_with_subject
from neuraldb.targets import SOLVERS, Solver, TargetConfig, _site_modules, optimize, optimize_full_forward

from .conftest import tiny_model

TEMPLATES = ["{}", "Rome is the capital of Italy. {}", "John Lennon performs. {}"]
FACTS = [
    EditRequest("a", "The mother tongue of {} is", "Danielle Darrieux", " English", " French"),
    EditRequest("b", "{} plays the sport of", "Michael Jordan", " guitar", " basketball"),
    EditRequest("c", "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
]
# the batched solver: the reference protocol's rule, so the two paths must agree
CFG = TargetConfig(layer=1, steps=6, lr=0.5, early_stop_loss=-1.0, solver="batched")


KEEP = TargetConfig(layer=1, steps=6, lr=0.5, early_stop_loss=-1.0, keep_factor=1.0, solver="batched",
                    keep_templates=("The capital of {} is", "{} performs on the"))


@pytest.mark.parametrize("cfg", [CFG, KEEP], ids=["plain", "keep"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_fast_path_equals_full_forward_reference(arch, cfg):
    lm = tiny_model(arch)
    fast = optimize(lm, FACTS, TEMPLATES, cfg)
    ref = optimize_full_forward(lm, FACTS, TEMPLATES, cfg)
    torch.testing.assert_close(fast.delta, ref.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.keys, ref.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=1e-5)
    assert fast.loss.lt(ref.loss.new_tensor(float("inf"))).all()


@pytest.mark.parametrize("keep", [0.0, 1.0], ids=["plain", "keep"])
def test_batched_equals_one_by_one_with_early_stopping(keep):
    lm = tiny_model("llama")
    extra = {"keep_factor": keep, "keep_templates": KEEP.keep_templates}
    probe = optimize(lm, FACTS, TEMPLATES,
                     TargetConfig(layer=2, steps=6, weight_decay=0.0, early_stop_loss=-1.0, **extra))
    # a threshold between the facts' losses after 6 steps, so that they stop at different steps
    # (with the keep term: the keep rows of a fact that stopped leave the batch while others go on)
    cfg = TargetConfig(layer=2, steps=12, lr=0.5, weight_decay=0.0, early_stop_loss=float(probe.loss.median()),
                       **extra)
    batched = optimize(lm, FACTS, TEMPLATES, cfg, batch_size=3)
    single = optimize(lm, FACTS, TEMPLATES, cfg, batch_size=1)
    assert batched.steps.tolist() == single.steps.tolist()
    assert len(set(batched.steps.tolist())) > 1, "the test needs facts that stop at different steps"
    torch.testing.assert_close(batched.delta, single.delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_each_solver_reaches_its_stopping_loss(solver):
    """Every solver stops each fact below ``early_stop_loss`` (its total loss, or with ``fast`` its
    NLL; here the same: no KL, no weight decay) before the step limit. The tiny random model's
    NLL barely moves, so the threshold is halfway down what 20 batched steps reach."""
    lm = tiny_model("llama")
    cfg = TargetConfig(layer=1, steps=20, lr=0.5, weight_decay=0.0, kl_factor=0.0, early_stop_loss=-1.0)
    start = optimize(lm, FACTS, TEMPLATES, replace(cfg, steps=1)).nll
    end = optimize(lm, FACTS, TEMPLATES, cfg).nll
    assert (end < start).all()
    threshold = float((start - 0.5 * (start - end)).max())
    out = optimize(lm, FACTS, TEMPLATES, replace(cfg, steps=60, early_stop_loss=threshold, solver=solver))
    reached = out.nll if SOLVERS[solver].stop_on == "nll" else out.loss
    assert (reached < threshold).all(), (reached, threshold)
    assert (out.steps < 60).all() and (out.steps > 1).any(), out.steps


def test_fitting_fewer_templates_equals_fitting_on_those_templates_with_the_keys_of_all(monkeypatch):
    """A solver whose loss reads only the first context template gives the residuals of the same
    rule run on that template alone, and the keys (and v₀) of every template."""
    monkeypatch.setitem(SOLVERS, "one", Solver(batched=True, stop_on="loss", fit_templates=1))
    lm = tiny_model("llama")
    one = optimize(lm, FACTS, TEMPLATES, replace(CFG, solver="one"))
    alone = optimize(lm, FACTS, TEMPLATES[:2], CFG)
    every = optimize(lm, FACTS, TEMPLATES, CFG)
    torch.testing.assert_close(one.delta, alone.delta, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one.delta, every.delta, rtol=1e-3, atol=1e-4)
    assert torch.equal(one.keys, every.keys) and torch.equal(one.init, every.init)


def test_first_step_along_the_gradient_lands_on_that_fraction_of_the_clamp(monkeypatch):
    """``first_step`` f: after one step every δ has norm f · clamp · ‖v₀‖ and points down the
    gradient of the loss at δ = 0 (its cosine with Adam's first step, a sign step, is positive)."""
    monkeypatch.setitem(SOLVERS, "half", Solver(batched=True, stop_on="loss", first_step=0.5))
    lm = tiny_model("llama")
    cfg = replace(CFG, steps=2, early_stop_loss=-1.0)
    half = optimize(lm, FACTS, TEMPLATES, replace(cfg, solver="half"))
    adam = optimize(lm, FACTS, TEMPLATES, cfg)
    torch.testing.assert_close(half.delta.norm(dim=1), 0.5 * cfg.clamp_norm_factor * half.init.norm(dim=1))
    assert (torch.cosine_similarity(half.delta, adam.delta, dim=1) > 0.5).all()


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be one of reference, batched, fast"):
        optimize(tiny_model("llama"), FACTS, TEMPLATES, replace(CFG, solver="newton"))


def test_optimisation_lowers_the_target_loss_and_respects_the_clamp():
    lm = tiny_model("llama")
    cfg = TargetConfig(layer=1, steps=15, lr=0.5, clamp_norm_factor=2.0, weight_decay=0.0, kl_factor=0.0,
                       early_stop_loss=-1.0)
    first = optimize(lm, FACTS, TEMPLATES, TargetConfig(layer=1, steps=1, early_stop_loss=-1.0))
    out = optimize(lm, FACTS, TEMPLATES, cfg)
    assert (out.nll < first.nll).all()
    assert (out.delta.norm(dim=1) <= 2.0 * out.init.norm(dim=1) * (1 + 1e-5)).all()


def _keep_kl(lm, delta, cfg):
    """KL(P_δ ‖ P_0) of the next token on every keep prompt of every fact, δ added at the site's
    output at the subject's last token (what the gate does when it fires there): ``[F, K]``."""
    path, _ = _site_modules(lm, cfg)
    out = torch.zeros(len(FACTS), len(cfg.keep_templates))
    for f, (req, d) in enumerate(zip(FACTS, delta)):
        for k, template in enumerate(cfg.keep_templates):
            enc = encode_with_subject(lm.tokenizer, template, req.subject)
            ids = torch.tensor([enc.ids])
            with torch.no_grad():
                p0 = torch.log_softmax(lm.model(ids).logits[0, -1], -1)
                def add(_m, _i, o, pos=enc.subject_last, d=d):
                    return o.index_add(1, torch.tensor([pos]), d.view(1, 1, -1))
                handle = get_module(lm.model, path).register_forward_hook(add)
                try:
                    p1 = torch.log_softmax(lm.model(ids).logits[0, -1], -1)
                finally:
                    handle.remove()
            out[f, k] = (p1.exp() * (p1 - p0)).sum()
    return out


def test_keep_rows_hold_other_relations_of_the_subject():
    """With the keep term the subject's other relations move less (KL on the keep prompts, the
    residual applied at the subject as the gate applies it), the edit itself still lands, and
    keep_factor 0 is the plain loss exactly."""
    lm = tiny_model("llama")
    off = replace(CFG, keep_factor=0.0, keep_templates=KEEP.keep_templates)
    plain = optimize(lm, FACTS, TEMPLATES, CFG)
    assert torch.equal(plain.delta, optimize(lm, FACTS, TEMPLATES, off).delta)
    # a random tiny model barely responds to δ, so the test asks for the direction, per fact
    loose = replace(KEEP, keep_factor=0.0, steps=30, weight_decay=0.0, clamp_norm_factor=1e4, kl_factor=0.0)
    strong = replace(loose, keep_factor=32.0)
    kept, free = optimize(lm, FACTS, TEMPLATES, strong), optimize(lm, FACTS, TEMPLATES, loose)
    assert (_keep_kl(lm, kept.delta, strong).sum(1) < _keep_kl(lm, free.delta, strong).sum(1)).all()
    assert (kept.nll < optimize(lm, FACTS, TEMPLATES, replace(strong, steps=1)).nll).all(), "the edit still lands"


def test_autocast_solver_runs_the_per_step_passes_in_bfloat16_and_still_lowers_the_loss(monkeypatch):
    """A solver with ``autocast="bfloat16"`` runs, lowers every fact's NLL, and lands within 10 %
    of the float32 solver's residuals."""
    monkeypatch.setitem(SOLVERS, "bf16", replace(SOLVERS["batched"], autocast="bfloat16"))
    lm = tiny_model("llama")
    cfg = TargetConfig(layer=1, steps=8, lr=0.5, weight_decay=0.0, kl_factor=0.0, early_stop_loss=-1.0,
                       solver="batched")
    start = optimize(lm, FACTS, TEMPLATES, replace(cfg, steps=1)).nll
    full = optimize(lm, FACTS, TEMPLATES, cfg)
    half = optimize(lm, FACTS, TEMPLATES, replace(cfg, solver="bf16"))
    assert (half.nll < start).all()
    assert ((half.delta - full.delta).norm(dim=1) / full.delta.norm(dim=1)).max() < 0.1
