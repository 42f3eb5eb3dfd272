"""The inverted-file candidate stage (neuraldb/index.py) and the token-key gate scored through it."""

from __future__ import annotations

import torch

from neuraldb import gate
from neuraldb.index import KeyIndex, Search


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_build_is_deterministic_and_each_key_finds_itself():
    g = torch.Generator().manual_seed(0)
    keys = unit(2000, 32, g)
    a, b = KeyIndex.build(keys, nprobe=1), KeyIndex.build(keys, nprobe=1)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.members, b.members)
    assert len(a.centroids) == 179 and int(a.offsets[-1]) == 2000
    one = KeyIndex(a.centroids, a.members, a.offsets, a.assignment, 1, 1.0)
    for i in range(0, 2000, 97):  # a key probes its own list first
        ((s, e),) = one.probed(keys[i : i + 1])
        assert i in a.members[s:e].tolist() and bool((a.assignment[a.members[s:e]] == a.assignment[i]).all())
    assert KeyIndex(a.centroids, a.members, a.offsets, a.assignment, 179, 0.5).probed(keys[:1]) is None  # > half
    grown = a.add(keys[:5])
    assert torch.equal(grown.assignment[2000:], a.assignment[:5])
    kept = grown.select(torch.arange(1000, 2005))
    assert torch.equal(kept.assignment, grown.assignment[1000:])
    assert Search("exact").build(keys) is None and Search("ivf", min_keys=4096).build(keys) is None


def test_ivf_scores_give_the_exact_decisions_on_near_matches():
    """Token keys near stored forms (cosine ≈ 0.9) and unrelated ones: with the index the best fact
    above the lowest threshold and its score are those of scoring every form."""
    g = torch.Generator().manual_seed(1)
    d, m = 64, 3000
    windows = torch.tensor([1, 2, 3]).repeat(m)[: 2 * m]
    facts = torch.arange(m).repeat_interleave(2)
    last = unit(2 * m, d, g)
    stored = dict(keys=unit(int((windows - 1).sum()), d, g), windows=windows, facts=facts, first=unit(2 * m, d, g),
                  last=last, shift=0.35, single_shift=-0.1, first_gamma=0.999)
    exact = gate.StoredTokens(**stored)
    ivf = gate.StoredTokens(**stored, index=KeyIndex.build(last, nprobe=8, max_share=1.0))
    near = torch.nn.functional.normalize(last[::37] + 0.35 * unit(len(last[::37]), d, g), dim=1)
    x = torch.cat([near, unit(200, d, g)])[None]  # [1, t, d]: one row
    starts = torch.tensor([-1])  # the row began in an earlier call, as in generation
    a = exact.scores(x, m, floor=0.65, starts=starts)
    b = ivf.scores(x, m, floor=0.65, starts=starts)
    best_a, idx_a = a.max(-1)
    best_b, idx_b = b.max(-1)
    fired = best_a > 0.65
    assert int(fired.sum()) > 50
    assert torch.equal(fired, best_b > 0.65) and torch.equal(idx_a[fired], idx_b[fired])
    torch.testing.assert_close(best_a[fired], best_b[fired])  # the same cosines, summed in another order
