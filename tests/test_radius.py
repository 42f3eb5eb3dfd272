"""The radius gate: a stored fact stops firing on another subject that ends in the same token,
still fires on its own subject, and the base model comes back bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neuraldb.facts import EditRequest
from neuraldb.neuraldb_editor import NeuralDBEditor, NeuralDBHparams
from neuraldb.radius import FILLERS, look_alikes

from .conftest import tiny_model

# two stored facts whose subjects share the last token " Jordan", and a third subject (its first
# word not among the fillers the radius is built from) that shares it too
A = EditRequest("a", "{} plays the sport of", "Michael Jordan", " guitar", " basketball")
B = EditRequest("b", "{} plays the sport of", "Rome Jordan", " French", " basketball")
STRANGER = "Toko Jordan plays the sport of"
HP = NeuralDBHparams(layer=1, gamma=0.5, steps=3, lr=0.5, n_templates=0, key="last")


def fired(ed: NeuralDBEditor, text: str) -> list[int]:
    """Indices of the stored facts that fired anywhere in ``text``."""
    ids = ed.lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with ed.tracing() as trace, torch.no_grad():
        ed.lm.model(ids)
    return sorted({int(i) for t in trace for i in t.index[t.fired]})


def logits(lm, text):
    with torch.no_grad():
        return lm.model(lm.tokenizer(text, return_tensors="pt")["input_ids"]).logits


def test_look_alikes_end_in_the_subjects_last_token():
    lm = tiny_model("llama")
    names = [r.subject for r in look_alikes(lm, A)]
    assert names and "Michael Jordan" not in names and all(n.endswith(" Jordan") for n in names)
    assert not any(n.startswith("Toko") for n in names) and "Toko" not in FILLERS


def test_shared_last_token_fires_only_for_its_own_subject():
    lm = tiny_model("llama")
    base, base_a = logits(lm, STRANGER), logits(lm, A.prompt)
    plain = NeuralDBEditor(lm, HP)
    plain.edit([A, B])
    assert fired(plain, STRANGER) == [0], "the cosine gate fires Michael Jordan's fact on Toko Jordan"
    plain.restore()

    ed = NeuralDBEditor(lm, HP.replace(gate="radius"))
    ed.edit([A, B])
    assert (ed.store.thresholds() > HP.gamma).all()
    assert fired(ed, A.prompt) == [0] and fired(ed, B.prompt) == [1]
    assert fired(ed, STRANGER) == []
    assert torch.equal(logits(lm, STRANGER), base), "nothing fires: the base output bit for bit"
    assert not torch.equal(logits(lm, A.prompt), base_a), "the own fact fired"
    ed.remove(["a", "b"])
    assert torch.equal(logits(lm, A.prompt), base_a), "every fact removed: the base logits bit for bit"


@pytest.mark.parametrize("bad", [{"radius_cap": 0.4, "gate": "radius"}, {"radius_cap": 1.0, "gate": "radius"},
                                 {"radius_margin": float("nan")},
                                 {"keep_factor": float("nan")}, {"keep_factor": -1.0}],
                         ids=["cap-below-gamma", "cap-one", "margin-nan", "keep-nan", "keep-negative"])
def test_gate_hparams_out_of_range_are_refused(bad):
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match=next(iter(bad))):
        dataclasses.replace(HP, **bad).validate(lm)
