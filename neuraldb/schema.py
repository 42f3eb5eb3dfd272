"""Artifact descriptions (``store.json``, ``edits.json``) checked field by field before anything
is built from them: types, ranges, and agreement between fields. Every failure is one
:class:`neuraldb.files.ArtifactError` line naming the folder and the field; nothing here trusts
that a description was written by us (its checksum can be recomputed by anyone)."""

from __future__ import annotations

import math
from typing import Any

from neuraldb.facts import EditRequest
from neuraldb.facts import json_kind as _kind
from neuraldb.files import ArtifactError


def _fail(where: str, name: str, message: str) -> ArtifactError:
    return ArtifactError(f"{where} is corrupt: {name}: {message}")


def obj(d: dict[str, Any], name: str, where: str, label: str = "") -> dict[str, Any]:
    value = d.get(name)
    if not isinstance(value, dict):
        raise _fail(where, label + name, f"expected an object, got {_kind(value)}")
    return value


def string(d: dict[str, Any], name: str, where: str, label: str = "", optional: bool = False) -> str | None:
    value = d.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(where, label + name, f"expected a non-empty string, got {_kind(value)}")
    return value


def integer(d: dict[str, Any], name: str, where: str, label: str = "", low: int = 0) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, label + name, f"expected an integer ≥ {low}, got {value!r}")
    return value


def number(d: dict[str, Any], name: str, where: str, low: float, high: float) -> float:
    """A finite number strictly between ``low`` and ``high``."""
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low < value < high:
        raise _fail(where, name, f"expected a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def strings(d: dict[str, Any], name: str, where: str, label: str = "") -> list[str]:
    value = d.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, label + name, "expected a list of strings")
    return value


def model(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``model`` block: name, fingerprint, model_type, d_ff, d_model."""
    m = obj(meta, "model", where)
    for name in ("name", "fingerprint", "model_type"):
        string(m, name, where, "model.")
    for name in ("d_ff", "d_model"):
        integer(m, name, where, "model.", low=1)
    return m


def fact(d: Any, where: str) -> EditRequest:
    """One stored fact record (:meth:`EditRequest.to_dict`'s shape), every field typed."""
    if not isinstance(d, dict):
        raise _fail(where, "facts", f"expected objects, got {_kind(d)}")
    fid = string(d, "id", where, "facts: ")
    label = f"fact {fid!r}: "
    template = string(d, "prompt", where, label)
    if template.count("{}") != 1:  # type: ignore[union-attr]
        raise _fail(where, label + "prompt", "must hold {} once")
    for name in ("subject", "target_new"):
        string(d, name, where, label)
    string(d, "target_true", where, label, optional=True)
    if "paraphrases" in d:
        strings(d, "paraphrases", where, label)
    locality = d.get("locality", [])
    if not isinstance(locality, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in locality):
        raise _fail(where, label + "locality", "expected [prompt, answer] pairs of strings")
    return EditRequest.from_dict(d)


def facts(meta: dict[str, Any], where: str) -> list[EditRequest]:
    """The ``facts`` list, each record checked, ids unique."""
    raw = meta.get("facts")
    if not isinstance(raw, list):
        raise _fail(where, "facts", f"expected a list, got {_kind(raw)}")
    out = [fact(d, where) for d in raw]
    ids = [f.id for f in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise _fail(where, "facts", f"id {dup!r} appears twice")
    return out


def templates(meta: dict[str, Any], where: str) -> list[str]:
    out = strings(meta, "templates", where)
    if bad := next((t for t in out if "{}" not in t), None):
        raise _fail(where, "templates", f"{bad!r} holds no {{}}")
    return out


def store(meta: dict[str, Any], where: str) -> list[EditRequest]:
    """A fact store's ``store.json``: model, layer, γ in (−1, 1), hyperparameters agreeing with
    them, context templates, facts (returned), and the relation layer when there is one."""
    model(meta, where)
    layer = integer(meta, "layer", where)
    gamma = number(meta, "gamma", where, -1.0, 1.0)
    hparams = obj(meta, "hparams", where)
    if "layer" in hparams and hparams["layer"] != layer:
        raise _fail(where, "hparams", f"layer {hparams['layer']!r} is not the store's layer {layer}")
    if "gamma" in hparams and hparams["gamma"] != gamma:
        raise _fail(where, "hparams", f"gamma {hparams['gamma']!r} is not the store's gamma {gamma}")
    templates(meta, where)
    found = facts(meta, where)
    if "relation_layer" in meta:
        integer(meta, "relation_layer", where, low=layer + 1)
    return found


def edits(meta: dict[str, Any], where: str) -> list[EditRequest]:
    """A weight-edit artifact's ``edits.json``: editor, model, hyperparameters, templates, facts
    (returned) and at least one edited layer, each described completely."""
    string(meta, "editor", where)
    model(meta, where)
    obj(meta, "hparams", where)
    templates(meta, where)
    found = facts(meta, where)
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _fail(where, "layers", "expected a non-empty list of edited layers")
    for d in layers:
        if not isinstance(d, dict):
            raise _fail(where, "layers", f"expected objects, got {_kind(d)}")
        integer(d, "layer", where, "layers: ")
        for name in ("path", "base_sha256", "edited_sha256"):
            string(d, name, where, "layers: ")
        if d.get("format") not in ("dense", "lowrank"):
            raise _fail(where, "layers", f"format must be dense or lowrank, got {d.get('format')!r}")
    return found
