"""Keys at several layers with the model as it is now (MEMIT's ``compute_ks``).

A fact's key at layer l is the input of that layer's FFN output projection at the subject's last
token, averaged over the context templates (½·bare prompt + ½·mean of the others, see
:func:`neuraldb.targets.average_keys`). The closed-form editors need them at every edit layer,
recomputed after each layer's update, together with a block's output at the subject's last token
of the bare prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch

from neuraldb.facts import EditRequest
from neuraldb.hooks import capture, get_module, stop_after
from neuraldb.models import LoadedModel
from neuraldb.prompts import Batch, aligned_batch
from neuraldb.targets import Rows, average_keys, build_rows


@dataclass
class SubjectKeys:
    """``keys[l]``: ``[F, d_ff]`` template-averaged keys at layer l (float32, CPU);
    ``outputs``: ``[F, d_model]`` the requested block's output at the subject's last token of the
    bare prompt (float32, CPU), or None when no block was asked for; ``values[l]``: ``[F, d_model]``
    layer l's FFN output projection output there (the pre-norm value)."""

    keys: dict[int, torch.Tensor]
    outputs: torch.Tensor | None
    values: dict[int, torch.Tensor]


@torch.no_grad()
def subject_keys(
    lm: LoadedModel, requests: list[EditRequest], templates: list[str], layers: list[int],
    output_layer: int | None = None, batch_size: int = 64, skip_first: bool = False,
    position: Literal["subject", "last"] = "subject",
) -> SubjectKeys:
    """Keys of ``requests`` at every layer in ``layers`` (and block ``output_layer``'s output) in one
    forward pass per batch of ``batch_size`` facts, stopped after the highest layer needed.
    ``skip_first``: see :func:`neuraldb.targets.average_keys` (off: every row, as MEMIT);
    ``position="last"``: read at the prompt's last token instead of the subject's."""
    arch = lm.arch
    for layer in [*layers, *([] if output_layer is None else [output_layer])]:
        arch.check_layer(layer)
    top = max([*layers, *([] if output_layer is None else [output_layer])])
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    outputs: list[torch.Tensor] = []
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(requests), batch_size):
        rows = build_rows(lm, requests[start : start + batch_size], templates, targets=False, position=position)
        batch = aligned_batch(rows.encoded, lm.tokenizer.pad_token_id)
        s, dev = batch.anchor, lm.device
        outputs_at = {f"v{layer}": arch.w_out_path(layer) for layer in layers}
        if output_layer is not None:
            outputs_at["out"] = arch.layer_path(output_layer)
        probes = {"inputs": {str(layer): arch.w_out_path(layer) for layer in layers}, "outputs": outputs_at}
        with capture(lm.model, **probes, select=lambda t, s=s: t[:, s].float().cpu()) as got:
            with stop_after(lm.model, arch.layer_path(top)):
                lm.backbone(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                            position_ids=batch.position_ids.to(dev))
        bare = torch.tensor(rows.bare)
        for layer in layers:
            keys[layer].append(average_keys(got[str(layer)], rows, skip_first))
            values[layer].append(got[f"v{layer}"][bare])
        if output_layer is not None:
            outputs.append(got["out"][bare])
    return SubjectKeys({layer: torch.cat(k) for layer, k in keys.items()},
                       torch.cat(outputs) if outputs else None,
                       {layer: torch.cat(v) for layer, v in values.items()})


def value_residuals(lm: LoadedModel, layer: int, values: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """Residuals of the block's output ``[F, d_model]`` → changes of the FFN output projection's output.

    Without a post-FFN norm they are the same. With one (Gemma-3: ``h += norm(W k)``), the change
    ``r`` of ``norm(v)`` is mapped back through the norm's Jacobian at the current value ``v``
    (``values`` ``[F, d_model]``): ``Δv = J⁺ r``, the least-norm first-order pre-image. A norm is
    scale-invariant, so the part of ``r`` along ``norm(v)``'s scaling direction is not reachable.
    """
    path = lm.arch.post_norm_path(layer)
    if path is None:
        return resid
    norm = copy.deepcopy(get_module(lm.model, path)).to("cpu", torch.float64)  # float64: bf16 Jacobians are off by %
    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(lambda v: norm(v.unsqueeze(0)).squeeze(0)))(
            values.double().cpu())  # [F, d_model, d_model]
    # rtol drops the (near-)zero singular value of the scale direction (non-zero only through eps)
    return (torch.linalg.pinv(jac, rtol=1e-4) @ resid.double().unsqueeze(2)).squeeze(2).float()


@dataclass
class _WindowBatch:
    """One batch of :func:`_subject_windows`: its rows and padded batch, the unit keys
    ``unit`` ``[rows, anchor + 1, d_ff]`` of every column up to the subject's last token, and each
    fact's window ``width`` ``[F]`` (its subject's token count in the bare prompt, capped)."""

    rows: Rows
    batch: Batch
    unit: torch.Tensor
    width: torch.Tensor


def _subject_windows(lm: LoadedModel, requests: list[EditRequest], templates: list[str], layer: int,
                     batch_size: int, most: int) -> Iterator[_WindowBatch]:
    """The unit keys at ``layer`` of every token up to the subject's last, per batch of facts (one
    forward each, stopped after ``layer``); ``most``: cap on the window (0: the whole subject)."""
    lm.arch.check_layer(layer)
    for start in range(0, len(requests), batch_size):
        rows = build_rows(lm, requests[start : start + batch_size], templates, targets=False)
        batch = aligned_batch(rows.encoded, lm.tokenizer.pad_token_id)
        s, dev = batch.anchor, lm.device
        with capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)},
                     select=lambda t, s=s: t[:, : s + 1].float().cpu()) as got:
            with stop_after(lm.model, lm.arch.layer_path(layer)):
                lm.backbone(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                            position_ids=batch.position_ids.to(dev))
        width = torch.tensor([max(1, rows.encoded[b].subject_tokens) for b in rows.bare])
        yield _WindowBatch(rows, batch, torch.nn.functional.normalize(got["k"], dim=-1),
                           width.clamp(max=most) if most else width)


@torch.no_grad()
def pooled_keys(lm: LoadedModel, requests: list[EditRequest], templates: list[str], layer: int,
                batch_size: int = 64, most: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject keys pooled over the subject's tokens, as :func:`neuraldb.gate.window_cosines`
    reads them at inference: ``(keys [F, d_ff] unit-norm, windows [F])``.

    A fact's window w is its subject's token count in the bare prompt (at most ``most``; 0: no
    limit). In every row (the prompt under each context template) the unit keys of the w tokens
    ending at the subject's last token are summed, leaving out the row's first token when w > 1
    (the attention sink), and normalised; rows are averaged as
    :func:`neuraldb.targets.average_keys` does (a row whose subject ends on its first token is left
    out), and the result normalised."""
    keys, windows = [], []
    for wb in _subject_windows(lm, requests, templates, layer, batch_size, most):
        rows, batch, unit = wb.rows, wb.batch, wb.unit
        per_row = []
        for r, e in enumerate(rows.encoded):
            w = int(wb.width[rows.fact[r]])
            first = max(e.subject_last - w + 1, 1 if w > 1 else 0)  # token indices in row r
            cols = slice(int(batch.offset[r]) + first, int(batch.offset[r]) + e.subject_last + 1)
            per_row.append(torch.nn.functional.normalize(unit[r, cols].sum(0), dim=0))
        keys.append(torch.nn.functional.normalize(average_keys(torch.stack(per_row), rows, True), dim=1))
        windows.append(wb.width)
    return torch.cat(keys), torch.cat(windows)


@dataclass
class TokenKeys:
    """The earlier subject tokens' keys of F facts, in *forms*: a subject tokenised two ways (" Jah ang
    ir" inside a sentence, "J ah ang ir" opening one) has one form per tokenisation, and a fact matches
    where any of its forms does. ``facts`` ``[C]``: the fact (0 … F−1, ascending) of each form;
    ``windows`` ``[C]``: each form's token count w (its last token is the fact's last-token key);
    ``keys`` ``[Σ(w−1), d_ff]``: form by form, the tokens 1, 2, … w−1 places before the subject's
    last, unit-norm (zero for a place seen only as a prompt's first token); ``first`` ``[C, d_ff]``
    unit-norm: the key of each form's first token as a call's first token, where a key depends on
    the token alone (:func:`neuraldb.gate.token_cosines`); ``last`` ``[C, d_ff]``: each form's
    last-token key, read where the form occurs (zero if only at a call's first token)."""

    keys: torch.Tensor
    windows: torch.Tensor
    facts: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    @classmethod
    def empty(cls, d_ff: int) -> TokenKeys:
        return cls(torch.zeros(0, d_ff), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, d_ff), torch.zeros(0, d_ff))

    def spans(self) -> list[tuple[int, int]]:
        """Each form's rows in ``keys``: ``(start, stop)``."""
        sizes = (self.windows - 1).tolist()
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [(a, a + n) for a, n in zip(starts, sizes)]

    def select(self, facts: list[int]) -> TokenKeys:
        """The forms of ``facts`` (indices, ascending), renumbered 0 … len(facts)−1."""
        new = {f: i for i, f in enumerate(facts)}
        cols = [c for c, f in enumerate(self.facts.tolist()) if f in new]
        spans = self.spans()
        rows = [r for c in cols for r in range(*spans[c])]
        return TokenKeys(self.keys[rows], self.windows[cols],
                         torch.tensor([new[f] for f in self.facts[cols].tolist()], dtype=torch.long), self.first[cols],
                         self.last[cols])

    def cat(self, other: TokenKeys, offset: int) -> TokenKeys:
        """These forms followed by ``other``'s, whose facts are numbered from ``offset``."""
        return TokenKeys(torch.cat([self.keys, other.keys.float()]), torch.cat([self.windows, other.windows.long()]),
                         torch.cat([self.facts, other.facts.long() + offset]),
                         torch.cat([self.first, other.first.float()]), torch.cat([self.last, other.last.float()]))

    def check(self, n_facts: int, d_ff: int) -> str | None:
        """What is wrong with these forms for a store of ``n_facts`` facts (None: nothing)."""
        w, f = self.windows, self.facts
        if w.dtype != torch.int64 or f.dtype != torch.int64 or w.dim() != 1 or w.shape != f.shape:
            return "token windows and token facts must be int64 vectors of one length"
        if bool((w < 1).any()) or (len(f) and (bool((f[1:] < f[:-1]).any()))):
            return "token windows must be at least 1 and token facts ascending"
        if sorted(set(f.tolist())) != list(range(n_facts)):
            return f"token facts must name each of the {n_facts} facts"
        if self.keys.shape != (int((w - 1).sum()), d_ff) or not bool(torch.isfinite(self.keys).all()):
            return "token keys must be finite, one row per earlier token of each form"
        for name, t in (("first-token", self.first), ("last-token", self.last)):
            if t.shape != (len(w), d_ff) or not bool(torch.isfinite(t).all()):
                return f"{name} keys must be finite, one row per form"
        return None


Seen = dict[tuple[int, ...], tuple[list[dict[int, torch.Tensor]], list[dict[int, torch.Tensor]]]]


def _places(unit: torch.Tensor, row: int, column: int, subject_last: int, width: int) -> dict[int, torch.Tensor]:
    """The unit keys ``[d_ff]`` of row ``row``'s subject's last token (place 0, at ``column`` in
    ``unit`` ``[rows, T, d_ff]``) and of the places ``back`` = 1 … width−1 before it, leaving out
    the row's first token."""
    return {back: unit[row, column - back] for back in range(width) if subject_last - back >= 1}


@torch.no_grad()
def token_keys(lm: LoadedModel, requests: list[EditRequest], templates: list[str], layer: int,
               batch_size: int = 64, most: int = 0) -> TokenKeys:
    """The keys of each subject's tokens before its last, aligned from the end, as
    :func:`neuraldb.gate.token_cosines` reads them at inference (:class:`TokenKeys`).

    A fact is seen in its prompt under each context template and in its subject alone (which opens
    a call, as a subject opening a question does); the rows are grouped by how they tokenise the
    subject, and each tokenisation is a form (in the order first seen) whose window is its
    subject's token count (at most ``most``; 0: no limit). A place's key (the subject's last token's
    included: each form has its own, read where that form occurs) is read in every row of
    the form where it is not the row's first token (the attention sink, where every token's key is
    alike), and averaged as :func:`neuraldb.targets.average_keys` does (½·bare prompt + ½·mean of
    the other rows, whichever the form has), then normalised; a place no row has elsewhere keeps a
    zero key (it matches nothing there). A form's first-token key is that token's key in a forward
    of its own (position 0)."""
    seen: list[Seen] = [{} for _ in requests]
    alone = [replace(r, template="{}") for r in requests]
    for reqs, ctx in ((requests, templates), (alone, ["{}"])):
        done = 0
        for wb in _subject_windows(lm, reqs, ctx, layer, batch_size, most):
            rows, batch = wb.rows, wb.batch
            for f, (bare, templated) in enumerate(zip(rows.bare, rows.templated)):
                for r in [bare, *templated]:
                    e = rows.encoded[r]
                    ids = e.ids[e.subject_first : e.subject_last + 1]
                    w = min(len(ids), most) if most else len(ids)
                    got = _places(wb.unit, r, int(batch.offset[r]) + e.subject_last, e.subject_last, w)
                    bare_row = r == bare and reqs is requests
                    seen[done + f].setdefault(ids[len(ids) - w :], ([], []))[0 if bare_row else 1].append(got)
            done += len(rows.bare)
    keys: list[torch.Tensor] = []
    last: list[torch.Tensor] = []
    windows: list[int] = []
    facts: list[int] = []
    firsts: list[int] = []
    zero = torch.zeros(lm.arch.d_ff)
    for f, forms in enumerate(seen):
        for ids, groups in forms.items():
            for back in range(len(ids)):
                seen_at = ([g[back] for g in grp if back in g] for grp in groups)
                parts = [torch.stack(at).mean(0) for at in seen_at if at]
                (keys if back else last).append(
                    torch.nn.functional.normalize(torch.stack(parts).mean(0), dim=0) if parts else zero)
            windows.append(len(ids))
            facts.append(f)
            firsts.append(ids[0])
    d_ff = lm.arch.d_ff
    return TokenKeys(torch.stack(keys) if keys else torch.zeros(0, d_ff), torch.tensor(windows, dtype=torch.long),
                     torch.tensor(facts, dtype=torch.long), first_keys(lm, firsts, layer, batch_size),
                     torch.stack(last) if last else torch.zeros(0, d_ff))


@torch.no_grad()
def first_keys(lm: LoadedModel, token_ids: list[int], layer: int, batch_size: int = 256) -> torch.Tensor:
    """``[len(token_ids), d_ff]`` unit-norm: each token's key at ``layer`` as the first token of a
    forward call (there it depends on the token alone: nothing comes before it)."""
    out = [torch.zeros(0, lm.arch.d_ff)]
    for start in range(0, len(token_ids), batch_size):
        ids = torch.tensor(token_ids[start : start + batch_size], dtype=torch.long)[:, None]
        with capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)}, select=lambda t: t[:, 0].float().cpu()) as got:
            with stop_after(lm.model, lm.arch.layer_path(layer)):
                lm.backbone(input_ids=ids.to(lm.device))
        out.append(torch.nn.functional.normalize(got["k"], dim=-1))
    return torch.cat(out)
