"""The NeuralDB gate: a parameter-free, removable wrapper around one FFN output projection.

For every token with key k (the projection's input, ``d_ff``):

    j = argmax_i cos(k, k_i);   out = W k + r_j   if cos(k, k_j) > θ_j,   W k otherwise

θ_j is fact j's threshold: γ for every fact with the plain cosine gate, or γ raised to the fact's
radius (:mod:`neuraldb.radius`). One matmul against the unit-normalised stored keys per forward;
no loop over tokens or facts.
With pooled keys (``key="pooled"``) the cosine is the pool's (:func:`window_cosines`); with dual keys
(``key="dual"``) the score is ``min(cos(k, k_j), pooled cosine + γ − γ_pool)``: a fact fires only
where the token's key matches its subject's last-token key above γ *and* the pool of the last w tokens
matches the subject's pooled key above γ_pool (:func:`subject_cosines`), so a shared last word alone
("Toko Jordan" for "Michael Jordan") no longer fires. With token keys (``key="tokens"``) the score is
``min(cos(k, k_j), lowest aligned cosine of the earlier subject tokens + γ − γ_token)``
(:func:`token_cosines`), the best over the subject's tokenisations (forms: " Jah ang ir" inside a
sentence, "J ah ang ir" opening one): every token of the subject must match in its place, so a
near-namesake that differs in one token ("Third / First Czechoslovak Republic") does not fire either.
Where nothing fires the base output is returned untouched (``torch.where``), so the gated model's
logits equal the base model's bit for bit.

The **relation gate** (:func:`install_relation`) asks two questions of a token, at two layers:

* has fact j's subject been seen at or before this token (in this forward)? At the subject layer a
  :class:`SubjectWatch` (which changes nothing) marks, per earlier-or-current token, every fact
  whose subject key's cosine exceeds θ_j: ``seen [batch, seq, m]`` (a running maximum over the
  sequence, so causal);
* is this token asking fact j's question? At the relation layer the token's key is mapped to a
  relation key (:class:`neuraldb.relation.RelationMap`) and compared with fact j's.

    j = argmax over seen facts of cos(R(k), r_j);   out = W k + r_j if cos(R(k), r_j) > ρ, else W k

The residual sits at the relation layer, at the prompt's last token. "Seen" is computed within
one forward call: with a KV cache, a subject in an earlier call is not seen (the residual written at
the prompt's last token is already in the cache, which is where the edit was trained to act).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuraldb.hooks import get_module
from neuraldb.index import KeyIndex, Search


@dataclass
class Firing:
    """Trace of one forward: per token, the best stored fact and its cosine.

    ``index``, ``cosine``, ``fired``: ``[batch, seq]``.
    """

    index: torch.Tensor
    cosine: torch.Tensor
    fired: torch.Tensor


def window_groups(windows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``windows`` ``[m]`` as (window length, the columns of the facts with it), shortest first:
    computed once per store change, not per forward (no host sync on the hot path)."""
    return [(w, (windows == w).nonzero().squeeze(1)) for w in sorted({int(w) for w in windows.tolist()})]


def window_cosines(x: torch.Tensor, keys: torch.Tensor, groups: list[tuple[int, torch.Tensor]],
                   starts: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines ``[b, t, m]`` of pooled token keys with stored unit keys ``[m, d_ff]``.

    ``groups``: :func:`window_groups` of the facts' windows. Fact j's key pools its window w
    (its subject's length in tokens): at token t, the sum of the unit keys of tokens t-w+1 … t of
    ``x`` ``[b, t, d_ff]`` (w = 1: token t's key, as the plain gate), leaving out each row's first
    token when w > 1 (the attention sink every sequence starts with) and any left padding before
    it; where a window does not fit in the row's text in this call (t < start + w − 1) the cosine
    is -2 (never fires). ``starts`` ``[b]``: where each row's text begins in this call
    (:class:`RowStarts`; −1: in an earlier call, nothing left out; None: at column 0). One pass per
    distinct window length, none per fact or token."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    b, n = u.shape[:2]
    starts = u.new_zeros(b, dtype=torch.long) if starts is None else starts
    pos = torch.arange(n, device=u.device)[None, :]
    cos = u.new_full((*u.shape[:-1], keys.shape[0]), -2.0)
    sinkless = torch.where((pos <= starts[:, None])[..., None], 0.0, u)  # padding and each row's first token
    pooled, done = torch.zeros_like(u), 0  # pooled = Σ_{j < done} sinkless shifted right by j
    for w, cols in groups:
        if w == 1:
            cos[..., cols] = u @ keys[cols].T
            continue
        for j in range(done, min(w, u.shape[1])):
            pooled[:, j:] += sinkless[:, : u.shape[1] - j]
        done = w
        c = torch.nn.functional.normalize(pooled, dim=-1) @ keys[cols].T  # [b, t, m_w]
        cos[..., cols] = torch.where((pos < starts.clamp(min=0)[:, None] + w - 1)[..., None], -2.0, c)
    return cos


def token_groups(windows: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each place ``back`` = 1 … max(w) − 1 before a subject's last token, the columns of the
    forms whose window ``[C]`` reaches it and their rows in the flat token keys of
    :func:`token_cosines` (form by form, places 1 … w − 1 each): computed once per store change."""
    spans = (windows - 1).clamp(min=0)
    starts = spans.cumsum(0) - spans
    out = []
    for back in range(1, int(windows.max()) if len(windows) else 1):
        cols = (windows > back).nonzero().squeeze(1)
        out.append((back, cols, starts[cols] + back - 1))
    return out


def token_cosines(x: torch.Tensor, tokens: torch.Tensor, groups: list[tuple[int, torch.Tensor, torch.Tensor]],
                  windows: torch.Tensor, first: torch.Tensor, first_gamma: float,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """``[b, t, C]``: per token t and form c, the lowest cosine of the tokens before t with form c's
    subject tokens aligned from the end (``x`` ``[b, t, d_ff]``; ``tokens`` ``[Σ(w−1), d_ff]``,
    ``windows`` ``[C]``, ``first`` ``[C, d_ff]``: :class:`neuraldb.keys.TokenKeys`; ``groups``:
    :func:`token_groups`): the min over ``back`` = 1 … w_c − 1 of cos(x[t − back], tokens_c[back]).

    ``starts`` ``[b]``: where each row's text begins in this call (its first real token after any
    left padding; −1: in an earlier call; None: at 0). A place on a row's first token (the attention
    sink, where a key depends on the token alone and any two tokens' keys are alike) is checked for
    identity instead: the form's first token passes (+inf) where its cosine with ``first_c`` exceeds
    ``first_gamma``, and fails (−2) otherwise, so "Third Czechoslovak Republic" opening a prompt is
    not "First …"; a place before the row's start or the call (the window does not fit) scores −2
    (never fires); a form of one token (nothing to check) gets +inf. One matmul per place, none per
    form or token."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    b, n = u.shape[:2]
    starts = u.new_zeros(b, dtype=torch.long) if starts is None else starts
    at_start = u[torch.arange(b, device=u.device), starts.clamp(min=0)]  # [b, d_ff]: each row's first token
    low = u.new_full((b, n, len(windows)), float("inf"))
    pos = torch.arange(n, device=u.device)
    for back, cols, rows in groups:
        c = u.new_full((b, n, len(cols)), -2.0)
        if back < n:
            c[:, back:] = u[:, : n - back] @ tokens[rows].T
        place = (pos - back)[None, :]  # [1, n]: where the place falls
        same = (at_start @ first[cols].T) > first_gamma  # [b, |cols|]: the row opens with the form's first token
        opens = windows[cols] == back + 1  # the place is the form's first token (else its window does not fit)
        c = torch.where((place == starts[:, None])[..., None], torch.where(same | ~opens, float("inf"), -2.0)[:, None],
                        c)
        c = torch.where((place < starts.clamp(min=0)[:, None])[..., None], -2.0, c)
        low[..., cols] = torch.minimum(low[..., cols], c)
    return low


@dataclass
class StoredTokens:
    """The token side of ``key="tokens"`` on the gate's device: the forms' keys ``[Σ(w−1), d_ff]``,
    windows ``[C]``, facts ``[C]``, first-token keys ``[C, d_ff]`` and last-token keys ``[C, d_ff]``
    (:class:`neuraldb.keys.TokenKeys`), the shift γ − ``token_gamma`` of the earlier tokens'
    cosines, the shift γ − ``single_gamma`` of a one-token form's cosine (it fires above
    ``single_gamma``: nothing else to check) and ``first_gamma``, the identity threshold of a first
    token at the call's start."""

    keys: torch.Tensor
    windows: torch.Tensor
    facts: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    shift: float
    single_shift: float
    first_gamma: float
    index: KeyIndex | None = None  # over ``last``: the candidate stage (None: every form is scored)

    def __post_init__(self) -> None:
        spans = self.windows - 1
        self.starts = spans.cumsum(0) - spans  # each form's first row in ``keys``
        self.single = (self.windows == 1).nonzero().squeeze(1)
        self.use(self.index)

    def use(self, index: KeyIndex | None) -> None:
        """Score through ``index`` (None: every form), with the last-token keys list by list."""
        self.index = index
        self.grouped_last = None if index is None else index.grouped(self.last)

    def to(self, device: torch.device) -> StoredTokens:
        return StoredTokens(self.keys.to(device, torch.float32), self.windows.to(device), self.facts.to(device),
                            self.first.to(device, torch.float32), self.last.to(device, torch.float32), self.shift,
                            self.single_shift, self.first_gamma, None if self.index is None else self.index.to(device))

    def _columns(self, unit: torch.Tensor, b: torch.Tensor, starts: torch.Tensor,
                 floor: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(forms, cos)``: the forms to score for unit keys ``unit`` ``[b, t, d_ff]`` and their
        last-token cosines ``[b, t, |forms|]``. With an index and a finite ``floor``, the forms of the
        lists the call's tokens probe, each list scored on its contiguous block of ``grouped_last``,
        plus the one-token forms whose token opens a row (decided by identity, not by their cosine);
        else every form (``forms`` None)."""
        runs = None if self.index is None or floor == -math.inf else \
            self.index.probed(unit.reshape(-1, unit.shape[-1]))
        if runs is None:
            return None, unit @ self.last.T
        members = self.index.members  # type: ignore[union-attr]
        blocks = [unit @ self.grouped_last[s:e].T for s, e in runs]
        ids = [members[s:e] for s, e in runs]
        if bool((starts >= 0).any()) and len(self.single):
            opens = ((unit[b, starts.clamp(min=0)] @ self.first[self.single].T > self.first_gamma)
                     & (starts >= 0)[:, None]).any(0)
            extra = self.single[opens]
            if len(ids) and len(extra):
                extra = extra[~torch.isin(extra, torch.cat(ids))]
            ids.append(extra)
            blocks.append(unit @ self.last[extra].T)
        if not ids:
            return members[:0], unit.new_zeros(*unit.shape[:-1], 0)
        return torch.cat(ids), torch.cat(blocks, -1)

    def scores(self, x: torch.Tensor, m: int, floor: float = -math.inf,
               starts: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[..., m]`` of the ``m`` facts for token keys ``x`` ``[..., d_ff]``: per fact, the
        best of its forms, a form scoring ``min(cos(x_t, its last-token key), lowest aligned cosine of
        the earlier tokens + shift)`` (one token: the cosine + ``single_shift``, and where it opens the
        call 1 if it is the form's token, else −2). ``starts``: see :func:`token_cosines`.

        Only *hot* forms are scored in full: a form whose last-token cosine exceeds ``floor`` (the
        lowest threshold) somewhere in the call, or a one-token form opening it. The others keep
        their cosine, an upper bound of their score below every threshold, so which fact fires is the
        same as scoring every form (``floor`` −inf does, for traces)."""
        rows = x.reshape(-1, *x.shape[-2:])  # the places run along the sequence dimension
        unit = torch.nn.functional.normalize(rows.float(), dim=-1)
        b = torch.arange(unit.shape[0], device=unit.device)
        starts = starts if starts is not None and len(starts) == len(b) else b.new_zeros(len(b))
        cols, cos = self._columns(unit, b, starts, floor)  # the forms scored (None: all) and cos [b, t, |sub|]
        sub = torch.arange(len(self.windows), device=unit.device) if cols is None else cols

        def of(t: torch.Tensor) -> torch.Tensor:  # the scored forms' rows (no copy when all are scored)
            return t if cols is None else t[cols]

        single_sub = of(self.windows) == 1
        opening = (unit[b, starts.clamp(min=0)] @ of(self.first).T > self.first_gamma) & (starts >= 0)[:, None] \
            if bool((starts >= 0).any()) else cos.new_zeros(len(b), len(sub), dtype=torch.bool)
        # [b, |sub|]: the row's text opens, in this call, with the form's first token (none once
        # every row began in an earlier call, as in generation with a KV cache)
        hot = (cos > floor).flatten(0, 1).any(0) | (single_sub & opening.any(0))
        local = hot.nonzero().squeeze(1)
        score = cos.clone()
        if len(local):
            forms = sub[local]
            windows = self.windows[forms]
            n = windows - 1
            rows_of = torch.repeat_interleave(self.starts[forms], n) \
                + torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
            low = token_cosines(rows, self.keys[rows_of], token_groups(windows), windows, self.first[forms],
                                self.first_gamma, starts)
            single, mine = windows == 1, cos[..., local]
            form = torch.where(single, mine + self.single_shift, torch.minimum(mine, low + self.shift))
            # a one-token form opening the row: its key there is the sink's, so the token itself decides
            s = starts.clamp(min=0)
            form[b, s] = torch.where(single & (starts >= 0)[:, None], torch.where(opening[:, local], 1.0, -2.0),
                                     form[b, s])
            score[..., local] = form
        best = cos.new_full((*cos.shape[:-1], m), -2.0)
        best = best.scatter_reduce(-1, of(self.facts).expand_as(score), score, "amax")
        return best.reshape(*x.shape[:-1], m)


def subject_cosines(x: torch.Tensor, keys: torch.Tensor, groups: list[tuple[int, torch.Tensor]] | None = None,
                    pooled: torch.Tensor | None = None, shift: float = 0.0,
                    tokens: StoredTokens | None = None, floor: float = -math.inf,
                    starts: torch.Tensor | None = None) -> torch.Tensor:
    """Subject-key scores ``[..., m]`` of token keys ``x`` ``[..., d_ff]`` against stored unit keys
    ``[m, d_ff]``: the cosine (``groups`` None); with ``groups`` and no ``pooled``, the pooled
    cosine of :func:`window_cosines` (``keys`` are then pooled keys); with both (``key="dual"``),
    ``min(cos(x_t, keys), pooled cosine against pooled ``[m, d_ff]`` + shift)``, so that a score
    above γ means the token's key is above γ and its pool above γ − shift (``pool_gamma``); with
    ``tokens`` (``key="tokens"``), :meth:`StoredTokens.scores`: the token's key above γ and, in one
    of the fact's forms, each earlier subject token's, aligned, above ``token_gamma``, the token's
    key against the form's own last-token key (``keys`` unused; forms scored in full only where they
    can fire above ``floor``; ``starts``: where each row's text begins, :func:`token_cosines`)."""
    if tokens is not None:
        return tokens.scores(x, keys.shape[0], floor, starts)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    if groups is None:
        return unit @ keys.T
    rows = x.reshape(-1, *x.shape[-2:])  # the window runs along the sequence dimension
    starts = starts if starts is not None and x.dim() == 3 else None
    if pooled is None:
        return window_cosines(rows, keys, groups, starts).reshape(*x.shape[:-1], -1)
    pool = window_cosines(rows, pooled, groups, starts).reshape(*x.shape[:-1], -1)
    return torch.minimum(unit @ keys.T, pool + shift)


@dataclass
class StoredSubjects:
    """The stored subject side of a gate: unit keys ``[m, d_ff]``, thresholds ``[m]``, and for
    pooled keys each fact's window ``[m]`` (None: one token's key); with ``key="dual"`` also the
    pooled unit keys ``[m, d_ff]`` (then ``keys`` are last-token keys) and the pool's shift
    γ − ``pool_gamma``; with ``key="tokens"`` the forms of the earlier subject tokens
    (:class:`StoredTokens`; ``windows`` and ``pooled`` None). See :func:`subject_cosines`."""

    keys: torch.Tensor
    thresholds: torch.Tensor | float
    windows: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    shift: float = 0.0
    tokens: StoredTokens | None = None
    search: Search = Search()  # how token keys find candidate forms (:mod:`neuraldb.index`)


class _SubjectScores(nn.Module):
    """Holds :class:`StoredSubjects` on the wrapped layer's device and scores token keys against them."""

    base_layer: nn.Module

    def set_subjects(self, s: StoredSubjects) -> None:
        w = next(self.base_layer.parameters())
        self.keys = s.keys.to(w.device, torch.float32)
        self.thresholds = torch.as_tensor(s.thresholds, dtype=torch.float32).expand(s.keys.shape[0]).to(w.device)
        self.windows = None if s.windows is None else s.windows.to(w.device, torch.long)
        self.tokens = None if s.tokens is None else s.tokens.to(w.device)
        if self.tokens is not None and self.tokens.index is None:  # built once per store change
            self.tokens.use(s.search.build(self.tokens.last))
        self.groups = None if self.windows is None else window_groups(self.windows)
        self.pooled = None if s.pooled is None else s.pooled.to(w.device, torch.float32)
        self.shift = float(s.shift)
        self.floor = float(self.thresholds.min()) if len(self.thresholds) else 0.0  # once per store change

    def scores(self, x: torch.Tensor, rows: RowStarts | None = None) -> torch.Tensor:
        """``[..., m]``: :func:`subject_cosines` of ``x`` ``[..., d_ff]``; ``rows``: where each row
        begins, read only by the keys that look before the token (pooled, dual and token keys)."""
        starts = rows.starts(x) if rows is not None and (self.tokens is not None or self.groups is not None) else None
        return subject_cosines(x, self.keys, self.groups, self.pooled, self.shift, self.tokens, self.floor, starts)


class GatedProjection(_SubjectScores):
    """Wraps ``base_layer`` (Linear or Conv1D); ``subjects``: the stored keys and thresholds
    (:class:`StoredSubjects`), residuals ``[m, d_model]``."""

    def __init__(self, base_layer: nn.Module, subjects: StoredSubjects, residuals: torch.Tensor,
                 rows: RowStarts | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.enabled = True
        self.trace: list[Firing] | None = None
        self.rows = rows or RowStarts()
        self.set_memory(subjects, residuals)

    def set_memory(self, subjects: StoredSubjects, residuals: torch.Tensor) -> None:
        self.set_subjects(subjects)
        self.residuals = residuals.to(self.keys.device, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled or self.keys.shape[0] == 0:
            return out
        best, index = self.scores(x, self.rows).max(dim=-1)
        fired = best > self.thresholds[index]
        return _add_fired(out, best, index, fired, self.residuals, self.trace)


class RowStarts:
    """Where each row's text begins, from the attention mask the model was called with (recorded by
    a forward pre-hook on the decoder stack, :func:`install`): left padding moves a prompt's first
    token away from column 0, and a KV-cached call begins after its text."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.handle: Any = None

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def starts(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[b]`` for token keys ``x`` ``[b, t, d_ff]``: the column of each row's first real token in
        this call, −1 where it came in an earlier call; None without a 2-D mask of this batch (then
        every row begins at the call's column 0)."""
        mask = self.mask
        if x.dim() != 3 or mask is None or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        first = (mask != 0).int().argmax(dim=1) - (mask.shape[1] - x.shape[1])  # the mask spans cached columns too
        return torch.where(first < 0, -1, first).to(x.device)


class RelationState:
    """What the subject watch tells the relation gate within one forward: ``seen`` ``[batch, seq, m]``
    (bool) or None; ``enabled`` is shared by both modules."""

    def __init__(self) -> None:
        self.enabled = True
        self.seen: torch.Tensor | None = None


class SubjectWatch(_SubjectScores):
    """Wraps the subject layer's FFN output projection; returns its output untouched and records in
    ``state.seen`` which facts' subjects (:class:`StoredSubjects`) were seen at or before each token."""

    def __init__(self, base_layer: nn.Module, subjects: StoredSubjects, state: RelationState,
                 rows: RowStarts | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.rows = rows or RowStarts()
        self.set_subjects(subjects)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        self.state.seen = None
        if not self.state.enabled or self.keys.shape[0] == 0 or x.dim() != 3:
            return out
        hit = self.scores(x, self.rows) > self.thresholds  # [b, t, m]
        self.state.seen = hit.to(torch.uint8).cummax(dim=1).values.bool()
        return out


class RelationGatedProjection(nn.Module):
    """Wraps the relation layer's FFN output projection: adds fact j's residual where j's subject was
    seen and the token's relation key matches j's above ``rho``. ``relation_keys`` ``[m, r]`` unit-norm,
    ``residuals`` ``[m, d_model]``; ``relation_map`` maps keys ``[..., d_ff]`` to ``[..., r]``."""

    def __init__(self, base_layer: nn.Module, relation_map: Any, relation_keys: torch.Tensor,
                 residuals: torch.Tensor, rho: float, state: RelationState):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.trace: list[Firing] | None = None
        self.set_memory(relation_map, relation_keys, residuals, rho)

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.state.enabled = value

    def set_memory(self, relation_map: Any, relation_keys: torch.Tensor, residuals: torch.Tensor,
                   rho: float) -> None:
        w = next(self.base_layer.parameters())
        self.relation_map = relation_map.to(w.device)
        self.keys = relation_keys.to(w.device, torch.float32)
        self.residuals = residuals.to(w.device, torch.float32)
        self.rho = float(rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        seen, self.state.seen = self.state.seen, None
        if not self.enabled or self.keys.shape[0] == 0 or seen is None or seen.shape[:2] != x.shape[:2]:
            return out
        cos = self.relation_map.project(x) @ self.keys.T  # [b, t, m]
        best, index = cos.masked_fill(~seen, -2.0).max(dim=-1)
        return _add_fired(out, best, index, best > self.rho, self.residuals, self.trace)


def _add_fired(out: torch.Tensor, best: torch.Tensor, index: torch.Tensor, fired: torch.Tensor,
               residuals: torch.Tensor, trace: list[Firing] | None) -> torch.Tensor:
    """``out`` ``[..., d_model]`` plus ``residuals[index]`` where ``fired`` (``[...]``), untouched
    elsewhere (bit for bit); the firing is appended to ``trace`` when tracing."""
    if trace is not None:
        trace.append(Firing(index.cpu(), best.cpu(), fired.cpu()))
    if not bool(fired.any()):
        return out
    added = (out.float() + residuals[index]).to(out.dtype)
    return torch.where(fired.unsqueeze(-1), added, out)


def install_relation(model: nn.Module, subject_path: str, relation_path: str, subjects: StoredSubjects,
                     relation_map: Any, relation_keys: torch.Tensor, residuals: torch.Tensor,
                     rho: float) -> RelationGatedProjection:
    """Wrap the subject layer's projection in a :class:`SubjectWatch` and the relation layer's in a
    :class:`RelationGatedProjection` (or update the wrappers already there); returns the gate."""
    found = find(model)
    if found is not None and not isinstance(found[1], RelationGatedProjection):
        unload(model)
    watch, current = get_module(model, subject_path), get_module(model, relation_path)
    if isinstance(watch, SubjectWatch) and isinstance(current, RelationGatedProjection):
        watch.set_subjects(subjects)
        current.set_memory(relation_map, relation_keys, residuals, rho)
        return current
    state = RelationState()
    _replace(model, subject_path, SubjectWatch(watch, subjects, state, _row_starts(model)))
    g = RelationGatedProjection(current, relation_map, relation_keys, residuals, rho, state)
    _replace(model, relation_path, g)
    return g


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


def install(model: nn.Module, path: str, subjects: StoredSubjects, residuals: torch.Tensor) -> GatedProjection:
    """Wrap the module at ``path`` (or update the wrapper already there) and return the gate;
    ``subjects.thresholds``: θ per fact ``[m]``, or γ for every fact."""
    found = find(model)
    if found is not None and not isinstance(found[1], GatedProjection):
        unload(model)
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    current = getattr(parent, name)
    if isinstance(current, GatedProjection):
        current.set_memory(subjects, residuals)
        return current
    gate = GatedProjection(current, subjects, residuals, _row_starts(model))
    setattr(parent, name, gate)
    return gate


def _row_starts(model: nn.Module) -> RowStarts:
    """A :class:`RowStarts` recording the attention mask of each call of the decoder stack (its
    hook is removed by :func:`unload`)."""
    rows = RowStarts()
    stack = getattr(model, "base_model", model)
    rows.handle = stack.register_forward_pre_hook(rows.record, with_kwargs=True)
    return rows


Gate = GatedProjection | RelationGatedProjection


def find(model: nn.Module) -> tuple[str, Gate] | None:
    for name, module in model.named_modules():
        if isinstance(module, (GatedProjection, RelationGatedProjection)):
            return name, module
    return None


def unload(model: nn.Module) -> None:
    """Put the original projections back (the model is then exactly the base model)."""
    wrapped = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (GatedProjection, RelationGatedProjection, SubjectWatch))]
    for path, module in wrapped:
        if isinstance(module, (GatedProjection, SubjectWatch)) and module.rows.handle is not None:
            module.rows.handle.remove()
        _replace(model, path, module.base_layer)
