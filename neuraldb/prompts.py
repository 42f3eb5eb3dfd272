"""Tokenisation of edit prompts: subject positions and padded batches.

Conventions (MEMIT / AlphaEdit): the prompt is tokenised with the tokenizer's special tokens
(BOS where it adds one) and the target separately without them, and the two id lists are
concatenated, so the first target token never merges with the prompt. The subject's last token
is found through character offsets, which is BOS-aware by construction. A token that merges the
subject's end with the text after it (``")?"``) is not the subject's last token, although MEMIT's
index arithmetic (prefix and subject tokenised apart) lands on it: see :func:`subject_last_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """One tokenised prompt (+ optional target).

    Attributes:
        ids: prompt ids followed by target ids.
        n_prompt: number of prompt ids (target ids start here).
        subject_last: index of the subject's last token (``-1`` when there is no subject).
        subject_first: index of the subject's first token (``-1`` when there is no subject or it
            was not recorded).
    """

    ids: tuple[int, ...]
    n_prompt: int
    subject_last: int
    subject_first: int = -1

    @property
    def subject_tokens(self) -> int:
        """How many tokens the subject spans (0 when unknown)."""
        return self.subject_last - self.subject_first + 1 if self.subject_first >= 0 else 0

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.n_prompt


def subject_first_token(offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """Index of the first token overlapping characters ``[start, end)``."""
    return next(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)


def subject_last_token(offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """Index of the subject's last token: the last token overlapping characters ``[start, end)``
    that ends inside the subject.

    A token that runs past the subject's end merges the subject's last characters with the text
    after it (``")?"`` in "… (APA-56)?"); its key is mostly that text's, so it would match the
    same punctuation in every other prompt. Such a token is skipped unless it is the subject's only
    one.
    """
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise ValueError(f"no token covers characters {start}..{end}")
    inside = [i for i in hits if offsets[i][1] <= end]
    return inside[-1] if inside else hits[-1]


def encode(
    tok: PreTrainedTokenizerBase, text: str, subject_span: tuple[int, int] | None = None, target: str = ""
) -> Encoded:
    """Tokenise ``text`` (+ ``target``) and locate the subject given by its character span."""
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=subject_span is not None)
    ids = list(enc["input_ids"])
    first = last = -1
    if subject_span is not None:
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        last = subject_last_token(offsets, *subject_span)
        first = min(subject_first_token(offsets, *subject_span), last)
    target_ids = tok(target, add_special_tokens=False)["input_ids"] if target else []
    return Encoded(tuple(ids + list(target_ids)), len(ids), last, first)


def encode_with_subject(
    tok: PreTrainedTokenizerBase, template: str, subject: str, context: str = "{}", target: str = ""
) -> Encoded:
    """Encode ``context`` with the filled ``template`` in place of ``{}``, locating the subject."""
    prefix = context[: context.index("{}")]
    slot = template.index("{}")
    text = context.replace("{}", template.replace("{}", subject, 1), 1)
    start = len(prefix) + slot
    return encode(tok, text, (start, start + len(subject)), target)


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    return list(tok(target, add_special_tokens=False)["input_ids"])


@dataclass
class Batch:
    """Rows padded on both sides so that every row's anchor token sits at column ``anchor``.

    ``input_ids``, ``attention_mask``, ``position_ids``: ``[rows, T]``; ``offset[r]`` is the left
    padding of row r, so token j of row r sits at column ``offset[r] + j``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offset: torch.Tensor
    anchor: int


def aligned_batch(rows: list[Encoded], pad_id: int, anchors: list[int] | None = None) -> Batch:
    """Pad ``rows`` so that each row's anchor (default: its subject's last token) shares one column.

    Left padding shifts each row by ``anchor - anchor_r``; right padding fills to a common length.
    Position ids count real tokens only, so padding never changes what a model computes.
    """
    anchors = anchors if anchors is not None else [r.subject_last for r in rows]
    anchor = max(anchors)
    offsets = [anchor - a for a in anchors]
    width = max(o + len(r.ids) for o, r in zip(offsets, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (o, r) in enumerate(zip(offsets, rows)):
        ids[i, o : o + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, o : o + len(r.ids)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch(ids, mask, positions, torch.tensor(offsets, dtype=torch.long), anchor)
