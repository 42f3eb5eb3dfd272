"""Reversible edits of FFN output projections, kept as accumulated low-rank factors.

A closed-form editor's update of one layer is ``Δ = U Vᵀ`` with ``U`` ``[d_model, n]`` and ``V``
``[d_ff, n]`` (n = facts in the batch); sequential batches append columns. The edited weight is
always computed from the untouched base weight in one way, ``W = cast(W₀ + U Vᵀ)`` in float64 on
the CPU, so:

* :meth:`WeightEdits.restore` copies W₀ back (bit for bit);
* a saved artifact (factors, or the dense float64 Δ when that is smaller) applied to a fresh
  copy of the base model reproduces the edited weights exactly; the sha256 of both the base and
  the edited weight of every layer is recorded and checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from neuraldb.files import ArtifactError
from neuraldb.hooks import get_module
from neuraldb.models import LoadedModel


def weight_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class LayerEdit:
    """One edited projection: its base weight (CPU copy) and the factors applied so far."""

    layer: int
    path: str
    base: torch.Tensor
    u: torch.Tensor  # [d_model, r] float64
    v: torch.Tensor  # [d_ff, r] float64
    dense: torch.Tensor | None = field(default=None)  # [d_model, d_ff] float64, when loaded dense

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def delta(self) -> torch.Tensor:
        """``[d_model, d_ff]`` float64."""
        d = self.u @ self.v.T
        return d if self.dense is None else self.dense + d


class WeightEdits:
    """The edits of one model's output projections at ``layers``."""

    def __init__(self, lm: LoadedModel, layers: list[int]):
        self.lm = lm
        arch = lm.arch
        self.layers: dict[int, LayerEdit] = {}
        for layer in sorted(layers):
            path = arch.w_out_path(layer)
            base = get_module(lm.model, path).weight.detach().cpu().clone()
            self.layers[layer] = LayerEdit(layer, path, base, torch.zeros(arch.d_model, 0, dtype=torch.float64),
                                           torch.zeros(arch.d_ff, 0, dtype=torch.float64))

    def _weight(self, layer: int) -> torch.nn.Parameter:
        return get_module(self.lm.model, self.layers[layer].path).weight

    def add(self, layer: int, u: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``Δ = u vᵀ`` (``u`` ``[d_model, n]``, ``v`` ``[d_ff, n]``) to ``layer`` and apply it.

        Once the factors would be larger than the dense update, they are folded into it (the
        applied weight is then computed from the dense update; saving stores exactly that)."""
        e = self.layers[layer]
        e.u = torch.cat([e.u, u.detach().cpu().double()], 1)
        e.v = torch.cat([e.v, v.detach().cpu().double()], 1)
        if self._dense_is_smaller(e):
            e.dense, e.u, e.v = e.delta(), e.u[:, :0], e.v[:, :0]
        self._apply(layer)

    def mark(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The current factors of every layer, for :meth:`rollback`."""
        return {layer: (e.u, e.v, e.dense) for layer, e in self.layers.items()}

    def rollback(self, marked: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Return every layer to the factors recorded by :meth:`mark` (weights recomputed identically)."""
        with torch.no_grad():
            for layer, (u, v, dense) in marked.items():
                e = self.layers[layer]
                e.u, e.v, e.dense = u, v, dense
                if e.rank or e.dense is not None:
                    self._apply(layer)
                else:
                    self._weight(layer).copy_(e.base)

    def _apply(self, layer: int) -> None:
        e = self.layers[layer]
        d = e.delta()
        if self.lm.arch.spec.conv1d:  # Conv1D stores [d_ff, d_model]
            d = d.T
        w = self._weight(layer)
        with torch.no_grad():
            w.copy_((e.base.double() + d).to(e.base.dtype))

    def restore(self) -> None:
        """Put every base weight back (bit for bit) and forget the factors."""
        with torch.no_grad():
            for layer, e in self.layers.items():
                self._weight(layer).copy_(e.base)
                e.u, e.v, e.dense = e.u[:, :0], e.v[:, :0], None

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The base weights inside the block; the edits are re-applied (identically) after it."""
        with torch.no_grad():
            for layer, e in self.layers.items():
                self._weight(layer).copy_(e.base)
        try:
            yield
        finally:
            for layer, e in self.layers.items():
                if e.rank or e.dense is not None:
                    self._apply(layer)

    @property
    def edited(self) -> bool:
        """True when any layer carries an edit (factors or a dense update)."""
        return any(e.rank or e.dense is not None for e in self.layers.values())

    # -- persistence ------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for layer, e in self.layers.items():
            dense = self._dense_is_smaller(e)
            out.append({"layer": layer, "path": e.path, "shape": list(e.base.shape), "dtype": str(e.base.dtype),
                        "format": "dense" if dense else "lowrank", "rank": None if dense else e.rank,
                        "base_sha256": weight_sha256(e.base), "edited_sha256": weight_sha256(self._weight(layer))})
        return out

    @staticmethod
    def _dense_is_smaller(e: LayerEdit) -> bool:
        d_model, d_ff = e.u.shape[0], e.v.shape[0]
        return e.dense is not None or e.rank * (d_model + d_ff) >= d_model * d_ff

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, e in self.layers.items():
            if self._dense_is_smaller(e):
                out[f"layer{layer}.delta"] = e.delta()
            else:
                out[f"layer{layer}.u"], out[f"layer{layer}.v"] = e.u, e.v
        return out

    def load(self, described: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        """Apply saved edits to the base model, checking base and result against their sha256; on
        any failure the layers already applied are put back (the model is left as it was)."""
        try:
            self._load(described, tensors)
        except BaseException:
            self.restore()
            raise

    def _load(self, described: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        for d in described:
            layer = int(d["layer"])
            if layer not in self.layers:
                raise ArtifactError(f"edits touch layer {layer}, which the hyperparameters do not list")
            e = self.layers[layer]
            if weight_sha256(e.base) != d["base_sha256"]:
                raise ArtifactError(f"{e.path} is not the weight these edits were made on (sha256 differs): "
                                    "load them into the unedited base model")
            if d["format"] == "dense":
                e.dense = tensors[f"layer{layer}.delta"].double()
            else:
                e.u, e.v = tensors[f"layer{layer}.u"].double(), tensors[f"layer{layer}.v"].double()
            self._apply(layer)
            if weight_sha256(self._weight(layer)) != d["edited_sha256"]:
                raise ArtifactError(f"applying the saved edit of {e.path} did not reproduce the edited weight")
