"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved keys.

Per layer (methods brief §3.1), with ``P = Û Ûᵀ`` built once from the unedited model's second
moment (``Û`` = eigenvectors of ``C = E[k kᵀ]`` with eigenvalue below ``nullspace_threshold``),
keys ``K₁`` ``[d_ff, n]``, residuals ``R`` ``[n, d_model]`` and the cache ``Σ K_p K_pᵀ`` of keys
edited in earlier batches:

    Δᵀ = (P (K₁K₁ᵀ + cache) + α I)⁻¹ P K₁ R      solved in float32 (as the reference)
    factors U = Rᵀ, V = (P (K₁K₁ᵀ + cache) + α I)⁻¹ P K₁

For any key k with P k = 0 (the preserved space), Δ k = 0 exactly in exact arithmetic. After
each batch the keys of its facts are recomputed with the edited model and added to the cache.
P and the cache are editor state, saved with the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from baselines.closed_form import ClosedFormEditor, ClosedFormHparams
from neuraldb.editor import register
from neuraldb.facts import EditRequest
from neuraldb.keys import subject_keys
from neuraldb.models import LoadedModel


@dataclass(frozen=True)
class AlphaEditHparams(ClosedFormHparams):
    """:class:`ClosedFormHparams` plus the null-space threshold and the ridge ``L2`` (α)."""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    def validate(self, lm: Any) -> None:
        super().validate(lm)
        if self.nullspace_threshold <= 0 or self.l2 <= 0:
            raise ValueError("nullspace_threshold and l2 must be positive")


# methods brief §3.3 (published configs); small models: benchmarks/sweep_baselines.py.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(layers=(13, 14, 15, 16, 17), steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                    kl_factor=0.0625, nullspace_threshold=2e-2, l2=10.0),
    "gpt-j-6b": dict(layers=(3, 4, 5, 6, 7, 8), steps=25, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                     kl_factor=0.0625, nullspace_threshold=2e-2, l2=10.0),
    "llama3-8b": dict(layers=(4, 5, 6, 7, 8), steps=25, lr=0.1, weight_decay=0.5, clamp_norm_factor=0.75,
                      kl_factor=0.0625, nullspace_threshold=2e-2, l2=10.0),
    "smollm2-135m": dict(layers=(3, 4, 5, 6, 7), nullspace_threshold=2e-2, l2=10.0),  # measured (README)
    "gemma3-270m": dict(layers=(2, 3, 4, 5, 6), nullspace_threshold=5e-2, l2=10.0),  # measured (README)
}


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[d_ff, d_ff]`` float32 projector onto the eigenvectors of ``mom2`` with eigenvalue < ``threshold``."""
    values, vectors = torch.linalg.eigh(mom2.double())
    small = vectors[:, values < threshold]
    return (small @ small.T).float()


def alphaedit_factors(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, cache: torch.Tensor,
                      l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [d_model, n], V [d_ff, n])`` with ``U Vᵀ = Rᵀ K₁ᵀ P (P(K₁K₁ᵀ + cache) + αI)⁻ᵀ`` (float32)."""
    k1, p = keys.float().T, projector.float()  # k1: [d_ff, n]
    m = p @ (k1 @ k1.T + cache.float()) + l2 * torch.eye(p.shape[0])
    v = torch.linalg.solve(m, p @ k1)
    return resid.float().T.contiguous(), v


@register("alphaedit")
class AlphaEditEditor(ClosedFormEditor):
    hparams_cls = AlphaEditHparams
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    def __init__(self, lm: LoadedModel, hparams: AlphaEditHparams | None = None, **kwargs: Any):
        super().__init__(lm, hparams, **kwargs)
        self.projectors: dict[int, torch.Tensor] = {}
        self.cache: dict[int, torch.Tensor] = {}

    def projector(self, layer: int) -> torch.Tensor:
        """``P`` of ``layer``, computed once from the unedited model's statistics."""
        if layer not in self.projectors:
            self.projectors[layer] = null_space_projector(self.mom2(layer), self.hparams.nullspace_threshold)
        return self.projectors[layer]

    def _cache(self, layer: int) -> torch.Tensor:
        d = self.lm.arch.d_ff
        return self.cache.setdefault(layer, torch.zeros(d, d))

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alphaedit_factors(keys, resid, self.projector(layer), self._cache(layer), self.hparams.l2)

    def after_batch(self, requests: list[EditRequest]) -> None:
        """Cache += K Kᵀ of this batch's keys, recomputed with the edited model, at every layer."""
        got = subject_keys(self.lm, requests, self.context_templates(), list(self.hparams.layers))
        for layer, k in got.keys.items():
            self.cache[layer] = self._cache(layer) + k.T @ k  # a new tensor: saved states stay valid

    def prepare(self, progress: Any = None, start: Any = None) -> None:
        if all(layer in self.projectors for layer in self.hparams.layers):
            return  # loaded with the artifact: no statistics needed
        super().prepare(progress, start)
        for layer in self.hparams.layers:
            self.projector(layer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"projector.{layer}": p for layer, p in self.projectors.items()}
        return out | {f"cache.{layer}": c for layer, c in self.cache.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            kind, layer = name.split(".")
            (self.projectors if kind == "projector" else self.cache)[int(layer)] = t.float()

    def reset_state(self) -> None:
        self.cache = {}
