"""Module lookup, activation capture and layer stand-ins: the low-level locate-and-edit tools."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise AttributeError(f"model has no module {path!r}") from None


def first_tensor(output: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is one (4.x)."""
    return output[0] if isinstance(output, tuple) else output


def like(output: Any, hidden: torch.Tensor) -> Any:
    """Put ``hidden`` where :func:`first_tensor` found the hidden state of ``output``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(
    model: nn.Module, inputs: dict[str, str] | None = None, outputs: dict[str, str] | None = None,
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record module inputs / outputs during the forward passes run inside the block.

    Args:
        inputs: {name: module path} whose first positional input to record.
        outputs: {name: module path} whose output (hidden state) to record.
        select: applied to each recorded ``[batch, seq, dim]`` tensor before it is kept (e.g. a
            gather of a few positions) so that full activations are not retained.

    Yields:
        dict name → recorded tensor (filled after the forward pass).
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, path in (inputs or {}).items():
        def pre(_m, args, _name=name):
            store[_name] = select(args[0].detach())
        handles.append(get_module(model, path).register_forward_pre_hook(pre))
    for name, path in (outputs or {}).items():
        def post(_m, _args, out, _name=name):
            store[_name] = select(first_tensor(out).detach())
        handles.append(get_module(model, path).register_forward_hook(post))
    with hooks(handles):
        yield store


class _Stop(Exception):
    """Raised by :func:`stop_after`'s hook to end a forward pass early."""


@contextmanager
def stop_after(model: nn.Module, path: str) -> Iterator[None]:
    """End the one forward pass run inside the block right after module ``path`` has run.

    The layers above ``path`` are never computed; the block is left at that point, so put
    exactly one forward call inside it and read the results from :func:`capture`, entered
    *before* this block so that captures on ``path`` itself still fire (hooks run in the order
    they were registered).
    """
    def stop(_m, _a, _o):
        raise _Stop

    handle = get_module(model, path).register_forward_hook(stop)
    try:
        yield
    except _Stop:
        pass
    finally:
        handle.remove()


class _StandIn(nn.Module):
    """Replaces a decoder block: returns its input unchanged, or a fixed hidden state."""

    def __init__(self, original: nn.Module, hidden: Callable[[], torch.Tensor] | None, tuple_out: bool):
        super().__init__()
        self.original = [original]  # a list, so the block is not registered as a submodule
        self.hidden = hidden
        self.tuple_out = tuple_out

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self.hidden is None else self.hidden()
        return (out,) if self.tuple_out else out


@contextmanager
def start_at_layer(
    model: nn.Module, layers_path: str, layer: int, hidden: Callable[[], torch.Tensor], tuple_out: bool = False
) -> Iterator[None]:
    """Run only blocks ``layer+1 ..`` : blocks ``0..layer`` are replaced by stand-ins, and block
    ``layer`` emits ``hidden()`` (``[batch, seq, d_model]``) as its output.

    The model's own forward still prepares masks and position embeddings, so this works for every
    architecture without re-implementing any of them.
    """
    blocks: nn.ModuleList = get_module(model, layers_path)
    saved = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            blocks[i] = _StandIn(saved[i], hidden if i == layer else None, tuple_out)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def prefix_cache(cache: DynamicCache, length: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``length`` positions of every layer's keys and values, detached.

    ``start``: the pass ran only blocks ``start ..`` (:func:`start_at_layer`), so the layers below
    hold nothing; they get zeros shaped like block ``start``'s, which a later pass under the same
    stand-ins never attends to (the mask reads only their length)."""
    if start == 0:
        return [(k[..., :length, :].detach(), v[..., :length, :].detach()) for k, v, *_ in cache]
    kv = [(layer.keys[..., :length, :].detach(), layer.values[..., :length, :].detach())
          for layer in cache.layers[start:]]
    k, v = kv[0]
    return [(k.new_zeros(k.shape), v.new_zeros(v.shape))] * start + kv


def cache_from(prefix: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> DynamicCache:
    """A fresh cache holding ``prefix`` (a new object each call, as forward passes extend it)."""
    return DynamicCache(prefix, config=config)
