"""NeuralDB (arXiv 2507.18028): facts as (key, residual) pairs behind a cosine gate at one FFN layer.

Editing a fact = computing its key (the FFN output projection's input at the subject's last token,
averaged over context templates) and its residual (the δ added to that projection's output that
makes the model say the new target, see :mod:`neuraldb.targets`), and appending both to the
store. Base weights never change: removing a fact or unloading the gate restores the base model.
Residuals are always optimised against the base model (the gate is off while editing), so the
result of a fact does not depend on which facts were written before it.

With ``gate="relation"`` a fact also gets a relation key (the key at the edit prompt's last token at
``relation_layer``, under the store's :class:`neuraldb.relation.RelationMap`), and its residual is
optimised at that layer at the prompt's last token (:mod:`neuraldb.gate`, the relation gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from neuraldb import gate, radius, relation
from neuraldb.editor import Editor, Progress, register
from neuraldb.facts import EditRequest
from neuraldb.files import ArtifactError, read_meta
from neuraldb.index import Search
from neuraldb.keys import TokenKeys, pooled_keys, subject_keys, token_keys
from neuraldb.models import LoadedModel
from neuraldb.store import NO_RADIUS, FactStore, StoreError
from neuraldb.store import READS as STORE_FORMATS
from neuraldb.targets import TargetConfig, TargetHparams, Targets, optimize
from neuraldb.templates import context_templates

GATES = ("cosine", "radius", "relation")
KEYS = ("last", "pooled", "dual", "tokens")


@dataclass(frozen=True)
class NeuralDBHparams(TargetHparams):
    """Hyperparameters of NeuralDB editing.

    ``layer``/``gamma``: the edit layer and the cosine threshold of the gate; ``gate``:
    ``"cosine"`` (every fact fires above γ, the paper's gate) or ``"radius"`` (a fact's threshold
    is raised above the look-alikes of its subject, ``radius_margin`` over the closest, at most
    ``radius_cap``: :mod:`neuraldb.radius`) or ``"relation"`` (a fact fires where its subject
    was seen, subject key above γ at ``layer``, and the prompt's key at ``relation_layer``, mapped by
    a rank-``relation_rank`` :class:`neuraldb.relation.RelationMap` (fitted with
    ``relation_inner`` tokens inside each training prompt as hard negatives, 0: none), matches the
    fact's above ``relation_gamma``; the residual then sits at ``relation_layer`` at the prompt's last token:
    :func:`neuraldb.gate.install_relation`); ``key``: ``"last"`` (the subject key is one token's,
    the subject's last) or ``"pooled"`` (with the cosine gate: the key pools the unit keys of all the
    subject's tokens, at most ``pool_max`` (0: all), so names sharing only a last word differ:
    :func:`neuraldb.keys.pooled_keys`,
    :func:`neuraldb.gate.window_cosines`) or ``"dual"`` (with the cosine or relation gate: both must
    match, the last token's key above γ and the pool of the subject's tokens above ``pool_gamma``:
    :func:`neuraldb.gate.subject_cosines`; a one-token subject, which has no pool to check, fires
    above ``single_gamma`` instead of γ) or ``"tokens"`` (with the cosine or relation gate: the last token's key
    above γ and every earlier subject token's key, aligned from the end, above ``token_gamma``, in
    one of the subject's tokenisations; a first token opening a forward call, where keys are alike,
    must be the subject's own, cosine above ``first_gamma`` with its key there:
    :func:`neuraldb.keys.token_keys`, :func:`neuraldb.gate.token_cosines`; a one-token form fires
    above ``single_gamma``); ``batch_size``: the number of facts optimised together; the residual
    optimisation and context templates:
    :class:`neuraldb.targets.TargetHparams`.
    """

    layer: int
    gamma: float = 0.65
    gate: str = "cosine"
    key: str = "tokens"  # chosen on training records: benchmarks/results/sweep-gate-tokens-train.json (README)
    pool_max: int = 0
    pool_gamma: float = 0.45
    single_gamma: float = 0.75
    token_gamma: float = 0.3  # with key="tokens", the same sweep
    first_gamma: float = 0.999
    radius_margin: float = 0.02
    radius_cap: float = 0.9
    relation_layer: int = 22  # the model presets set it (3/4 of the depth otherwise)
    relation_gamma: float = 0.6  # chosen on training records: benchmarks/results/sweep-relation-*-train-*.json
    relation_rank: int = 64
    relation_inner: int = 1
    batch_size: int = 32
    search: str = "exact"  # token keys' candidate stage: "exact" (every form) or "ivf" (neuraldb/index.py)
    nprobe: int = 32  # with search="ivf": lists probed per token

    def validate(self, lm: LoadedModel) -> None:
        lm.arch.check_layer(self.layer)
        if not -1.0 < self.gamma < 1.0:  # a cosine threshold: -1 would fire on every token, 1 on none
            raise ValueError(f"gamma must be in (-1, 1), got {self.gamma}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(KEYS)}, got {self.key!r}")
        self.index_search().validate()
        if self.search == "ivf" and self.key != "tokens":
            raise ValueError(f"search=ivf works with key=tokens, not key={self.key}")
        if self.pool_max < 0:
            raise ValueError(f"pool_max must be 0 (the whole subject) or more, got {self.pool_max}")
        if self.key == "pooled" and self.gate != "cosine":
            raise ValueError(f"key=pooled works with gate=cosine, not gate={self.gate}")
        if self.key in ("dual", "tokens") and self.gate == "radius":
            raise ValueError(f"key={self.key} works with gate=cosine or gate=relation, not gate=radius")
        if not -1.0 <= self.pool_gamma < 1.0:
            raise ValueError(f"pool_gamma must be in [-1, 1), got {self.pool_gamma}")
        if not -1.0 <= self.single_gamma < 1.0:
            raise ValueError(f"single_gamma must be in [-1, 1), got {self.single_gamma}")
        if not -1.0 <= self.token_gamma < 1.0:
            raise ValueError(f"token_gamma must be in [-1, 1), got {self.token_gamma}")
        if not -1.0 <= self.first_gamma < 1.0:
            raise ValueError(f"first_gamma must be in [-1, 1), got {self.first_gamma}")
        if self.gate == "radius" and not self.gamma <= self.radius_cap < 1.0:
            raise ValueError(f"radius_cap must be in [gamma, 1) = [{self.gamma}, 1), got {self.radius_cap}")
        if self.gate == "relation":
            lm.arch.check_layer(self.relation_layer)
            if self.relation_layer <= self.layer:
                raise ValueError(f"relation_layer must be above layer ({self.layer}), got {self.relation_layer}")
            if not -1.0 <= self.relation_gamma < 1.0:
                raise ValueError(f"relation_gamma must be in [-1, 1), got {self.relation_gamma}")
            if not 1 <= self.relation_rank <= lm.arch.d_ff:
                raise ValueError(f"relation_rank must be in [1, d_ff={lm.arch.d_ff}], got {self.relation_rank}")
            if self.relation_inner < 0:
                raise ValueError(f"relation_inner must be 0 or more, got {self.relation_inner}")
        if not math.isfinite(self.radius_margin):
            raise ValueError(f"radius_margin must be a finite number, got {self.radius_margin}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.target_config().validate()

    @classmethod
    def from_saved(cls, saved: dict) -> NeuralDBHparams:
        """The hparams a store or result recorded (fields this version does not know are ignored;
        a relation-gate record older than ``relation_inner`` had a map without inner negatives, a
        record older than ``key`` used the last token's key, one older than ``solver`` the batched
        solver)."""
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        known.setdefault("key", "last")  # recorded before keys had a choice: the last token's
        known.setdefault("solver", "batched")  # recorded before solvers had a choice
        if known.get("gate") == "relation":
            known.setdefault("relation_inner", 0)
        return cls(**known)

    def index_search(self) -> Search:
        """The gate's candidate stage under these hparams (:class:`neuraldb.index.Search`)."""
        return Search(self.search, self.nprobe)

    def with_gate(self, name: str) -> NeuralDBHparams:
        """A copy with gate ``name`` and that gate's defaults (:data:`GATE_DEFAULTS`) for the fields
        it changes; the other fields are kept."""
        return replace(self, gate=name, **GATE_DEFAULTS.get(name, {}))

    def parse(self, assignments: list[str]) -> NeuralDBHparams:  # type: ignore[override]
        """As :meth:`Hparams.parse`; a ``gate=`` assignment first switches to that gate's defaults
        (:meth:`with_gate`), which the other assignments then override."""
        gates = [a for a in assignments if a.partition("=")[0].strip().replace("-", "_") == "gate"]
        base = self
        if gates:
            chosen = super().parse(gates[-1:]).gate  # type: ignore[attr-defined]
            if chosen != self.gate:
                base = self.with_gate(chosen)
        return super(NeuralDBHparams, base).parse(assignments)  # type: ignore[return-value]

    def target_config(self) -> TargetConfig:  # type: ignore[override]
        if self.gate == "relation":
            return replace(super().target_config(self.relation_layer, "ffn"), position="last")
        return super().target_config(self.layer, "ffn")


# What a gate changes in the residual optimisation. The relation gate's residual sits at the prompt's
# last token eight layers from the output and must carry every target token alone: chosen by
# `python benchmarks/sweep_relation_targets.py` on KnowEdit-cf training records (README). Batches of
# 8 facts: 145 s instead of 228 s for 16 facts with the same mean NLL in a one-off run (long KnowEdit
# rows pad a batch to its longest); the benchmark's batch_size=8 config repeats it.
# It keeps the batched solver those settings were swept with (the fast solvers were chosen for the key gate).
GATE_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "radius": {"key": "last"},  # look-alike radii are of last-token keys
    "relation": {"steps": 50, "lr": 1.0, "clamp_norm_factor": 10.0, "batch_size": 8, "key": "last",
                 "solver": "batched"},
}

# Chosen by `python benchmarks/sweep_neuraldb.py` on CounterFact training records (README).
PRESETS: dict[str, dict[str, float | int]] = {
    "smollm2-135m": {"layer": 6, "gamma": 0.65, "relation_layer": 22},
    "gemma3-270m": {"layer": 2, "gamma": 0.9, "relation_layer": 13},
}


@dataclass
class GateKeys:
    """What decides where facts fire: unit subject keys ``[F, d_ff]``, their thresholds θ ``[F]``
    (γ, or the radius), with the relation gate unit relation keys ``[F, r]``, with pooled or dual
    keys each pool's window ``[F]`` (tokens pooled), with dual keys the pooled unit keys
    ``[F, d_ff]`` (``keys`` are then the last token's), with token keys the earlier subject tokens'
    (:class:`neuraldb.keys.TokenKeys`)."""

    keys: torch.Tensor
    theta: torch.Tensor
    relation: torch.Tensor | None
    windows: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    tokens: TokenKeys | None = None


@register("neuraldb")
class NeuralDBEditor(Editor):
    hparams_cls = NeuralDBHparams
    prepare_label = "relation map (training prompts)"

    def __init__(self, lm: LoadedModel, hparams: NeuralDBHparams | None = None, store: FactStore | None = None):
        super().__init__(lm, hparams)
        h = self.hparams
        self.store = store or FactStore(
            lm.name, lm.fingerprint, lm.arch.model_type, h.layer, h.gamma, lm.arch.d_ff, lm.arch.d_model,
            hparams=h.to_dict(), windows=torch.zeros(0, dtype=torch.long) if h.key in ("pooled", "dual") else None,
            pooled_keys=torch.zeros(0, lm.arch.d_ff) if h.key == "dual" else None,
            tokens=TokenKeys.empty(lm.arch.d_ff) if h.key == "tokens" else None)
        self.last_targets: Targets | None = None

    @classmethod
    def default_hparams(cls, lm: LoadedModel) -> NeuralDBHparams:
        n = lm.arch.n_layers
        layer = max(1, n // 4)
        fallback = {"layer": layer, "relation_layer": min(n - 1, max(layer + 1, (3 * n) // 4))}
        return NeuralDBHparams(**PRESETS.get(lm.name, fallback))

    @property
    def path(self) -> str:
        return self.lm.arch.w_out_path(self.hparams.layer)

    def templates(self) -> list[str]:
        if not self.store.templates:
            h = self.hparams
            with self.disabled():
                self.store.templates = context_templates(self.lm, h.n_templates, h.template_length, h.seed)
        return self.store.templates

    def edit(self, requests: list[EditRequest], progress: Progress | None = None, replace: bool = False) -> None:
        existing = set(self.store.ids)
        if not replace and (clash := next((r.id for r in requests if r.id in existing), None)):
            raise StoreError(f"fact id {clash!r} is already in the store (use replace)")
        templates = self.templates()
        h = self.hparams
        if h.gate == "relation" and self.store.relation is None:
            self.prepare()
        with self.disabled():
            targets = optimize(self.lm, requests, templates, h.target_config(), h.batch_size, progress)
            pooled, windows, tokens = self.window_keys(requests)
            if h.gate == "relation":
                keys = subject_keys(self.lm, requests, templates, [h.layer], skip_first=True).keys[h.layer]
                rel = self.store.relation.project(targets.keys)  # type: ignore[union-attr]
            else:
                keys, rel = targets.keys, None
            if h.key == "pooled":
                keys, pooled = pooled, None  # type: ignore[assignment]
        self.store.add(requests, keys, targets.delta, replace=replace, radii=self.radii(requests, keys, windows),
                       relation_keys=rel, windows=windows, pooled_keys=pooled, tokens=tokens)
        self.last_targets = targets
        self.install()

    def prepare(self, progress: Progress | None = None, start: Callable[[int], None] | None = None) -> None:
        """With ``gate="relation"``: load the relation map (fitted on training records once per model,
        layer and rank, then cached: :func:`neuraldb.relation.cached_map`) into the store."""
        h = self.hparams
        if h.gate != "relation" or self.store.relation is not None:
            return
        if len(self.store):
            raise StoreError("the store holds facts without relation keys: gate=relation needs a store of its own")
        with self.disabled():
            self.store.relation = relation.cached_map(self.lm, h.relation_layer, h.relation_rank, h.relation_inner,
                                                      progress, start)
        self.store.relation_keys = self.store.relation_keys.new_zeros(len(self.store), h.relation_rank)

    def gate_keys(self, requests: list[EditRequest]) -> GateKeys:
        """What :meth:`edit` would store for ``requests`` to decide where they fire (keys, thresholds,
        relation keys), computed on the base model without optimising a residual: for firing
        analyses (``neuraldb explain``, the gate sweeps)."""
        h, templates = self.hparams, self.templates()
        self.prepare()
        with self.disabled():
            pooled, windows, tokens = self.window_keys(requests)
        if h.key == "pooled":
            return GateKeys(pooled, torch.full((len(requests),), h.gamma), None, windows)  # type: ignore[arg-type]
        with self.disabled():
            keys = subject_keys(self.lm, requests, templates, [h.layer],
                                skip_first=h.target_config().skip_first_token_keys).keys[h.layer]
            rel = None
            if h.gate == "relation":
                last = subject_keys(self.lm, requests, templates, [h.relation_layer], skip_first=True,
                                    position="last").keys[h.relation_layer]
                rel = self.store.relation.project(last)  # type: ignore[union-attr]
        radii = self.radii(requests, keys, windows)
        theta = torch.full((len(requests),), h.gamma) if radii is None else torch.clamp(radii, min=h.gamma)
        return GateKeys(torch.nn.functional.normalize(keys.float(), dim=1), theta, rel, windows, pooled, tokens)

    def window_keys(self, requests: list[EditRequest]) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                 TokenKeys | None]:
        """``(pooled keys [F, d_ff], windows [F], token keys)`` of ``requests`` under this editor's
        ``key`` (None for what it does not use), on the model as it is."""
        h, templates = self.hparams, self.templates()
        if h.key == "tokens":
            return None, None, token_keys(self.lm, requests, templates, h.layer, most=h.pool_max)
        if h.key == "last":
            return None, None, None
        pooled, windows = pooled_keys(self.lm, requests, templates, h.layer, most=h.pool_max)
        return pooled, windows, None

    def subjects(self, keys: torch.Tensor, theta: torch.Tensor | float, windows: torch.Tensor | None,
                 pooled: torch.Tensor | None, tokens: TokenKeys | None = None) -> gate.StoredSubjects:
        """The gate's subject side for these keys under this editor's hparams."""
        h = self.hparams
        stored = None if tokens is None else gate.StoredTokens(
            tokens.keys, tokens.windows, tokens.facts, tokens.first, tokens.last, h.gamma - h.token_gamma,
            h.gamma - h.single_gamma, h.first_gamma)
        return gate.StoredSubjects(keys, theta, windows, pooled, h.gamma - h.pool_gamma if pooled is not None else 0.0,
                                   stored, h.index_search())

    def trace_gate(self, k: GateKeys) -> tuple[gate.Gate, int, torch.Tensor]:
        """Install a gate holding ``k`` with zero residuals (the model's output stays the base
        model's) that fires everywhere, so its trace (:attr:`gate.Firing`) records the best fact and
        its cosine per token. Returns (the gate, the layer a trace must run up to, the threshold θ
        ``[F]`` a traced cosine must exceed for the fact to fire under this editor's hparams)."""
        h, lm, m = self.hparams, self.lm, k.keys.shape[0]
        zeros = torch.zeros(m, lm.arch.d_model)
        if k.relation is None:
            return gate.install(lm.model, self.path, self.subjects(k.keys, -1.0, k.windows, k.pooled, k.tokens),
                                zeros), \
                h.layer, k.theta
        g = gate.install_relation(lm.model, self.path, lm.arch.w_out_path(h.relation_layer),
                                  self.subjects(k.keys, k.theta, k.windows, k.pooled, k.tokens), self.store.relation,
                                  k.relation, zeros, -2.0)
        return g, h.relation_layer, torch.full((m,), h.relation_gamma)

    def radii(self, requests: list[EditRequest], keys: torch.Tensor,
              windows: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[F]`` per-fact thresholds above γ: with ``gate="radius"`` the look-alike radii of facts
        with keys ``[F, d_ff]`` (computed on the base model); with ``key="dual"`` ``single_gamma``
        for a fact whose subject is one token (``windows`` ``[F]`` = 1: no pool to check), none
        (−1) for the others; else None."""
        h = self.hparams
        if h.key == "dual" and windows is not None:
            return torch.where(windows == 1, torch.tensor(h.single_gamma), torch.tensor(NO_RADIUS))
        if h.gate != "radius":
            return None
        with self.disabled():
            return radius.radii(self.lm, requests, keys, h.layer, -1.0, h.radius_margin, h.radius_cap)

    def remove(self, fact_ids: list[str]) -> None:
        self.store.remove(fact_ids)
        self.install()

    def install(self) -> gate.Gate:
        h, s = self.hparams, self.store
        subjects = self.subjects(s.keys, s.thresholds(), s.windows, s.pooled_keys, s.tokens)
        if h.gate == "relation" and s.relation is not None:
            return gate.install_relation(self.lm.model, self.path, self.lm.arch.w_out_path(h.relation_layer),
                                         subjects, s.relation, s.relation_keys, s.residuals, h.relation_gamma)
        return gate.install(self.lm.model, self.path, subjects, s.residuals)

    def restore(self) -> None:
        gate.unload(self.lm.model)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model inside the block (the gate, if installed, adds nothing)."""
        found = gate.find(self.lm.model)
        if found is None:
            yield
            return
        g = found[1]
        was, g.enabled = g.enabled, False
        try:
            yield
        finally:
            g.enabled = was

    @contextmanager
    def tracing(self) -> Iterator[list[gate.Firing]]:
        g = self.install()
        g.trace = []
        try:
            yield g.trace
        finally:
            g.trace = None

    def save(self, path: str | Path) -> None:
        self.templates()
        self.store.save(path)

    @classmethod
    def artifact_model(cls, path: str | Path) -> str | None:
        try:
            return read_meta(path, "store.json", STORE_FORMATS)["model"]["name"]
        except ArtifactError:
            return None

    @classmethod
    def load(cls, lm: LoadedModel, path: str | Path) -> NeuralDBEditor:
        store = FactStore.load(path)
        store.check_model(lm.fingerprint, lm.arch.d_ff, lm.arch.d_model)
        try:  # the editor checks the hparams' types, finiteness and fit to the model
            hparams = NeuralDBHparams.from_saved(store.hparams)
            editor = cls(lm, hparams, store)
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path} is corrupt: hparams: {e}") from None
        if (hparams.gate == "relation") != (store.relation is not None) or (
                store.relation is not None and store.relation.layer != hparams.relation_layer):
            raise StoreError(f"{path} is corrupt: its gate ({hparams.gate}, relation layer "
                             f"{hparams.relation_layer}) does not match its relation map")
        if (hparams.key in ("pooled", "dual")) != (store.windows is not None) or (
                (hparams.key == "dual") != (store.pooled_keys is not None)) or (
                (hparams.key == "tokens") != (store.tokens is not None)):
            raise StoreError(f"{path} is corrupt: its keys ({hparams.key}) do not match its windows, pooled and "
                             "token keys")
        editor.install()
        return editor
