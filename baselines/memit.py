"""MEMIT (Meng et al., ICLR 2023): closed-form least-squares edits of several FFN layers.

Per layer l, with keys ``K`` ``[n, d_ff]``, spread residuals ``R`` ``[n, d_model]`` and the
second moment ``C = E[k kᵀ]`` of the unedited layer (methods brief §2.1d):

    Δ = Rᵀ K (λ·C + Kᵀ K)⁻¹        solved in float64;   factors U = Rᵀ, V = (λ·C + Kᵀ K)⁻¹ Kᵀ

i.e. the normal equations ``Δ (λC + KᵀK) = Rᵀ K`` of
``min ‖Δ Kᵀ − Rᵀ‖² + λ·N·tr(Δ C Δᵀ)``. Sequential batches are applied one after another
without a cache of earlier keys (plain MEMIT, as compared in the AlphaEdit paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from baselines.closed_form import ClosedFormEditor, ClosedFormHparams
from neuraldb.editor import register


@dataclass(frozen=True)
class MEMITHparams(ClosedFormHparams):
    """:class:`ClosedFormHparams` plus ``mom2_update_weight`` (λ)."""

    mom2_update_weight: float = 15000.0

    def validate(self, lm: Any) -> None:
        super().validate(lm)
        if self.mom2_update_weight <= 0:
            raise ValueError("mom2_update_weight (λ) must be positive")


# methods brief §2.3 (published configs; the published statistics are 100k Wikipedia articles,
# ours are the local corpus of ``stats_corpus``); small models: benchmarks/sweep_baselines.py.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(layers=(13, 14, 15, 16, 17), steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                    kl_factor=0.0625, mom2_update_weight=20000.0),
    "gpt-j-6b": dict(layers=(3, 4, 5, 6, 7, 8), steps=25, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                     kl_factor=0.0625, mom2_update_weight=15000.0),
    "llama3-8b": dict(layers=(4, 5, 6, 7, 8), steps=25, lr=0.1, weight_decay=0.5, clamp_norm_factor=0.75,
                      kl_factor=0.0625, mom2_update_weight=15000.0),
    "smollm2-135m": dict(layers=(3, 4, 5, 6, 7), mom2_update_weight=2500.0),  # measured (README)
    "gemma3-270m": dict(layers=(3, 4, 5, 6, 7), mom2_update_weight=1000.0),  # measured (README)
}


def memit_factors(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [d_model, n], V [d_ff, n])`` with ``U Vᵀ = Rᵀ K (λC + KᵀK)⁻¹`` (float64)."""
    k, r, c = keys.double(), resid.double(), mom2.double()
    v = torch.linalg.solve(lam * c + k.T @ k, k.T)
    return r.T.contiguous(), v


@register("memit")
class MEMITEditor(ClosedFormEditor):
    hparams_cls = MEMITHparams
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return memit_factors(keys, resid, self.mom2(layer), self.hparams.mom2_update_weight)
