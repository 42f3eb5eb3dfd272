"""The NeuralDB editor on tiny models: an edit changes the fact, removing it restores the base
logits bit for bit, and the registry finds editors by name."""

from __future__ import annotations

import pytest
import torch

from neuraldb.editor import get_editor
from neuraldb.facts import EditRequest
from neuraldb.neuraldb_editor import NeuralDBEditor, NeuralDBHparams
from neuraldb.scoring import mean_logprobs
from neuraldb.store import StoreError

from .conftest import tiny_model

FACT = EditRequest("lennon", "{} performs on the", "John Lennon", " basketball", " guitar")
OTHER = "Rome is the capital of"
# bare prompt only: on a random tiny model keys differ too much across contexts for an average
HP = NeuralDBHparams(layer=1, gamma=0.9, steps=30, lr=0.5, weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=1e4,
                     n_templates=0)


def logits(lm, text):
    with torch.no_grad():
        return lm.model(lm.tokenizer(text, return_tensors="pt")["input_ids"]).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_edit_changes_fact_and_removal_restores_base_exactly(arch):
    lm = tiny_model(arch)
    base_fact, base_other = logits(lm, FACT.prompt), logits(lm, OTHER)
    lp0 = mean_logprobs(lm, [(FACT.prompt, FACT.target_new)])
    ed = NeuralDBEditor(lm, HP)
    ed.edit([FACT])
    lp1 = mean_logprobs(lm, [(FACT.prompt, FACT.target_new)])
    assert lp1 > lp0 + 0.01, "the edited target became more likely (a random tiny model cannot move far)"
    assert torch.equal(logits(lm, OTHER), base_other), "an unrelated prompt is untouched"
    ed.remove(["lennon"])
    assert torch.equal(logits(lm, FACT.prompt), base_fact)
    ed.edit([FACT])
    ed.restore()
    assert torch.equal(logits(lm, FACT.prompt), base_fact)


def test_save_load_round_trip_and_same_bytes(tmp_path):
    lm = tiny_model("llama")
    for name in ("a", "b"):
        ed = NeuralDBEditor(lm, HP)
        ed.edit([FACT])
        ed.save(tmp_path / name)
        ed.restore()
    for f in ("store.json", "tensors.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    edited = NeuralDBEditor.load(lm, tmp_path / "a")
    assert edited.hparams == HP and edited.store.ids == ["lennon"]
    other = tiny_model("qwen2")
    with pytest.raises(StoreError, match="fingerprint"):
        NeuralDBEditor.load(other, tmp_path / "a")


def test_registry_and_validation():
    assert get_editor("neuraldb") is NeuralDBEditor
    with pytest.raises(ValueError, match="unknown editor 'nope'; available: .*neuraldb"):
        get_editor("nope")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        NeuralDBEditor(tiny_model("llama"), NeuralDBHparams(layer=9))
    with pytest.raises(ValueError, match="gamma"):
        NeuralDBEditor(tiny_model("llama"), NeuralDBHparams(layer=1, gamma=1.5))


def test_hparams_parse_reads_each_field_as_its_type():
    hp = NeuralDBHparams(layer=2)
    got = hp.parse(["gamma=0.7", "steps=5", "seed=3"])
    assert (got.gamma, got.steps, got.seed, got.layer) == (0.7, 5, 3, 2)
    with pytest.raises(ValueError, match="has no hyperparameter nope"):
        hp.parse(["nope=1"])
    with pytest.raises(ValueError, match="steps: cannot read 'many' as int"):
        hp.parse(["steps=many"])
    from baselines.memit import MEMITHparams

    assert MEMITHparams(layers=(1, 2)).parse(["layers=3,4,5"]).layers == (3, 4, 5)


@pytest.mark.parametrize("editor,assignment", [("neuraldb", "lr=inf"), ("neuraldb", "weight_decay=nan"),
                                               ("memit", "mom2_update_weight=inf"), ("alphaedit", "lr=-inf")])
def test_non_finite_hyperparameters_are_refused_by_every_editor(editor, assignment):
    """NaN / ±inf would make every residual or weight update non-finite: refused when the editor
    is built, naming the field (from the CLI's --hparam as from Python)."""
    lm = tiny_model("llama")
    cls = get_editor(editor)
    hp = cls.default_hparams(lm).parse([assignment])
    with pytest.raises(ValueError, match=f"hyperparameter {assignment.split('=')[0]} must be a finite number"):
        cls(lm, hp)


@pytest.mark.parametrize("gamma", [-1.0, 1.0, 1.5])
def test_a_gate_threshold_that_fires_everywhere_or_nowhere_is_refused(gamma):
    with pytest.raises(ValueError, match=r"gamma must be in \(-1, 1\)"):
        NeuralDBEditor(tiny_model("llama"), HP.replace(gamma=gamma))
