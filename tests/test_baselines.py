"""MEMIT and AlphaEdit: closed forms satisfy their equations, edits run on every architecture,
restore is bit-exact, saved artifacts reproduce the edited weights, sequential batches use the cache."""

from __future__ import annotations

import pytest
import torch

from baselines import alphaedit
from baselines.alphaedit import AlphaEditEditor, AlphaEditHparams, alphaedit_factors, null_space_projector
from baselines.memit import MEMITEditor, MEMITHparams, memit_factors
from neuraldb.editor import get_editor, identify
from neuraldb.facts import EditRequest
from neuraldb.files import ArtifactError
from neuraldb.hooks import get_module
from neuraldb.keys import subject_keys

from .conftest import ARCHS, DATA, tiny_model

FACTS = [EditRequest("lennon", "{} performs on the", "John Lennon", " basketball", " guitar"),
         EditRequest("rome", "{} is the capital of", "Rome", " Germany", " Italy")]
STATS = dict(stats_tokens=2000, stats_max_length=64)
# A random tiny model cannot move far: no KL / decay / clamp, bare prompts only, light regularisers.
LOOSE = dict(steps=10, weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=0.1, n_templates=0, **STATS)
METHOD = {"memit": dict(mom2_update_weight=1.0), "alphaedit": dict(l2=1e-2)}
needs_data = pytest.mark.skipif(not (DATA / "wikitext").is_dir(), reason="NEURALDB_DATA has no wikitext")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path))


def _psd(d: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.01, 1.0, d, dtype=torch.float64)
    return x.T @ x / n


def test_memit_update_solves_its_normal_equations():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(5, 32, generator=g, dtype=torch.float64)
    r = torch.randn(5, 16, generator=g, dtype=torch.float64)
    c, lam = _psd(32), 3.0
    u, v = memit_factors(k, r, c, lam)
    delta = u @ v.T  # [d_model, d_ff]
    lhs, rhs = delta @ (lam * c + k.T @ k), r.T @ k
    assert (lhs - rhs).norm() / rhs.norm() < 1e-10
    u, v = memit_factors(k, r, c, 1e-9)  # λ → 0: the edited keys map exactly onto their residuals
    assert ((u @ v.T) @ k.T - r.T).norm() / r.norm() < 1e-6


def test_alphaedit_update_leaves_preserved_keys_alone():
    d_ff, d_model = 48, 16
    c = _psd(d_ff)
    values, vectors = torch.linalg.eigh(c)
    threshold = float(values[d_ff // 2])
    p = null_space_projector(c, threshold)
    assert torch.allclose(p @ p, p, atol=1e-5), "P is a projector"
    g = torch.Generator().manual_seed(2)
    k = torch.randn(6, d_ff, generator=g)
    r = torch.randn(6, d_model, generator=g)
    cache = _psd(d_ff, seed=3).float()
    u, v = alphaedit_factors(k, r, p, cache, 10.0)
    delta = (u @ v.T).double()
    preserved = vectors[:, values >= threshold]  # [d_ff, m] eigenvectors P removes
    rel = (delta @ preserved).norm(dim=0) / delta.norm()
    assert rel.max() < 1e-4
    # and its own normal equations: (P(KKᵀ + cache) + αI) Δᵀ = P K R
    m = p.double() @ (k.double().T @ k.double() + cache.double()) + 10.0 * torch.eye(d_ff, dtype=torch.float64)
    lhs, rhs = m @ delta.T, p.double() @ k.double().T @ r.double()
    assert (lhs - rhs).norm() / rhs.norm() < 1e-4


def _weights(lm, layers):
    return {layer: get_module(lm.model, lm.arch.w_out_path(layer)).weight.detach().clone() for layer in layers}


@needs_data
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_edit_restore_and_artifact_round_trip(arch, name, tmp_path):
    lm = tiny_model(arch)
    cls = get_editor(name)
    hp = cls.default_hparams(lm).replace(layers=(1, 2), **LOOSE, **METHOD[name])
    base = _weights(lm, range(lm.arch.n_layers))
    ed = cls(lm, hp)
    ed.edit(FACTS)
    edited = _weights(lm, range(lm.arch.n_layers))
    assert not torch.equal(edited[1], base[1]) and not torch.equal(edited[2], base[2])
    assert torch.equal(edited[0], base[0]) and torch.equal(edited[3], base[3]), "only the edit layers change"
    # the block-L outputs at the subjects now sit at (MEMIT) or towards (AlphaEdit, constrained) the targets
    t = ed.last_targets
    h = subject_keys(lm, FACTS, ed.context_templates(), [2], output_layer=2).outputs
    left = ((h - (t.init + t.delta)).norm(dim=1) / t.delta.norm(dim=1)).max()
    # MEMIT with a tiny λ solves exactly, except through Gemma-3's post-FFN norm, where the residual is
    # mapped by the norm's Jacobian (first order; its scale direction is unreachable)
    bound = 0.9 if name == "alphaedit" else 0.2 if lm.arch.post_norm_path(1) else 0.05
    assert left < bound, float(left)
    ed.save(tmp_path / "edits")
    ed.restore()
    assert all(torch.equal(w, base[i]) for i, w in _weights(lm, range(lm.arch.n_layers)).items()), "bit-exact"

    fresh = tiny_model(arch)
    assert identify(tmp_path / "edits") == (cls, fresh.name)
    loaded = cls.load(fresh, tmp_path / "edits")
    assert all(torch.equal(w, edited[i]) for i, w in _weights(fresh, range(4)).items()), "reproduced exactly"
    assert [f.id for f in loaded.facts] == ["lennon", "rome"]
    loaded.restore()
    assert all(torch.equal(w, base[i]) for i, w in _weights(fresh, range(4)).items())


@needs_data
def test_artifact_refuses_an_edited_or_other_model(tmp_path):
    lm = tiny_model("llama")
    ed = MEMITEditor(lm, MEMITHparams(layers=(1, 2), steps=5, **STATS))
    ed.edit(FACTS[:1])
    ed.save(tmp_path / "e")
    with pytest.raises(ArtifactError, match="not the weight these edits were made on"):
        MEMITEditor.load(lm, tmp_path / "e")  # lm's weights are edited now
    with pytest.raises(ArtifactError, match="fingerprint"):
        MEMITEditor.load(tiny_model("mistral"), tmp_path / "e")
    with pytest.raises(ArtifactError, match="memit edits, not alphaedit"):
        AlphaEditEditor.load(tiny_model("llama"), tmp_path / "e")


@needs_data
def test_sequential_batches_use_the_cache_of_earlier_keys(monkeypatch):
    lm = tiny_model("llama")
    seen = []
    real = alphaedit.alphaedit_factors

    def spy(keys, resid, projector, cache, l2):
        seen.append(float(cache.norm()))
        return real(keys, resid, projector, cache, l2)

    monkeypatch.setattr(alphaedit, "alphaedit_factors", spy)
    ed = AlphaEditEditor(lm, AlphaEditHparams(layers=(1, 2), steps=5, batch_size=1, **STATS))
    ed.edit(FACTS)
    assert seen[:2] == [0.0, 0.0], "first batch: empty cache at both layers"
    assert seen[2] > 0 and seen[3] > 0, "second batch: the first batch's keys are in the cache"
    for layer in (1, 2):
        assert torch.linalg.matrix_rank(ed.cache[layer]) == 2, "one key per edited fact"
    ed.restore()
    assert ed.cache == {} and ed.projectors, "restore forgets the edits, keeps P (a property of the base model)"


@needs_data
def test_a_failed_batch_leaves_no_trace(monkeypatch):
    from baselines import memit

    lm = tiny_model("llama")
    base = _weights(lm, range(4))
    ed = MEMITEditor(lm, MEMITHparams(layers=(1, 2), steps=3, **STATS))
    real, calls = memit.memit_factors, []

    def fail_on_second_layer(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver failed")
        return real(*args)

    monkeypatch.setattr(memit, "memit_factors", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="solver failed"):
        ed.edit(FACTS)
    assert all(torch.equal(w, base[i]) for i, w in _weights(lm, range(4)).items()), "layer 1's update rolled back"
    assert ed.facts == [] and not ed.weights.edited


def test_factors_fold_into_a_dense_update_that_saves_and_reloads_exactly():
    from baselines.weights import WeightEdits

    lm, fresh = tiny_model("gpt2"), tiny_model("gpt2")  # Conv1D: the transposed layout
    edits = WeightEdits(lm, [1])
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = lm.arch.d_model, lm.arch.d_ff
    for n in (30, 20):  # 50 · (64 + 128) > 64 · 128: the second add folds
        edits.add(1, torch.randn(d_model, n, generator=g) * 1e-2, torch.randn(d_ff, n, generator=g))
    e = edits.layers[1]
    assert e.dense is not None and e.rank == 0
    described, tensors = edits.describe(), edits.tensors()
    assert described[0]["format"] == "dense" and set(tensors) == {"layer1.delta"}
    other = WeightEdits(fresh, [1])
    other.load(described, tensors)
    assert torch.equal(_weights(fresh, [1])[1], _weights(lm, [1])[1])
    edits.restore()
    assert torch.equal(_weights(lm, [1])[1], e.base)
