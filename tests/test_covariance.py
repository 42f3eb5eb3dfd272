"""Second-moment statistics: one pass for all layers equals per-layer passes, costs one forward per
batch, is cached under a full key, and resumes from a checkpoint to the same result."""

from __future__ import annotations

import pytest
import torch

from baselines.covariance import StatsConfig, corpus_windows, second_moments

from .conftest import DATA, tiny_model

pytestmark = pytest.mark.skipif(not (DATA / "wikitext").is_dir(), reason="NEURALDB_DATA has no wikitext")

CFG = StatsConfig(n_tokens=3000, max_length=64, batch_tokens=512, dtype="float64")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path))


def test_one_pass_for_all_layers_equals_per_layer_passes_and_costs_one_forward_per_batch():
    lm = tiny_model("llama")
    calls = []
    lm.model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    together = second_moments(lm, [1, 2, 3], CFG)
    n_batches = -(-len(corpus_windows(lm, CFG)) // (CFG.batch_tokens // CFG.max_length))
    assert together.forward_passes == len(calls) == n_batches, "3 layers, one forward per batch"
    assert together.tokens == sum(len(w) for w in corpus_windows(lm, CFG)) >= 2990
    for layer in (1, 2, 3):
        calls.clear()
        alone = second_moments(lm, [layer], StatsConfig(**{**CFG.__dict__, "checkpoint_every": 1000}))
        assert alone.computed == [] and not calls, "cached: the second request runs no forward pass"
    lm2 = tiny_model("llama")  # fresh cache key check: other token count → recomputed
    other = second_moments(lm2, [2], StatsConfig(**{**CFG.__dict__, "n_tokens": 2000}))
    assert other.computed == [2]
    c = together.mom2[2]
    assert c.shape == (lm.arch.d_ff, lm.arch.d_ff) and c.dtype == torch.float64
    assert torch.allclose(c, c.T) and torch.linalg.eigvalsh(c).min() > -1e-9, "E[kkᵀ] is symmetric PSD"


def test_per_layer_accumulation_matches(tmp_path, monkeypatch):
    lm = tiny_model("gpt2")
    both = second_moments(lm, [0, 2], CFG)
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path / "other"))
    for layer in (0, 2):
        alone = second_moments(lm, [layer], CFG)
        assert alone.computed == [layer]
        assert torch.allclose(alone.mom2[layer], both.mom2[layer], rtol=1e-12, atol=0)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    cfg = StatsConfig(**{**CFG.__dict__, "checkpoint_every": 1})
    full = second_moments(lm, [1, 2], cfg)
    monkeypatch.setenv("NEURALDB_CACHE", str(tmp_path / "interrupted"))
    seen = []

    def stop_after_three(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        second_moments(lm, [1, 2], cfg, progress=stop_after_three)
    resumed = second_moments(lm, [1, 2], cfg)
    assert resumed.forward_passes == full.forward_passes - 2, "the two checkpointed batches are not rerun"
    for layer in (1, 2):
        assert torch.allclose(resumed.mom2[layer], full.mom2[layer], rtol=1e-12, atol=0)
