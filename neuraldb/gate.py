"""The NeuralDB gate: a parameter-free, removable wrapper around one FFN output projection.

For every token with key k (the projection's input, ``d_ff``):

    j = argmax_i cos(k, k_i);   out = W k + r_j   if cos(k, k_j) > θ_j,   W k otherwise

θ_j is fact j's threshold: γ for every fact with the plain cosine gate, or γ raised to the fact's
radius (:mod:`neuraldb.radius`). One matmul against the unit-normalised stored keys per forward;
no loop over tokens or facts.
Where nothing fires the base output is returned untouched (``torch.where``), so the gated model's
logits equal the base model's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuraldb.hooks import get_module


@dataclass
class Firing:
    """Trace of one forward: per token, the best stored fact and its cosine.

    ``index``, ``cosine``, ``fired``: ``[batch, seq]``.
    """

    index: torch.Tensor
    cosine: torch.Tensor
    fired: torch.Tensor


class GatedProjection(nn.Module):
    """Wraps ``base_layer`` (Linear or Conv1D); keys ``[m, d_ff]`` unit-norm, residuals
    ``[m, d_model]``, thresholds ``[m]`` (or one float for every fact)."""

    def __init__(self, base_layer: nn.Module, keys: torch.Tensor, residuals: torch.Tensor,
                 thresholds: torch.Tensor | float):
        super().__init__()
        self.base_layer = base_layer
        self.enabled = True
        self.trace: list[Firing] | None = None
        self.set_memory(keys, residuals, thresholds)

    def set_memory(self, keys: torch.Tensor, residuals: torch.Tensor, thresholds: torch.Tensor | float) -> None:
        w = next(self.base_layer.parameters())
        self.keys = keys.to(w.device, torch.float32)
        self.residuals = residuals.to(w.device, torch.float32)
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32).expand(keys.shape[0]).to(w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled or self.keys.shape[0] == 0:
            return out
        cos = torch.nn.functional.normalize(x.float(), dim=-1) @ self.keys.T  # [..., m]
        best, index = cos.max(dim=-1)
        fired = best > self.thresholds[index]
        if self.trace is not None:
            self.trace.append(Firing(index.cpu(), best.cpu(), fired.cpu()))
        if not bool(fired.any()):
            return out
        added = (out.float() + self.residuals[index]).to(out.dtype)
        return torch.where(fired.unsqueeze(-1), added, out)


def install(model: nn.Module, path: str, keys: torch.Tensor, residuals: torch.Tensor,
            thresholds: torch.Tensor | float) -> GatedProjection:
    """Wrap the module at ``path`` (or update the wrapper already there) and return the gate;
    ``thresholds``: θ per fact ``[m]``, or γ for every fact."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    current = getattr(parent, name)
    if isinstance(current, GatedProjection):
        current.set_memory(keys, residuals, thresholds)
        return current
    gate = GatedProjection(current, keys, residuals, thresholds)
    setattr(parent, name, gate)
    return gate


def find(model: nn.Module) -> tuple[str, GatedProjection] | None:
    for name, module in model.named_modules():
        if isinstance(module, GatedProjection):
            return name, module
    return None


def unload(model: nn.Module) -> None:
    """Put the original projection back (the model is then exactly the base model)."""
    found = find(model)
    if found is None:
        return
    path, gate = found
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, gate.base_layer)
