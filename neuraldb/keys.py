"""Keys at several layers with the model as it is now (MEMIT's ``compute_ks``).

A fact's key at layer l is the input of that layer's FFN output projection at the subject's last
token, averaged over the context templates (½·bare prompt + ½·mean of the others, see
:func:`neuraldb.targets.average_keys`). The closed-form editors need them at every edit layer,
recomputed after each layer's update, together with a block's output at the subject's last token
of the bare prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuraldb.facts import EditRequest
from neuraldb.hooks import capture, stop_after
from neuraldb.models import LoadedModel
from neuraldb.prompts import aligned_batch
from neuraldb.targets import average_keys, build_rows


@dataclass
class SubjectKeys:
    """``keys[l]``: ``[F, d_ff]`` template-averaged keys at layer l (float32, CPU);
    ``outputs``: ``[F, d_model]`` the requested block's output at the subject's last token of the
    bare prompt (float32, CPU), or None when no block was asked for."""

    keys: dict[int, torch.Tensor]
    outputs: torch.Tensor | None


@torch.no_grad()
def subject_keys(
    lm: LoadedModel, requests: list[EditRequest], templates: list[str], layers: list[int],
    output_layer: int | None = None, batch_size: int = 64,
) -> SubjectKeys:
    """Keys of ``requests`` at every layer in ``layers`` (and block ``output_layer``'s output) in one
    forward pass per batch of ``batch_size`` facts, stopped after the highest layer needed."""
    arch = lm.arch
    for layer in [*layers, *([] if output_layer is None else [output_layer])]:
        arch.check_layer(layer)
    top = max([*layers, *([] if output_layer is None else [output_layer])])
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    outputs: list[torch.Tensor] = []
    for start in range(0, len(requests), batch_size):
        rows = build_rows(lm, requests[start : start + batch_size], templates, targets=False)
        batch = aligned_batch(rows.encoded, lm.tokenizer.pad_token_id)
        s, dev = batch.anchor, lm.device
        probes = {"inputs": {str(layer): arch.w_out_path(layer) for layer in layers},
                  "outputs": {} if output_layer is None else {"out": arch.layer_path(output_layer)}}
        with capture(lm.model, **probes, select=lambda t, s=s: t[:, s].float().cpu()) as got:
            with stop_after(lm.model, arch.layer_path(top)):
                lm.backbone(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                            position_ids=batch.position_ids.to(dev))
        for layer in layers:
            keys[layer].append(average_keys(got[str(layer)], rows))
        if output_layer is not None:
            outputs.append(got["out"][torch.tensor(rows.bare)])
    return SubjectKeys({layer: torch.cat(k) for layer, k in keys.items()},
                       torch.cat(outputs) if outputs else None)
