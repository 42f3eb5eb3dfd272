"""Pooled subject keys (``key=pooled``): a key pools every token of the subject, so a fact stops
firing on another subject that only shares its last token; the store keeps each key's window; the
base model comes back bit for bit."""

from __future__ import annotations

import pytest
import torch

from neuraldb import gate
from neuraldb.facts import EditRequest
from neuraldb.keys import pooled_keys
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.prompts import encode_with_subject
from neuraldb.store import FactStore, StoreError

from .conftest import tiny_model
from .test_radius import HP, A, B, fired, logits

# the radius test's facts with the subject inside the prompt: a prompt's first token is the attention
# sink, which a pool leaves out (a subject opening its prompt pools its tokens after the first)
A_IN = EditRequest("a", "The man {} plays the sport of", A.subject, A.target_new, A.target_true)
B_IN = EditRequest("b", "The man {} plays the sport of", B.subject, B.target_new, B.target_true)
STRANGER = "The man Toko Jordan plays the sport of"


def test_window_cosines_pool_the_last_w_tokens_without_the_sink():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    keys = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    u = torch.nn.functional.normalize(x, dim=-1)
    ones = gate.window_groups(torch.tensor([1, 1, 1]))
    assert torch.allclose(gate.window_cosines(x, keys, ones), u @ keys.T)
    cos = gate.window_cosines(x, keys, gate.window_groups(torch.tensor([1, 3, 2])))
    unit = torch.nn.functional.normalize
    assert torch.allclose(cos[:, 5, 1], unit(u[:, 3:6].sum(1), dim=-1) @ keys[1], atol=1e-6)
    assert torch.allclose(cos[:, 1, 2], u[:, 1] @ keys[2], atol=1e-6), "token 0 (the sink) is left out"
    assert (cos[:, :2, 1] == -2).all() and (cos[:, :1, 2] == -2).all(), "a window that does not fit never fires"
    assert torch.allclose(cos[..., 0], u @ keys[0])


def test_a_pooled_key_is_what_the_gate_reads_at_the_subjects_last_token():
    lm = tiny_model("llama")
    keys, windows = pooled_keys(lm, [A, B], ["{}"], 1)  # the bare prompt alone: the gate reads the same pool
    assert windows.tolist() == [encode_with_subject(lm.tokenizer, r.template, r.subject).subject_tokens
                                for r in (A, B)]
    g = gate.install(lm.model, lm.arch.w_out_path(1), gate.StoredSubjects(keys, -1.0, windows),
                     torch.zeros(2, lm.arch.d_model))
    try:
        for j, r in enumerate((A, B)):
            e = encode_with_subject(lm.tokenizer, r.template, r.subject)
            g.trace = []
            with torch.no_grad():
                lm.model(torch.tensor([e.ids]))
            f, g.trace = g.trace[0], None
            assert int(f.index[0, e.subject_last]) == j
            assert float(f.cosine[0, e.subject_last]) == pytest.approx(1.0, abs=1e-5)
    finally:
        gate.unload(lm.model)


def round_trip(ed: NeuralDBEditor, tmp_path, prompt: str, fmt: str) -> NeuralDBEditor:
    """Save ``ed``'s store and load it back: store format ``fmt``, the same logits on ``prompt``, the
    same key choice, the same tensor bytes when saved again. Returns the loaded editor."""
    edited = logits(ed.lm, prompt)
    ed.save(tmp_path / "s")
    assert FactStore.load(tmp_path / "s").meta()["format"] == fmt
    again = NeuralDBEditor.load(ed.lm, tmp_path / "s")
    assert torch.equal(logits(ed.lm, prompt), edited) and again.hparams.key == ed.hparams.key
    again.save(tmp_path / "t")
    tensors = "tensors.safetensors"
    assert (tmp_path / "s" / tensors).read_bytes() == (tmp_path / "t" / tensors).read_bytes()
    return again


def test_shared_last_token_fires_only_for_its_own_subject():
    lm = tiny_model("llama")
    base, base_a = logits(lm, STRANGER), logits(lm, A_IN.prompt)
    plain = NeuralDBEditor(lm, HP)
    plain.edit([A_IN, B_IN])
    assert fired(plain, STRANGER) != [], "the last-token key fires a Jordan fact on Toko Jordan"
    plain.restore()

    ed = NeuralDBEditor(lm, HP.replace(key="pooled"))
    ed.edit([A_IN, B_IN])
    assert ed.store.windows is not None and (ed.store.windows > 1).all()
    assert fired(ed, A_IN.prompt) == [0] and fired(ed, B_IN.prompt) == [1]
    assert fired(ed, STRANGER) == [], "Toko Jordan shares only ' Jordan'"
    assert torch.equal(logits(lm, STRANGER), base), "nothing fires: the base output bit for bit"
    assert not torch.equal(logits(lm, A_IN.prompt), base_a), "the own fact fired"
    ed.remove(["a", "b"])
    assert torch.equal(logits(lm, A_IN.prompt), base_a), "every fact removed: the base logits bit for bit"


def test_a_pooled_store_round_trips_and_refuses_bad_windows(tmp_path):
    lm = tiny_model("llama")
    ed = NeuralDBEditor(lm, HP.replace(key="pooled"))
    ed.edit([A_IN, B_IN])
    ed.save(tmp_path / "s")
    again = NeuralDBEditor.load(lm, tmp_path / "s")
    assert torch.equal(again.store.windows, ed.store.windows) and again.hparams.key == "pooled"
    assert fired(again, A_IN.prompt) == [0] and fired(again, STRANGER) == []
    again.save(tmp_path / "t")
    tensors = "tensors.safetensors"
    assert (tmp_path / "s" / tensors).read_bytes() == (tmp_path / "t" / tensors).read_bytes()
    store = FactStore.load(tmp_path / "s")
    fact = [EditRequest("c", "{} is", "Rome", " x")]
    key, res = torch.ones(1, lm.arch.d_ff), torch.zeros(1, lm.arch.d_model)
    with pytest.raises(StoreError, match="window"):
        store.add(fact, key, res)
    with pytest.raises(StoreError, match="window"):
        store.add(fact, key, res, windows=torch.tensor([0]))
    with pytest.raises(ValueError, match="key=pooled works with gate=cosine"):
        HP.replace(key="pooled", gate="radius").validate(lm)
    with pytest.raises(ValueError, match="pool_max"):
        HP.replace(key="pooled", pool_max=-1).validate(lm)
    assert pooled_keys(lm, [A_IN, B_IN], ["{}"], 1, most=1)[1].tolist() == [1, 1], "pool_max caps the window"


def test_dual_scores_are_the_smaller_of_the_token_key_and_the_shifted_pool():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32)
    keys = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    pooled = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    groups = gate.window_groups(torch.tensor([2, 1, 3]))
    got = gate.subject_cosines(x, keys, groups, pooled, 0.2)
    unit = torch.nn.functional.normalize(x, dim=-1)
    want = torch.minimum(unit @ keys.T, gate.window_cosines(x, pooled, groups) + 0.2)
    assert torch.equal(got, want)
    assert (got[:, :2, 2] < -1).all(), "a pool that does not fit never fires, whatever the token key"
    assert torch.equal(gate.subject_cosines(x[0], keys), torch.nn.functional.normalize(x[0], dim=-1) @ keys.T)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dual_keys_fire_for_their_own_subject_and_the_base_comes_back(arch, tmp_path):
    lm = tiny_model(arch)
    base, base_a = logits(lm, STRANGER), logits(lm, A_IN.prompt)
    ed = NeuralDBEditor(lm, HP.replace(key="dual", pool_gamma=0.9))
    ed.edit([A_IN, B_IN])
    s = ed.store
    assert s.pooled_keys is not None and s.windows is not None and (s.windows > 1).all()
    assert fired(ed, A_IN.prompt) == [0] and fired(ed, B_IN.prompt) == [1]
    assert fired(ed, STRANGER) == [], "Toko Jordan shares only ' Jordan': its pool does not match"
    assert torch.equal(logits(lm, STRANGER), base), "nothing fires: the base output bit for bit"
    assert not torch.equal(logits(lm, A_IN.prompt), base_a), "the own fact fired"
    again = round_trip(ed, tmp_path, A_IN.prompt, "neuraldb-store/5")
    again.remove(["a", "b"])
    assert torch.equal(logits(lm, A_IN.prompt), base_a), "every fact removed: the base logits bit for bit"
    again.restore()
    store = FactStore.load(tmp_path / "s")
    fact = [EditRequest("c", "{} is", "Rome", " x")]
    key, res = torch.ones(1, lm.arch.d_ff), torch.zeros(1, lm.arch.d_model)
    with pytest.raises(StoreError, match="pooled key"):
        store.add(fact, key, res, windows=torch.tensor([1]))
    with pytest.raises(ValueError, match="key=dual works with gate=cosine or gate=relation"):
        HP.replace(key="dual", gate="radius").validate(lm)
    with pytest.raises(ValueError, match="pool_gamma"):
        HP.replace(key="dual", pool_gamma=1.0).validate(lm)


def test_dual_keys_raise_a_one_token_subjects_threshold_to_single_gamma():
    lm = tiny_model("llama")
    one = EditRequest("one", "The old {} plays the sport of", "man", " chess", " golf")
    ed = NeuralDBEditor(lm, HP.replace(key="dual", pool_gamma=0.9, single_gamma=0.8))
    ed.edit([A_IN, one])
    assert ed.store.windows.tolist()[1] == 1
    assert ed.store.thresholds().tolist() == pytest.approx([HP.gamma, 0.8])
    assert torch.equal(ed.gate_keys([A_IN, one]).theta, ed.store.thresholds())
    ed.restore()


def test_pooled_cosines_of_a_left_padded_row_are_those_of_the_row_alone():
    """A row's text after p columns of left padding pools as the row alone: its first token (the sink)
    and the padding are left out, and a window that would reach into them does not fire."""
    window_cosines, window_groups = gate.window_cosines, gate.window_groups
    g = torch.Generator().manual_seed(0)
    text, pad = torch.randn(1, 5, 16, generator=g), 3
    keys = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    groups = window_groups(torch.tensor([1, 2, 3, 5]))
    alone = window_cosines(text, keys, groups)
    padded = torch.cat([torch.randn(1, pad, 16, generator=g), text], 1)
    got = window_cosines(padded, keys, groups, torch.tensor([pad]))
    assert torch.allclose(got[:, pad:], alone, atol=1e-6) and bool((got[:, :pad, 1:] == -2).all())
    assert not torch.allclose(window_cosines(padded, keys, groups)[:, pad:], alone, atol=1e-6), \
        "read from column 0, the padding and the sink would be pooled"
