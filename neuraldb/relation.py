"""Relation keys: a learned map under which two phrasings of one question about a subject match and
another question about the same subject does not.

The raw key (the FFN output projection's input) at a prompt's last token follows the wording, not the
question (``benchmarks/relation_projection.py``: a CounterFact paraphrase pair is above cosine 0.5 in
12 % of cases, two different questions about one KnowEdit subject in 80 %). A rank-``r`` linear map
``W`` of the standardised key, fitted with a margin loss on prompt pairs from training records (pairs
that should match pushed above cosine ``pos``, the others below ``neg``), separates them. The gate
compares every token after the subject, not only the question's last one, so the fit can also push
tokens drawn inside the training prompts below ``neg`` against the questions they are paired with
(``mid`` in :func:`fit_pairs`; without them 28 % of KnowEdit's other questions about an edited
subject fired at an inner ' is' or comma, README). The relation gate (:mod:`neuraldb.gate`)
compares relation keys under this map.

A :class:`RelationMap` is plain tensors (``mean``, ``scale`` ``[d_ff]``, ``weight`` ``[d_ff, r]``) and
the layer it was fitted at; it is saved inside a fact store, so a store is self-contained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuraldb.files import ArtifactError, read_artifact, write_artifact
from neuraldb.hooks import capture, stop_after
from neuraldb.models import LoadedModel, cache_dir
from neuraldb.prompts import encode

FORMAT = "neuraldb-relation-map/1"
# the training pairs of the cached map: this many CounterFact training records (their paraphrases
# and one neighbourhood prompt each) and the KnowEdit WikiData_Counterfact training records, both
# after the first SKIP records of each file, which sweeps run on (so they measure unseen records)
N_COUNTERFACT = 2000
SKIP = 100


@dataclass
class RelationMap:
    """``project(k)``: unit-norm ``[..., r]`` relation keys of raw keys ``k`` ``[..., d_ff]``."""

    layer: int
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.weight.shape[1])

    def to(self, device: torch.device | str) -> RelationMap:
        return RelationMap(self.layer, self.mean.to(device), self.scale.to(device), self.weight.to(device))

    def project(self, keys: torch.Tensor) -> torch.Tensor:
        z = (keys.float() - self.mean) / self.scale
        return torch.nn.functional.normalize(z @ self.weight, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"relation_mean": self.mean, "relation_scale": self.scale, "relation_weight": self.weight}

    @classmethod
    def from_tensors(cls, layer: int, t: dict[str, torch.Tensor]) -> RelationMap:
        return cls(layer, t["relation_mean"].float(), t["relation_scale"].float(), t["relation_weight"].float())

    def check(self, d_ff: int) -> None:
        if self.mean.shape != (d_ff,) or self.scale.shape != (d_ff,) or self.weight.shape[:1] != (d_ff,):
            raise ValueError(f"relation map shapes {tuple(self.mean.shape)}, {tuple(self.weight.shape)} do not "
                             f"match d_ff={d_ff}")
        if not all(bool(torch.isfinite(t).all()) for t in (self.mean, self.scale, self.weight)):
            raise ValueError("relation map holds values that are not finite numbers")
        if not bool((self.scale > 0).all()):
            raise ValueError("relation map scales must be positive")


@dataclass(frozen=True)
class Pair:
    """Two prompts that ask the same question (``match``) or two questions about one subject."""

    a: str
    b: str
    match: bool


@torch.no_grad()
def last_token_keys(lm: LoadedModel, texts: list[str], layer: int, batch_size: int = 64,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``[len(texts), d_ff]`` keys at ``layer`` at the last token of each text (float32, CPU)."""
    return token_keys(lm, texts, layer, 0, batch_size=batch_size, progress=progress)[0]


@torch.no_grad()
def token_keys(lm: LoadedModel, texts: list[str], layer: int, mid: int, seed: int = 0, batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` (float32, CPU): ``[len(texts), d_ff]`` at each text's last token, and at up
    to ``mid`` positions inside each text (not its first token, which holds the attention sink, nor
    its last; drawn with ``seed``, in text order): ``[n_mid, d_ff]`` and the text of each ``[n_mid]``."""
    pad = lm.tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    last, inner, owner = [], [], []
    for start in range(0, len(texts), batch_size):
        rows = [encode(lm.tokenizer, t).ids for t in texts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + (pad,) * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)}) as got:
            with stop_after(lm.model, lm.arch.layer_path(layer)):
                lm.backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
        k = got["k"].float().cpu()
        last.append(k[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])])
        for i, r in enumerate(rows):
            picked = (torch.randperm(len(r) - 2, generator=gen)[:mid] + 1).sort().values if len(r) > 2 else []
            inner += [k[i, int(p)] for p in picked]
            owner += [start + i] * len(picked)
        if progress:
            progress(len(rows))
    d = lm.arch.d_ff
    return (torch.cat(last), torch.stack(inner) if inner else torch.zeros(0, d),
            torch.tensor(owner, dtype=torch.long))


def fit(a: torch.Tensor, b: torch.Tensor, match: torch.Tensor, layer: int, rank: int = 64, pos: float = 0.8,
        neg: float = 0.3, steps: int = 600, seed: int = 0) -> RelationMap:
    """Fit a :class:`RelationMap` on raw key pairs ``a``, ``b`` ``[n, d_ff]`` with labels ``match`` ``[n]``
    (bool): cosine above ``pos`` where they match, below ``neg`` where not (hinge; the two classes
    weighted equally). Full-batch Adam, seeded: the same pairs give the same map."""
    both = torch.cat([a, b]).float()
    mean, scale = both.mean(0), both.std(0) + 1e-3
    za, zb = (a.float() - mean) / scale, (b.float() - mean) / scale
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(a.shape[1], rank, generator=gen) / a.shape[1] ** 0.5)
    opt = torch.optim.Adam([w], lr=1e-3)
    y = match.bool()
    weight = torch.where(y, 1.0, float(y.sum()) / max(1, int((~y).sum())))
    for _ in range(steps):
        c = torch.nn.functional.cosine_similarity(za @ w, zb @ w, dim=-1)
        loss = (weight * torch.where(y, torch.relu(pos - c), torch.relu(c - neg))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return RelationMap(layer, mean, scale, w.detach().clone())


def fit_indexed(keys: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, match: torch.Tensor,
                inner: torch.Tensor, hard_a: torch.Tensor, hard_b: torch.Tensor, layer: int, rank: int = 64,
                pos: float = 0.8, neg: float = 0.3, steps: int = 600, seed: int = 0) -> RelationMap:
    """:func:`fit` on pairs given by index, with hard negatives: ``keys`` ``[T, d_ff]`` last-token keys
    of T texts, pairs ``(keys[ia], keys[ib])`` labelled ``match``; ``inner`` ``[H, d_ff]`` keys inside
    texts, each ``keys[hard_a[h]]`` to be below ``neg`` with ``inner[hard_b[h]]`` (a question against
    a token before the question is complete). Loss: the mean hinge of matching pairs + of other
    pairs + of hard pairs; each distinct key is projected once per step."""
    mean, scale = keys.mean(0), keys.std(0) + 1e-3
    z, zi = (keys - mean) / scale, (inner - mean) / scale
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(keys.shape[1], rank, generator=gen) / keys.shape[1] ** 0.5)
    opt = torch.optim.Adam([w], lr=1e-3)
    y = match.bool()
    for _ in range(steps):
        p = torch.nn.functional.normalize(z @ w, dim=-1)
        c = (p[ia] * p[ib]).sum(-1)
        hard = (p[hard_a] * torch.nn.functional.normalize(zi[hard_b] @ w, dim=-1)).sum(-1)
        loss = (torch.relu(pos - c[y]).mean() + torch.relu(c[~y] - neg).mean()
                + (torch.relu(hard - neg).mean() if len(hard) else 0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return RelationMap(layer, mean, scale, w.detach().clone())


def fit_pairs(lm: LoadedModel, pairs: list[Pair], layer: int, rank: int = 64, pos: float = 0.8, neg: float = 0.3,
              steps: int = 600, seed: int = 0, mid: int = 0,
              progress: Callable[[int], None] | None = None) -> RelationMap:
    """Read the last-token keys of every distinct prompt in ``pairs`` at ``layer`` and fit a map:
    :func:`fit`, or with ``mid`` > 0 :func:`fit_indexed` with ``mid`` inner tokens of each prompt
    as hard negatives of each prompt it is paired with (and of itself)."""
    if not pairs or all(p.match for p in pairs) or not any(p.match for p in pairs):
        raise ValueError("a relation map needs pairs that match and pairs that do not")
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    keys, inner, owner = token_keys(lm, texts, layer, mid, seed, progress=progress)
    row = {t: i for i, t in enumerate(texts)}
    ia = torch.tensor([row[p.a] for p in pairs])
    ib = torch.tensor([row[p.b] for p in pairs])
    y = torch.tensor([p.match for p in pairs])
    if mid == 0:
        return fit(keys[ia], keys[ib], y, layer, rank, pos, neg, steps, seed)
    partners = sorted({(int(a), int(b)) for a, b in zip(ia, ib)} | {(int(a), int(a)) for a in ia})
    by_text: dict[int, list[int]] = {}
    for h, t in enumerate(owner.tolist()):
        by_text.setdefault(t, []).append(h)
    hard = [(a, h) for a, b in partners for h in by_text.get(b, [])]
    hard_a = torch.tensor([a for a, _ in hard], dtype=torch.long)
    hard_b = torch.tensor([h for _, h in hard], dtype=torch.long)
    return fit_indexed(keys, ia, ib, y, inner, hard_a, hard_b, layer, rank, pos, neg, steps, seed)


def training_pairs(n_counterfact: int = N_COUNTERFACT, skip: int = SKIP) -> list[Pair]:
    """Prompt pairs from **training** records under ``$NEURALDB_DATA`` (after the first ``skip`` of
    each file; ``n_counterfact`` CounterFact records): a CounterFact edit prompt with
    each paraphrase and its first neighbourhood prompt (same relation: match), a KnowEdit edit prompt
    with its Subject_Aliasing prompts (match) and its Relation_Specificity and Forgetfulness prompts
    (another question about the subject: no match)."""
    from evals import datasets  # the dataset registry reads the local files

    out = []
    for r in datasets.load("counterfact-train").records[skip : skip + n_counterfact]:
        prompt = r.request.template.format(r.request.subject)
        out += [Pair(prompt, p, True) for p in r.request.paraphrases]
        out += [Pair(prompt, p, True) for p, _ in r.request.locality[:1]]
    kinds = {"Subject_Aliasing": True, "Relation_Specificity": False, "Forgetfulness": False}
    for r in datasets.load("knowedit-cf-train").records[skip:]:
        prompt = r.request.template.format(r.request.subject)
        out += [Pair(prompt, pr.prompt, kinds[pr.kind]) for pr in r.probes if pr.kind in kinds]
    return out


def cached_map(lm: LoadedModel, layer: int, rank: int, mid: int = 0, progress: Callable[[int], None] | None = None,
               start: Callable[[int], None] | None = None) -> RelationMap:
    """The relation map of ``lm`` at ``layer`` and ``rank`` (``mid`` hard negatives inside each
    prompt: :func:`fit_pairs`): read from the cache (``~/.cache/neuraldb/relation/``), or fitted on
    :func:`training_pairs` and cached (atomically). ``start(total)`` / ``progress(done)``: prompts
    read."""
    tag = f"-m{mid}" if mid else ""
    path = cache_dir() / "relation" / f"{lm.name}-{lm.fingerprint[:16]}-L{layer}-r{rank}-s{SKIP}{tag}"
    try:
        meta, t = read_artifact(path, "relation.json", FORMAT)
        if meta["fingerprint"] == lm.fingerprint:
            return RelationMap.from_tensors(layer, t)
    except ArtifactError:
        pass
    pairs = training_pairs()
    if start:
        start(len({x for p in pairs for x in (p.a, p.b)}))
    found = fit_pairs(lm, pairs, layer, rank, mid=mid, progress=progress)
    meta = {"format": FORMAT, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer, "rank": rank,
            "mid": mid, "pairs": len(pairs), "n_counterfact": N_COUNTERFACT, "skip": SKIP}
    write_artifact(path, "relation.json", meta, found.tensors())
    return found
