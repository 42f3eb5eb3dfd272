"""Per-fact gate radii from synthetic look-alikes: a fact fires only where its subject is closer than
any other name that ends in the same token.

The key is read at the subject's last token, so a different subject that shares that token
("Rhode Island" / "Long Island", "Apollo 11" / "Route 11") can come within γ of a stored key and
fire the fact. At write time the editor knows each fact's own prompt; it builds *look-alikes* —
the fact's prompt with the subject replaced by a filler word followed by the subject's last word
(``"Long Island"`` for ``"Rhode Island"``, ``"Saint Darrieux"`` for ``"Danielle Darrieux"``), kept
only where the tokeniser still ends the new subject in the very same token — and raises the fact's
threshold above the closest look-alike:

    θ_i = min(cap, max(γ, max_j cos(k_i, k_look-alike_j) + margin))

The gate then fires fact i at a token when i is the best-matching stored key and its cosine
exceeds θ_i (:mod:`neuraldb.gate`). One forward per batch of look-alikes, no optimisation; θ
depends only on the fact, so it does not change when other facts are added or removed.
"""

from __future__ import annotations

import torch

from neuraldb.facts import EditRequest
from neuraldb.keys import subject_keys
from neuraldb.models import LoadedModel
from neuraldb.prompts import encode_with_subject

# Words that start names of people, places, ships, works... (written for this library).
FILLERS = (
    "John", "New", "North", "Saint", "Great", "Little", "Old", "Lake", "Royal", "Mount", "Port", "San",
    "West", "King", "Black", "Red", "Upper", "Grand", "Van", "De", "Al", "Anna", "Pierre", "Maria",
    "United", "National", "First", "Second", "Southern", "Central", "East", "Fort",
)


def look_alikes(lm: LoadedModel, request: EditRequest, fillers: tuple[str, ...] = FILLERS) -> list[EditRequest]:
    """Other subjects in ``request``'s prompt that end in the subject's last token.

    Everything before the subject's last word is replaced by one filler word (a one-word subject
    gets the filler in front: "New Paris"); a candidate is kept only when the tokeniser ends it
    in the same token id as the subject."""
    tok = lm.tokenizer
    own = encode_with_subject(tok, request.template, request.subject)
    last_id = own.ids[own.subject_last]
    last_word = request.subject.split()[-1] if request.subject.split() else request.subject
    out = []
    for word in fillers:
        name = f"{word} {last_word}"
        if name == request.subject:
            continue
        enc = encode_with_subject(tok, request.template, name)
        if enc.ids[enc.subject_last] == last_id:
            out.append(EditRequest(f"{request.id}~{word}", request.template, name, request.target_new))
    return out


@torch.no_grad()
def radii(lm: LoadedModel, requests: list[EditRequest], keys: torch.Tensor, layer: int, gamma: float,
          margin: float, cap: float, batch_size: int = 64) -> torch.Tensor:
    """θ ``[F]`` for facts with keys ``[F, d_ff]`` (any norm): see the module docstring."""
    alikes = [look_alikes(lm, r) for r in requests]
    flat = [a for group in alikes for a in group]
    theta = torch.full((len(requests),), float(gamma))
    if not flat:
        return theta
    k = torch.nn.functional.normalize(subject_keys(lm, flat, ["{}"], [layer], batch_size=batch_size).keys[layer], dim=1)
    owner = torch.tensor([i for i, group in enumerate(alikes) for _ in group])
    unit = torch.nn.functional.normalize(keys.float(), dim=1)
    cos = (k * unit[owner]).sum(1)  # [A]
    closest = torch.full((len(requests),), -1.0).scatter_reduce(0, owner, cos, "amax")
    raised = torch.clamp(torch.maximum(theta, closest + margin), max=cap)
    return torch.where(closest > -1.0, raised, theta)  # a fact without look-alikes keeps ``gamma``
