"""The fact store: unit-normalised keys, residuals and fact records, saved atomically.

On disk a store is a folder with ``tensors.safetensors`` (``keys`` ``[m, d_ff]`` float32,
unit-norm rows; ``residuals`` ``[m, d_model]`` float32; ``radii`` ``[m]`` float32, each fact's
look-alike radius, −1 for none, see :mod:`neuraldb.radius`; written only when some fact has one,
a store without radii keeps format 1 and no radii tensor; with the relation gate, format 3 adds
``relation_keys`` ``[m, r]`` unit-norm and the :class:`neuraldb.relation.RelationMap` tensors, and the
residuals then sit at the relation layer; with pooled subject keys (``key="pooled"``), format 4 adds
``windows`` ``[m]`` int64, the number of tokens each key pools, see
:func:`neuraldb.gate.window_cosines`; with both keys (``key="dual"``), format 5 holds ``keys`` of the
subject's last token, ``pooled_keys`` ``[m, d_ff]`` unit-norm and ``windows``, and the relation
gate's tensors when it has a relation map; with token keys (``key="tokens"``), format 6 holds ``keys``
of the subject's last token and the earlier subject tokens' keys in forms (one per tokenisation of
the subject): ``token_windows`` ``[C]`` and ``token_facts`` ``[C]`` int64, ``token_keys``
``[Σ(w−1), d_ff]``, ``token_first`` and ``token_last`` ``[C, d_ff]``, see
:class:`neuraldb.keys.TokenKeys`) and
``store.json`` (format version, edit layer, γ, hyperparameters, context templates, model name and
fingerprint, the fact records in column order, and the sha256 of the tensor file). Same contents → same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuraldb import schema
from neuraldb.facts import EditRequest
from neuraldb.files import ArtifactError, read_artifact, write_artifact
from neuraldb.keys import TokenKeys
from neuraldb.relation import RelationMap

FORMAT = "neuraldb-store/2"
FORMAT_NO_RADII = "neuraldb-store/1"  # no radii tensor: every fact fires above γ
FORMAT_RELATION = "neuraldb-store/3"  # relation keys and the relation map (gate="relation")
FORMAT_POOLED = "neuraldb-store/4"  # pooled subject keys: each fact's window (key="pooled")
FORMAT_DUAL = "neuraldb-store/5"  # last-token and pooled keys, any gate (key="dual")
FORMAT_TOKENS = "neuraldb-store/6"  # last-token keys and the earlier subject tokens' keys (key="tokens")
READS = (FORMAT_TOKENS, FORMAT_DUAL, FORMAT_POOLED, FORMAT_RELATION, FORMAT, FORMAT_NO_RADII)
NO_RADIUS = -1.0


class StoreError(ArtifactError):
    """A store is missing, corrupt, or does not belong to the model at hand."""


@dataclass
class FactStore:
    """Column-aligned keys and residuals with their facts.

    Attributes:
        keys: ``[m, d_ff]`` unit-norm keys; residuals: ``[m, d_model]``; radii: ``[m]``; facts: m
        records. A fact fires where it is the best match and its cosine exceeds
        :meth:`thresholds` (γ, or the fact's radius when that is higher). ``windows``: ``[m]``
        int64 in a store of pooled or dual keys (each pool's token count), None in the others;
        ``pooled_keys``: ``[m, d_ff]`` unit-norm in a store of dual keys, None in the others;
        ``tokens``: the earlier subject tokens' keys (:class:`neuraldb.keys.TokenKeys`) in a store
        of token keys, None in the others.
    """

    model_name: str
    fingerprint: str
    model_type: str
    layer: int
    gamma: float
    d_ff: int
    d_model: int
    hparams: dict[str, Any] = field(default_factory=dict)
    templates: list[str] = field(default_factory=list)
    facts: list[EditRequest] = field(default_factory=list)
    keys: torch.Tensor = None  # type: ignore[assignment]
    residuals: torch.Tensor = None  # type: ignore[assignment]
    radii: torch.Tensor = None  # type: ignore[assignment]
    relation: RelationMap | None = None
    relation_keys: torch.Tensor = None  # type: ignore[assignment]
    windows: torch.Tensor | None = None
    pooled_keys: torch.Tensor | None = None
    tokens: TokenKeys | None = None

    def __post_init__(self) -> None:
        if self.relation_keys is None:
            self.relation_keys = torch.zeros(len(self.keys) if self.keys is not None else 0,
                                             0 if self.relation is None else self.relation.rank)
        if self.keys is None:
            self.keys = torch.zeros(0, self.d_ff)
        if self.residuals is None:
            self.residuals = torch.zeros(0, self.d_model)
        if self.radii is None:
            self.radii = torch.full((len(self.keys),), NO_RADIUS)

    def thresholds(self) -> torch.Tensor:
        """θ ``[m]``: max(γ, radius) per fact."""
        return torch.clamp(self.radii, min=self.gamma)

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.facts]

    def index(self, fact_id: str) -> int:
        try:
            return self.ids.index(fact_id)
        except ValueError:
            raise KeyError(f"no fact with id {fact_id!r} in the store") from None

    def add(self, facts: list[EditRequest], keys: torch.Tensor, residuals: torch.Tensor, replace: bool = False,
            radii: torch.Tensor | None = None, relation_keys: torch.Tensor | None = None,
            windows: torch.Tensor | None = None, pooled_keys: torch.Tensor | None = None,
            tokens: TokenKeys | None = None) -> None:
        """Append facts (keys are normalised here; ``radii`` ``[F]``, None: no radius;
        ``relation_keys`` ``[F, r]``, required when the store has a relation map; ``windows`` ``[F]``,
        required in a store of pooled or dual keys and refused in the others; ``pooled_keys``
        ``[F, d_ff]``, required in a store of dual keys and refused in the others; ``tokens``, with
        facts numbered 0 … F−1, likewise for a store of token keys); an existing id is
        replaced only with ``replace``."""
        if (windows is None) != (self.windows is None):
            raise StoreError("a store of pooled keys needs every fact's window, and only such a store takes them")
        if windows is not None and (windows.shape != (len(facts),) or bool((windows < 1).any())):
            raise StoreError(f"shape mismatch: {len(facts)} facts, windows {tuple(windows.shape)} (each at least 1)")
        if (pooled_keys is None) != (self.pooled_keys is None):
            raise StoreError("a store of dual keys needs every fact's pooled key, and only such a store takes them")
        if pooled_keys is not None and pooled_keys.shape != (len(facts), self.d_ff):
            raise StoreError(f"shape mismatch: {len(facts)} facts, pooled keys {tuple(pooled_keys.shape)}, "
                             f"store d_ff={self.d_ff}")
        if (tokens is None) != (self.tokens is None):
            raise StoreError("a store of token keys needs every fact's token keys, and only such a store takes them")
        if tokens is not None and (problem := tokens.check(len(facts), self.d_ff)):
            raise StoreError(f"token keys of {len(facts)} facts: {problem}")
        if radii is None:
            radii = torch.full((len(facts),), NO_RADIUS)
        rank = 0 if self.relation is None else self.relation.rank
        if relation_keys is None and rank == 0:
            relation_keys = torch.zeros(len(facts), 0)
        if relation_keys is None or relation_keys.shape != (len(facts), rank):
            got = None if relation_keys is None else tuple(relation_keys.shape)
            raise StoreError(f"shape mismatch: {len(facts)} facts, relation keys {got}, store rank {rank}")
        if keys.shape != (len(facts), self.d_ff) or residuals.shape != (len(facts), self.d_model):
            raise StoreError(f"shape mismatch: {len(facts)} facts, keys {tuple(keys.shape)}, "
                             f"residuals {tuple(residuals.shape)}, store d_ff={self.d_ff} d_model={self.d_model}")
        if radii.shape != (len(facts),):
            raise StoreError(f"shape mismatch: {len(facts)} facts, radii {tuple(radii.shape)}")
        keys = torch.nn.functional.normalize(keys.float(), dim=1)
        existing = set(self.ids)
        clashes = [f.id for f in facts if f.id in existing]
        if clashes and not replace:
            raise StoreError(f"fact id {clashes[0]!r} is already in the store (use replace)")
        self.remove(clashes)
        self.facts = self.facts + list(facts)
        self.keys = torch.cat([self.keys, keys])
        self.residuals = torch.cat([self.residuals, residuals.float()])
        self.radii = torch.cat([self.radii, radii.float()])
        self.relation_keys = torch.cat([self.relation_keys,
                                        torch.nn.functional.normalize(relation_keys.float(), dim=1)])
        if self.windows is not None:  # then ``windows`` is given (checked above)
            self.windows = torch.cat([self.windows, windows.long()])  # type: ignore[list-item]
        if self.pooled_keys is not None:  # then ``pooled_keys`` is given (checked above)
            self.pooled_keys = torch.cat([self.pooled_keys,
                                          torch.nn.functional.normalize(pooled_keys.float(), dim=1)])  # type: ignore[union-attr]
        if self.tokens is not None:  # then ``tokens`` is given (checked above)
            self.tokens = self.tokens.cat(tokens, len(self.facts) - len(facts))  # type: ignore[arg-type]

    def remove(self, fact_ids: list[str]) -> None:
        drop = {self.index(i) for i in fact_ids}
        keep = [i for i in range(len(self)) if i not in drop]
        if self.tokens is not None:
            self.tokens = self.tokens.select(keep)
        self.facts = [self.facts[i] for i in keep]
        self.keys = self.keys[keep]
        self.residuals = self.residuals[keep]
        self.radii = self.radii[keep]
        self.relation_keys = self.relation_keys[keep]
        if self.windows is not None:
            self.windows = self.windows[keep]
        if self.pooled_keys is not None:
            self.pooled_keys = self.pooled_keys[keep]

    def check_model(self, fingerprint: str, d_ff: int, d_model: int) -> None:
        if (d_ff, d_model) != (self.d_ff, self.d_model):
            raise StoreError(f"store shapes d_ff={self.d_ff}, d_model={self.d_model} do not match the model "
                             f"(d_ff={d_ff}, d_model={d_model})")
        if fingerprint != self.fingerprint:
            raise StoreError(f"store was built for model {self.model_name!r} (fingerprint {self.fingerprint}), "
                             f"not for this model (fingerprint {fingerprint})")

    # -- persistence ------------------------------------------------------------------------

    def has_radii(self) -> bool:
        """Whether any fact has a radius; a store without is written in format 1, as before radii."""
        return bool((self.radii != NO_RADIUS).any())

    def format(self) -> str:
        if self.tokens is not None:
            return FORMAT_TOKENS
        if self.pooled_keys is not None:
            return FORMAT_DUAL
        if self.relation is not None:
            return FORMAT_RELATION
        if self.windows is not None:
            return FORMAT_POOLED
        return FORMAT if self.has_radii() else FORMAT_NO_RADII

    def meta(self) -> dict[str, Any]:
        extra = {} if self.relation is None else {"relation_layer": self.relation.layer}
        return extra | {
            "format": self.format(),
            "model": {"name": self.model_name, "fingerprint": self.fingerprint,
                      "model_type": self.model_type, "d_ff": self.d_ff, "d_model": self.d_model},
            "layer": self.layer, "gamma": self.gamma, "hparams": self.hparams, "templates": self.templates,
            "facts": [f.to_dict() for f in self.facts],
        }

    def save(self, path: str | Path) -> None:
        """Write the store folder atomically: a complete new folder replaces the old one."""
        try:
            tensors = {"keys": self.keys, "residuals": self.residuals}
            if self.has_radii() or self.relation is not None or self.windows is not None or self.tokens is not None:
                tensors["radii"] = self.radii
            if self.windows is not None:
                tensors["windows"] = self.windows
            if self.pooled_keys is not None:
                tensors["pooled_keys"] = self.pooled_keys
            if self.tokens is not None:
                tensors |= {"token_keys": self.tokens.keys, "token_windows": self.tokens.windows,
                            "token_facts": self.tokens.facts, "token_first": self.tokens.first,
                            "token_last": self.tokens.last}
            if self.relation is not None:
                tensors |= {"relation_keys": self.relation_keys} | self.relation.tensors()
            write_artifact(path, "store.json", self.meta(), tensors)
        except ArtifactError as e:
            raise StoreError(str(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> FactStore:
        try:
            meta, t = read_artifact(path, "store.json", READS)
            facts = schema.store(meta, str(path))
        except ArtifactError as e:
            raise StoreError(str(e)) from None
        _check_main_tensors(path, t)
        if meta["format"] in (FORMAT, FORMAT_RELATION, FORMAT_POOLED, FORMAT_DUAL, FORMAT_TOKENS) and "radii" not in t:
            raise StoreError(f"{path} is corrupt: a {meta['format']} store without its radii tensor")
        windows = _windows(path, meta, t)
        pooled = _unit_tensor(path, meta, t, FORMAT_DUAL, "pooled_keys")
        tokens = _tokens(path, meta, t)
        relation = _relation(path, meta, t)
        radii = t.get("radii")
        if radii is not None and not bool(torch.isfinite(radii.float()).all()):
            raise StoreError(f"{path} is corrupt: radii that are not finite numbers")
        m = meta["model"]
        store = cls(m["name"], m["fingerprint"], m["model_type"], meta["layer"], meta["gamma"], m["d_ff"],
                    m["d_model"], meta["hparams"], meta["templates"],
                    facts, t["keys"], t["residuals"],
                    None if radii is None else radii.float(), relation,
                    None if relation is None else t["relation_keys"].float(), windows, pooled, tokens)
        if (store.keys.shape != (len(store), store.d_ff) or store.residuals.shape != (len(store), store.d_model)
                or store.radii.shape != (len(store),)
                or store.relation_keys.shape != (len(store), 0 if relation is None else relation.rank)
                or (windows is not None and windows.shape != (len(store),))
                or (pooled is not None and pooled.shape != store.keys.shape)
                or (tokens is not None and tokens.check(len(store), store.d_ff) is not None)):
            raise StoreError(f"{path} is corrupt: tensor shapes do not match its {len(store)} facts")
        return store


def _check_main_tensors(path: str | Path, t: dict[str, torch.Tensor]) -> None:
    """``keys`` (unit-norm rows) and ``residuals``: present, float, 2-D, finite."""
    for name in ("keys", "residuals"):
        x = t.get(name)
        if x is None:
            raise StoreError(f"{path} is corrupt: no {name} tensor")
        if not x.is_floating_point() or x.dim() != 2 or not bool(torch.isfinite(x).all()):
            raise StoreError(f"{path} is corrupt: {name} must be a 2-D tensor of finite numbers")
    norms = t["keys"].float().norm(dim=1)
    if len(norms) and float((norms - 1).abs().max()) > 1e-3:
        raise StoreError(f"{path} is corrupt: keys are not unit vectors")


def _windows(path: str | Path, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The windows of a format-4 or -5 store (None for the others), checked."""
    if meta["format"] not in (FORMAT_POOLED, FORMAT_DUAL):
        return None
    if "windows" not in t:
        raise StoreError(f"{path} is corrupt: a {meta['format']} store without its windows tensor")
    w = t["windows"]
    if w.dtype != torch.int64 or w.dim() != 1 or bool((w < 1).any()):
        raise StoreError(f"{path} is corrupt: windows must be token counts of at least 1")
    return w


def _unit_tensor(path: str | Path, meta: dict[str, Any], t: dict[str, torch.Tensor], fmt: str,
                 name: str) -> torch.Tensor | None:
    """Tensor ``name`` of a store of format ``fmt`` (the pooled keys of format 5, the token keys of
    format 6; None in the others), checked finite."""
    if meta["format"] != fmt:
        return None
    if name not in t:
        raise StoreError(f"{path} is corrupt: a {fmt} store without its {name} tensor")
    if t[name].dim() != 2 or not bool(torch.isfinite(t[name].float()).all()):
        raise StoreError(f"{path} is corrupt: {name.replace('_', ' ')} that are not finite numbers")
    return t[name].float()


def _tokens(path: str | Path, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> TokenKeys | None:
    """The token keys of a format-6 store (None for the others); checked against the facts by
    :meth:`FactStore.load`."""
    if meta["format"] != FORMAT_TOKENS:
        return None
    names = ("token_keys", "token_windows", "token_facts", "token_first", "token_last")
    if missing := [n for n in names if n not in t]:
        raise StoreError(f"{path} is corrupt: a {FORMAT_TOKENS} store without its {missing[0]} tensor")
    if not all(bool(torch.isfinite(t[n].float()).all()) for n in ("token_keys", "token_first", "token_last")):
        raise StoreError(f"{path} is corrupt: token keys that are not finite numbers")
    return TokenKeys(t["token_keys"].float(), t["token_windows"], t["token_facts"], t["token_first"].float(),
                     t["token_last"].float())


def _relation(path: str | Path, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> RelationMap | None:
    """The relation map of a format-3 store, or of a format-5 or -6 store with a relation layer (None
    for the others), checked."""
    if meta["format"] != FORMAT_RELATION and not (meta["format"] in (FORMAT_DUAL, FORMAT_TOKENS)
                                                  and "relation_layer" in meta):
        return None
    need = ("relation_keys", "relation_mean", "relation_scale", "relation_weight")
    if missing := [n for n in need if n not in t]:
        raise StoreError(f"{path} is corrupt: a {meta['format']} store without its {missing[0]} tensor")
    if not isinstance(meta.get("relation_layer"), int):
        raise StoreError(f"{path} is corrupt: a {FORMAT_RELATION} store without its relation layer")
    relation = RelationMap.from_tensors(meta["relation_layer"], t)
    try:
        relation.check(meta["model"]["d_ff"])
    except ValueError as e:
        raise StoreError(f"{path} is corrupt: {e}") from None
    if not bool(torch.isfinite(t["relation_keys"].float()).all()):
        raise StoreError(f"{path} is corrupt: relation keys that are not finite numbers")
    return relation
