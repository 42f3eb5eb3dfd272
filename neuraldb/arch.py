"""Per-architecture facts, as data: one entry per ``config.model_type``.

Everything the locate-and-edit machinery needs to know about a model family lives in
:data:`ARCHITECTURES`; no other module branches on model names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where the FFN output projection ("W_out", the rewrite module) sits in one model family.

    Attributes:
        layers: dotted path of the ``nn.ModuleList`` of decoder blocks.
        w_out: path of the FFN output projection inside block ``{i}``; its input is the key
            (``d_ff``) and its output the value (``d_model``).
        conv1d: True when ``w_out`` is a GPT-2 ``Conv1D`` whose weight is stored ``[d_ff, d_model]``
            (transposed with respect to ``nn.Linear``'s ``[d_model, d_ff]``).
        ffn_post_norm: path of a norm applied to the FFN output before the residual add
            (Gemma-3's ``post_feedforward_layernorm``), or None when the output is added as is.
        n_layers, d_model, d_ff: names of the config attributes holding these sizes.
    """

    layers: str
    w_out: str
    conv1d: bool = False
    ffn_post_norm: str | None = None
    n_layers: str = "num_hidden_layers"
    d_model: str = "hidden_size"
    d_ff: str = "intermediate_size"


_LLAMA = ArchSpec(layers="model.layers", w_out="mlp.down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": ArchSpec(
        layers="model.layers", w_out="mlp.down_proj", ffn_post_norm="post_feedforward_layernorm"
    ),
    "gpt2": ArchSpec(
        layers="transformer.h", w_out="mlp.c_proj", conv1d=True,
        n_layers="n_layer", d_model="n_embd", d_ff="n_inner",
    ),
    "gptj": ArchSpec(
        layers="transformer.h", w_out="mlp.fc_out", n_layers="n_layer", d_model="n_embd", d_ff="n_inner"
    ),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", w_out="mlp.dense_4h_to_h"),
}


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ModelArch:
    """An :class:`ArchSpec` resolved against one loaded model's config."""

    model_type: str
    spec: ArchSpec
    n_layers: int
    d_model: int
    d_ff: int

    def layer_path(self, layer: int) -> str:
        return f"{self.spec.layers}.{layer}"

    def w_out_path(self, layer: int) -> str:
        return f"{self.spec.layers}.{layer}.{self.spec.w_out}"

    def post_norm_path(self, layer: int) -> str | None:
        if self.spec.ffn_post_norm is None:
            return None
        return f"{self.spec.layers}.{layer}.{self.spec.ffn_post_norm}"

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}")


def arch_of(model: nn.Module) -> ModelArch:
    """Resolve the architecture entry for ``model`` (a transformers causal LM).

    Raises:
        UnsupportedModelError: naming the model type and the supported ones.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(f"unsupported model type {model_type!r}; supported: {supported}")
    d_model = int(getattr(config, spec.d_model))
    d_ff = getattr(config, spec.d_ff, None)
    if d_ff is None:  # GPT-2 / GPT-J leave n_inner unset to mean 4 * d_model
        d_ff = 4 * d_model
    return ModelArch(model_type, spec, int(getattr(config, spec.n_layers)), d_model, int(d_ff))
