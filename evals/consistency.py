"""Consistency (ROME's reference score): TF-IDF cosine between what the edited model writes about a
subject and Wikipedia text about other subjects that have the new object.

Needs ROME's three reference files in the data folder (``neuraldb data fetch consistency``):
``attribute_snippets.json`` (texts per relation id and object id), ``idf.npy`` and
``tfidf_vocab.json`` (the fitted vectoriser). Without them the metric is unavailable — never a
made-up number. The vectoriser is scikit-learn's default analyser (lower-case, tokens of two or
more word characters), raw term counts × idf, cosine of the two vectors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from neuraldb.data import data_dir

FILES = ("counterfact/attribute_snippets.json", "counterfact/idf.npy", "counterfact/tfidf_vocab.json")
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass
class TfIdf:
    """A fitted TF-IDF vectoriser: ``vocab`` word → column, ``idf`` one weight per column."""

    vocab: dict[str, int]
    idf: list[float]

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[w] for w in _TOKEN.findall(text.lower()) if w in self.vocab)
        return {j: c * self.idf[j] for j, c in counts.items()}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        na = math.sqrt(sum(v * v for v in va.values()))
        nb = math.sqrt(sum(v * v for v in vb.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(v * vb.get(j, 0.0) for j, v in va.items()) / (na * nb)


@dataclass
class ReferenceTexts:
    """Attribute snippets keyed by (relation id, object id), and the vectoriser."""

    snippets: dict[tuple[str, str], list[str]]
    tfidf: TfIdf

    @classmethod
    def load(cls, root: Path | None = None) -> ReferenceTexts | None:
        """The reference files under ``root`` (default ``$NEURALDB_DATA``), or None when absent."""
        import numpy as np

        root = root or data_dir()
        paths = [root / f for f in FILES]
        if not all(p.is_file() for p in paths):
            return None
        snippets: dict[tuple[str, str], list[str]] = {}
        for el in json.loads(paths[0].read_text(encoding="utf-8")):
            key = (el["relation_id"], el["target_id"])
            snippets.setdefault(key, []).extend(s["text"] for s in el["samples"])
        vocab = json.loads(paths[2].read_text(encoding="utf-8"))
        return cls(snippets, TfIdf(vocab, np.load(paths[1]).tolist()))

    def score(self, generated: list[str], relation_id: str | None, target_id: str | None) -> float | None:
        """Cosine between the generated texts and the snippets of (relation, new object), joined;
        None when the case has no ids or no snippets."""
        refs = self.snippets.get((relation_id or "", target_id or ""))
        if not generated or not refs:
            return None
        return self.tfidf.cosine(" ".join(generated), " ".join(refs))
