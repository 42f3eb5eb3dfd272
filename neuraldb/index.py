"""A sublinear first stage for the gate: an inverted file over the stored unit keys.

The keys ``[n, d]`` are grouped by spherical k-means (``ceil(lists_per_sqrt · √n)`` lists, seeded,
a fixed number of iterations, trained on a fixed-seed sample): each list holds the keys closest to
its centroid. A forward's token keys probe the ``nprobe`` lists whose centroids are closest to each
token and the gate scores exactly only the keys of the probed lists (their union over the call's
tokens, each list one contiguous block of the keys stored list by list). A stored key that would
fire is missed only when it sits in a list the token did not probe; how often that changes the
decision (fired or not, and which fact) on real keys is not measured yet, so the gate's default
search stays ``exact``. Below ``min_keys`` stored keys, or when a call's union would hold more than
``max_share`` of them, every key is scored (the exact rule, and faster there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Search:
    """How the gate finds candidate keys: ``"exact"`` (every key) or ``"ivf"`` (:class:`KeyIndex`)."""

    kind: str = "exact"
    nprobe: int = 32
    lists_per_sqrt: float = 4.0
    min_keys: int = 4096
    max_share: float = 0.5

    def validate(self) -> None:
        if self.kind not in ("exact", "ivf"):
            raise ValueError(f"search must be exact or ivf, got {self.kind!r}")
        if self.nprobe < 1 or self.lists_per_sqrt <= 0 or self.min_keys < 0 or not 0 < self.max_share <= 1:
            raise ValueError("index: nprobe ≥ 1, lists_per_sqrt > 0, min_keys ≥ 0 and max_share in (0, 1] expected")

    def build(self, keys: torch.Tensor) -> KeyIndex | None:
        """The index of unit keys ``[n, d]`` under this search, or None where every key is scored."""
        if self.kind == "exact" or len(keys) < max(self.min_keys, 1):
            return None
        return KeyIndex.build(keys, self.nprobe, self.lists_per_sqrt, self.max_share)


@dataclass
class KeyIndex:
    """Lists of keys by nearest centroid. ``centroids`` ``[k, d]`` unit; ``members`` ``[n]``: key ids
    grouped by list; ``offsets`` ``[k + 1]``: list i is ``members[offsets[i]:offsets[i + 1]]``;
    ``assignment`` ``[n]``: each key's list."""

    centroids: torch.Tensor
    members: torch.Tensor
    offsets: torch.Tensor
    assignment: torch.Tensor
    nprobe: int
    max_share: float

    @staticmethod
    def build(keys: torch.Tensor, nprobe: int, lists_per_sqrt: float = 4.0, max_share: float = 0.5,
              iters: int = 8, sample_per_list: int = 32, seed: int = 0) -> KeyIndex:
        """Spherical k-means on a seeded sample of ``keys`` ``[n, d]`` (unit rows), then every key
        assigned to its nearest centroid."""
        n = len(keys)
        k = max(1, min(n, math.ceil(lists_per_sqrt * math.sqrt(n))))
        g = torch.Generator().manual_seed(seed)
        sample = keys[torch.randperm(n, generator=g)[: min(n, k * sample_per_list)].to(keys.device)]
        centroids = sample[:k].clone()
        for _ in range(iters):
            near = _nearest(sample, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, near, sample)
            empty = torch.bincount(near, minlength=k) == 0
            sums[empty] = centroids[empty]  # a list that lost every key keeps its centroid
            centroids = torch.nn.functional.normalize(sums, dim=1)
        return KeyIndex._grouped(centroids, _nearest(keys, centroids), nprobe, max_share)

    @staticmethod
    def _grouped(centroids: torch.Tensor, assignment: torch.Tensor, nprobe: int, max_share: float) -> KeyIndex:
        members = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=len(centroids))
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return KeyIndex(centroids, members, offsets, assignment, nprobe, max_share)

    def add(self, keys: torch.Tensor) -> KeyIndex:
        """The index with unit ``keys`` ``[f, d]`` appended (ids continue the existing ones), each in
        the list of its nearest centroid; the centroids stay (no retraining)."""
        return KeyIndex._grouped(self.centroids, torch.cat([self.assignment, _nearest(keys, self.centroids)]),
                                 self.nprobe, self.max_share)

    def select(self, keep: torch.Tensor) -> KeyIndex:
        """The index of the keys ``keep`` (ids, in order), renumbered 0 … len(keep) − 1."""
        return KeyIndex._grouped(self.centroids, self.assignment[keep], self.nprobe, self.max_share)

    def probed(self, queries: torch.Tensor) -> list[tuple[int, int]] | None:
        """The ``(start, end)`` runs in :attr:`members` order of the lists that unit ``queries``
        ``[q, d]`` probe (their union), or None when those lists would hold more than ``max_share``
        of the keys (then every key is scored). Keys stored in members order (:meth:`grouped`) give
        each run as one contiguous block: scored without a gather."""
        probe = (queries @ self.centroids.T).topk(min(self.nprobe, len(self.centroids)), dim=-1).indices
        lists = torch.zeros(len(self.centroids), dtype=torch.bool, device=queries.device)
        lists[probe.flatten()] = True
        chosen = lists.nonzero().squeeze(1)
        bounds = torch.stack([self.offsets[chosen], self.offsets[chosen + 1]], 1).tolist()
        if sum(e - s for s, e in bounds) > self.max_share * len(self.assignment):
            return None
        return [(s, e) for s, e in bounds if e > s]

    def grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[n, …]`` (one per key) reordered as :attr:`members`: list by list."""
        return rows[self.members.to(rows.device)]

    def to(self, device: torch.device) -> KeyIndex:
        return KeyIndex(self.centroids.to(device), self.members.to(device), self.offsets.to(device),
                        self.assignment.to(device), self.nprobe, self.max_share)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``[n]``: the centroid of highest cosine for each unit row of ``x`` ``[n, d]``."""
    return torch.cat([(x[i : i + chunk] @ centroids.T).argmax(1) for i in range(0, len(x), chunk)]) if len(x) \
        else torch.zeros(0, dtype=torch.long, device=x.device)
