"""The relation gate on tiny models: a fact fires where its subject was seen and its question is
asked, nowhere else; where nothing fires, and after removing every fact, the output is the base
model's bit for bit; a store with a relation map survives a save / load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuraldb import gate
from neuraldb.facts import EditRequest
from neuraldb.files import meta_sha256, sha256_file
from neuraldb.hooks import capture, get_module
from neuraldb.neuraldb_editor import NeuralDBEditor, NeuralDBHparams
from neuraldb.relation import RelationMap, fit, fit_indexed
from neuraldb.store import FORMAT_RELATION, FORMAT_TOKENS, FactStore, StoreError

from .conftest import tiny_model

SUBJECT_LAYER, RELATION_LAYER = 1, 2


def _ids(lm, text):
    return lm.tokenizer(text, return_tensors="pt")["input_ids"]


def _identity_map(d_ff: int) -> RelationMap:
    return RelationMap(RELATION_LAYER, torch.zeros(d_ff), torch.ones(d_ff), torch.eye(d_ff))


def _keys(lm, text: str, layer: int) -> torch.Tensor:
    """``[T, d_ff]`` keys of ``text`` at ``layer`` on the model as it is."""
    with torch.no_grad(), capture(lm.model, inputs={"k": lm.arch.w_out_path(layer)}) as got:
        lm.model(_ids(lm, text))
    return got["k"][0].float()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_fires_only_after_its_subject_and_on_its_question(arch):
    lm = tiny_model(arch)
    own, other_subject = "The Eiffel Tower is located in", "Michael Jordan is located in"
    subj_keys = _keys(lm, own, SUBJECT_LAYER)
    rel_keys = _keys(lm, own, RELATION_LAYER)
    n = subj_keys.shape[0]
    with torch.no_grad():
        base_own, base_other = lm.model(_ids(lm, own)).logits, lm.model(_ids(lm, other_subject)).logits
    unit = torch.nn.functional.normalize
    # the fact: subject = token 2 of `own`, question = `own`'s last token, as the editor stores them
    g = gate.install_relation(lm.model, lm.arch.w_out_path(SUBJECT_LAYER), lm.arch.w_out_path(RELATION_LAYER),
                              gate.StoredSubjects(unit(subj_keys[[2]], dim=-1), 0.999), _identity_map(lm.arch.d_ff),
                              unit(rel_keys[[n - 1]], dim=-1), torch.randn(1, lm.arch.d_model), 0.999)
    g.trace = []
    with torch.no_grad():
        own_logits = lm.model(_ids(lm, own)).logits
        other_logits = lm.model(_ids(lm, other_subject)).logits
    fired = g.trace[0].fired[0]
    assert fired[n - 1] and int(fired.sum()) == 1, "fires on its own question's last token only"
    assert torch.equal(own_logits[0, : n - 1], base_own[0, : n - 1]), "tokens before it are untouched"
    assert not torch.equal(own_logits[0, n - 1], base_own[0, n - 1])
    assert not bool(g.trace[1].fired.any()), "same question, another subject: the subject was not seen"
    assert torch.equal(other_logits, base_other)
    gate.unload(lm.model)
    assert not isinstance(get_module(lm.model, lm.arch.w_out_path(SUBJECT_LAYER)), gate.SubjectWatch)
    with torch.no_grad():
        assert torch.equal(lm.model(_ids(lm, own)).logits, base_own)


def test_subject_seen_but_other_question_does_not_fire():
    lm = tiny_model("llama")
    own, other_question = "The Eiffel Tower is located in", "The Eiffel Tower was built by"
    subj, rel = _keys(lm, own, SUBJECT_LAYER), _keys(lm, own, RELATION_LAYER)
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        base = lm.model(_ids(lm, other_question)).logits
    g = gate.install_relation(lm.model, lm.arch.w_out_path(SUBJECT_LAYER), lm.arch.w_out_path(RELATION_LAYER),
                              gate.StoredSubjects(unit(subj[[2]], dim=-1), 0.999), _identity_map(lm.arch.d_ff),
                              unit(rel[[-1]], dim=-1),
                              torch.randn(1, lm.arch.d_model), 0.999)
    g.trace = []
    with torch.no_grad():
        assert torch.equal(lm.model(_ids(lm, other_question)).logits, base)
    assert not bool(g.trace[0].fired.any())
    gate.unload(lm.model)


FACT = EditRequest("lennon", "{} performs on the", "John Lennon", " basketball", " guitar")
HP = NeuralDBHparams(layer=SUBJECT_LAYER, gamma=0.9, gate="relation", relation_layer=RELATION_LAYER,
                     relation_gamma=0.9, relation_rank=16, steps=30, lr=0.5, weight_decay=0.0, kl_factor=0.0,
                     clamp_norm_factor=1e4, n_templates=0, key="last")


def _editor(lm, hp: NeuralDBHparams = HP) -> NeuralDBEditor:
    ed = NeuralDBEditor(lm, hp)
    d = lm.arch.d_ff
    ed.store.relation = RelationMap(RELATION_LAYER, torch.zeros(d), torch.ones(d),
                                    torch.randn(d, 16, generator=torch.Generator().manual_seed(0)))
    ed.store.relation_keys = torch.zeros(0, 16)
    return ed


@pytest.mark.parametrize(("arch", "key"), [("llama", "last"), ("gpt2", "last"), ("llama", "dual"),
                                           ("llama", "tokens")])
def test_editor_edits_removes_and_round_trips(arch, key, tmp_path):
    """With key=dual the subject watch reads both keys and the store (format 5) keeps them beside the
    map; with key=tokens it reads the subject's tokens in place (format 6, beside the map)."""
    lm = tiny_model(arch)
    prompt, unrelated = FACT.prompt, "Rome is the capital of"
    with torch.no_grad():
        base, base_unrelated = lm.model(_ids(lm, prompt)).logits, lm.model(_ids(lm, unrelated)).logits
    ed = _editor(lm, HP.replace(key=key, pool_gamma=0.9))
    ed.edit([FACT])
    target = lm.tokenizer(FACT.target_new, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        edited = lm.model(_ids(lm, prompt)).logits
        assert torch.equal(lm.model(_ids(lm, unrelated)).logits, base_unrelated)
    gain = torch.log_softmax(edited[0, -1], -1)[target] - torch.log_softmax(base[0, -1], -1)[target]
    assert gain > 0.01, "the edited target became more likely at the prompt's last token"
    ed.save(tmp_path / "s")
    loaded = NeuralDBEditor.load(lm, tmp_path / "s")
    meta = FactStore.load(tmp_path / "s").meta()
    assert meta["format"] == {"last": FORMAT_RELATION, "dual": "neuraldb-store/5", "tokens": FORMAT_TOKENS}[key]
    assert meta["relation_layer"] == RELATION_LAYER
    assert loaded.store.relation is not None and (loaded.store.pooled_keys is not None) == (key == "dual")
    assert (loaded.store.tokens is not None) == (key == "tokens")
    with torch.no_grad():
        assert torch.equal(lm.model(_ids(lm, prompt)).logits, edited)
    loaded.remove(["lennon"])
    with torch.no_grad():
        assert torch.equal(lm.model(_ids(lm, prompt)).logits, base), "removing every fact gives the base back"
    loaded.restore()


def _saved_store(lm, path) -> None:
    """One relation-gate fact saved as a store at ``path``; the model is given back."""
    ed = _editor(lm)
    ed.edit([FACT])
    ed.save(path)
    ed.restore()


def test_store_without_its_relation_tensors_is_refused(tmp_path):
    _saved_store(tiny_model("llama"), tmp_path / "s")
    t = load_file(str(tmp_path / "s" / "tensors.safetensors"))
    del t["relation_weight"]
    save_file(t, str(tmp_path / "s" / "tensors.safetensors"))
    m = json.loads((tmp_path / "s" / "store.json").read_text())
    m["tensors_sha256"] = sha256_file(tmp_path / "s" / "tensors.safetensors")
    m["meta_sha256"] = meta_sha256(m)  # resealed, as a forger would
    (tmp_path / "s" / "store.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="relation_weight"):
        FactStore.load(tmp_path / "s")


def test_relation_map_fit_separates_labelled_pairs():
    g = torch.Generator().manual_seed(0)
    relation = torch.randn(4, 32, generator=g)  # four questions; keys = question + wording noise
    which = torch.arange(200) % 4
    a = relation[which] + 0.8 * torch.randn(200, 32, generator=g)
    same = relation[which] + 0.8 * torch.randn(200, 32, generator=g)
    other = relation[(which + 1) % 4] + 0.8 * torch.randn(200, 32, generator=g)
    m = fit(torch.cat([a, a]), torch.cat([same, other]), torch.cat([torch.ones(200), torch.zeros(200)]).bool(),
            layer=RELATION_LAYER, rank=8, steps=300)
    c_same = (m.project(a) * m.project(same)).sum(-1)
    c_other = (m.project(a) * m.project(other)).sum(-1)
    assert float(c_same.mean()) > float(c_other.mean()) + 0.5
    again = fit(torch.cat([a, a]), torch.cat([same, other]), torch.cat([torch.ones(200), torch.zeros(200)]).bool(),
                layer=RELATION_LAYER, rank=8, steps=300)
    assert torch.equal(m.weight, again.weight), "seeded: the same pairs give the same map"


def test_hparams_validation():
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="relation_layer must be above"):
        HP.replace(relation_layer=SUBJECT_LAYER).validate(lm)
    with pytest.raises(ValueError, match="relation_gamma"):
        HP.replace(relation_gamma=1.5).validate(lm)
    with pytest.raises(ValueError, match="relation_rank"):
        HP.replace(relation_rank=0).validate(lm)


def test_traced_firing_is_the_edited_gates():
    """explain and the gate sweeps rebuild keys without residuals (gate_keys) and trace a zero-residual
    gate: its keys are the store's and it fires where the edited model's gate fires."""
    lm = tiny_model("llama")
    ed = _editor(lm)
    ed.edit([FACT])
    other = "John Lennon was born in"
    fired = {}
    for text in (FACT.prompt, other):
        with ed.tracing() as trace, torch.no_grad():
            lm.model(_ids(lm, text))
        fired[text] = trace[0].fired[0]
    stored_keys, stored_rel = ed.store.keys.clone(), ed.store.relation_keys.clone()
    gk = ed.gate_keys([FACT])
    assert torch.allclose(gk.keys, stored_keys, atol=1e-5) and torch.allclose(gk.relation, stored_rel, atol=1e-5)
    g, layer, theta = ed.trace_gate(gk)
    assert layer == RELATION_LAYER and torch.equal(theta, torch.full((1,), HP.relation_gamma))
    for text, want in fired.items():
        g.trace = []
        with torch.no_grad():
            lm.model(_ids(lm, text))
        got = g.trace[0].cosine[0] > theta[g.trace[0].index[0]]
        assert torch.equal(got, want), text
    assert bool(fired[FACT.prompt][-1])
    ed.restore()


def test_choosing_a_gate_brings_its_defaults_which_assignments_override():
    hp = NeuralDBHparams(layer=1)
    rel = hp.parse(["gate=relation"])
    assert (rel.steps, rel.lr, rel.clamp_norm_factor, rel.batch_size) == (50, 1.0, 10.0, 8)
    assert hp.parse(["steps=7", "gate=relation"]).steps == 7 == hp.parse(["gate=relation", "steps=7"]).steps
    assert hp.parse(["gamma=0.7"]).steps == hp.steps == 25
    assert rel.parse(["gamma=0.7"]).steps == 50, "an assignment without gate= keeps the current gate's values"
    old = NeuralDBHparams.from_saved({"layer": 1, "gate": "relation", "from_a_newer_version": 1})
    assert old.relation_inner == 0, "a relation store from before relation_inner had a map without inner negatives"
    assert NeuralDBHparams.from_saved(rel.to_dict()) == rel


def test_inner_tokens_as_hard_negatives_push_them_below_the_margin():
    g = torch.Generator().manual_seed(0)
    d, n = 32, 120
    relation = torch.randn(4, d, generator=g)
    wording = torch.randn(d, generator=g)  # what a token before the question's end shares with the question
    which = torch.arange(n) % 4
    keys = torch.cat([relation[which] + 0.5 * wording + 0.6 * torch.randn(n, d, generator=g),
                      relation[which] + 0.5 * wording + 0.6 * torch.randn(n, d, generator=g),
                      relation[(which + 1) % 4] + 0.5 * wording + 0.6 * torch.randn(n, d, generator=g)])
    ia, ib = torch.cat([torch.arange(n), torch.arange(n)]), torch.cat([n + torch.arange(n), 2 * n + torch.arange(n)])
    match = torch.cat([torch.ones(n), torch.zeros(n)]).bool()
    inner = relation[which] * 0.7 + 0.5 * wording + 0.6 * torch.randn(n, d, generator=g)  # looks like the question
    plain = fit_indexed(keys, ia, ib, match, inner[:0], ia[:0], ia[:0], RELATION_LAYER, rank=8, steps=300)
    hard = fit_indexed(keys, ia, ib, match, inner, torch.arange(n), torch.arange(n), RELATION_LAYER, rank=8,
                       steps=300)
    for m in (plain, hard):
        same = (m.project(keys[:n]) * m.project(keys[n : 2 * n])).sum(-1)
        assert float(same.mean()) > 0.6
    c = {name: float((m.project(keys[:n]) * m.project(inner)).sum(-1).mean()) for name, m in
         (("plain", plain), ("hard", hard))}
    assert c["hard"] < c["plain"] - 0.2 and c["hard"] < 0.45, c


def test_store_whose_gate_does_not_match_its_map_is_refused(tmp_path):
    lm = tiny_model("llama")
    _saved_store(lm, tmp_path / "s")
    meta_path = tmp_path / "s" / "store.json"
    m = json.loads(meta_path.read_text())
    m["hparams"]["gate"] = "cosine"
    m["meta_sha256"] = meta_sha256(m)  # resealed, as a forger would
    meta_path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="does not match its relation map"):
        NeuralDBEditor.load(lm, tmp_path / "s")



def test_with_token_keys_the_subject_watch_does_not_see_a_near_namesake():
    """The relation gate's subject side with key=tokens: the same question asked of a name that differs
    from a stored one in its middle token sees no stored subject, so nothing fires (base output bit for
    bit); the last-token key sees Anna Lee Jordan there and fires."""
    from .test_radius import fired, logits
    from .test_token_keys import C_IN, NAMESAKE

    lm = tiny_model("llama")
    base, base_own = logits(lm, NAMESAKE), logits(lm, C_IN.prompt)
    hp = HP.replace(gamma=0.5, relation_gamma=0.5, token_gamma=0.7)
    plain = _editor(lm, hp)
    plain.edit([C_IN])
    assert fired(plain, NAMESAKE) == [0], "the last-token key: ' Jordan' is enough"
    plain.restore()
    ed = _editor(lm, hp.replace(key="tokens"))
    ed.edit([C_IN])
    assert fired(ed, C_IN.prompt) == [0] and not torch.equal(logits(lm, C_IN.prompt), base_own)
    assert fired(ed, NAMESAKE) == [] and torch.equal(logits(lm, NAMESAKE), base)
    ed.remove(["c"])
    assert torch.equal(logits(lm, C_IN.prompt), base_own), "every fact removed: the base logits bit for bit"
    ed.restore()
