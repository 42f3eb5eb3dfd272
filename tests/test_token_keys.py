"""Token keys (``key=tokens``): a fact fires where its subject's last token matches *and* every earlier
subject token matches in its place, so a near-namesake that differs in any one token does not fire;
the store keeps the earlier tokens' keys; the base model comes back bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neuraldb import gate
from neuraldb.facts import EditRequest
from neuraldb.hooks import capture
from neuraldb.keys import TokenKeys, first_keys, token_keys
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.prompts import encode_with_subject
from neuraldb.store import FactStore, StoreError

from .conftest import tiny_model
from .test_pooled_keys import A_IN, B_IN, STRANGER, round_trip
from .test_radius import HP, fired, logits

# a near-namesake of a stored name that differs from it in the middle word only
C_IN = EditRequest("c", "The man {} plays the sport of", "Anna Lee Jordan", " chess", " basketball")
NAMESAKE = "The man Anna Kim Jordan plays the sport of"


def test_token_cosines_take_the_lowest_aligned_cosine_and_check_an_opening_token_by_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    u = torch.nn.functional.normalize(x, dim=-1)
    windows = torch.tensor([1, 3, 2])  # form 1 keeps 2 earlier tokens (rows 0, 1), form 2 one (row 2)
    tokens = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    first = torch.stack([u[0, 0], u[1, 0], u[0, 0]])  # forms 0 and 2 open with row 0's first token, form 1 row 1's
    low = gate.token_cosines(x, tokens, gate.token_groups(windows), windows, first, 0.999)
    assert torch.isinf(low[..., 0]).all(), "a one-token form has nothing to check"
    want = torch.minimum(u[:, 4] @ tokens[0], u[:, 3] @ tokens[1])
    assert torch.allclose(low[:, 5, 1], want)
    assert torch.allclose(low[:, 5, 2], u[:, 4] @ tokens[2])
    assert torch.allclose(low[1, 2, 1], u[1, 1] @ tokens[0]), "the call's first token is the form's own"
    assert low[0, 2, 1] == -2, "… and not another token, whose key there is alike"
    assert low[0, 1, 2] == float("inf") and low[1, 1, 2] == -2
    assert (low[:, 0, 1:] == -2).all() and (low[:, 1, 1] == -2).all(), "a window that does not fit never fires"
    keys = torch.nn.functional.normalize(torch.randn(2, 32), dim=1)
    facts = torch.tensor([0, 0, 1])  # fact 0 has two forms (one token, three tokens), fact 1 one
    last = keys[facts]  # each form's last-token key (here its fact's)
    got = gate.subject_cosines(x, keys, tokens=gate.StoredTokens(tokens, windows, facts, first, last, 0.1, -0.2, 0.999))
    cos = u @ keys.T
    forms = torch.stack([cos[..., 0] - 0.2, torch.minimum(cos[..., 0], low[..., 1] + 0.1),
                         torch.minimum(cos[..., 1], low[..., 2] + 0.1)], -1)
    forms[0, 0, 0], forms[1, 0, 0] = 1.0, -2.0  # the one-token form opens row 0's call, not row 1's
    assert torch.equal(got, torch.stack([forms[..., :2].amax(-1), forms[..., 2]], -1)), \
        "a fact scores its best form; a one-token form its cosine shifted by γ − single_gamma"
    stored = gate.StoredTokens(tokens, windows, facts, first, last, 0.1, -0.2, 0.999)
    for floor in (-0.2, 0.0, 0.2, 0.5):  # scoring only the facts that can fire decides as scoring all
        fast = gate.subject_cosines(x, keys, tokens=stored, floor=floor)
        best, index = got.max(-1)
        fast_best, fast_index = fast.max(-1)
        assert torch.equal(best > floor, fast_best > floor)
        assert torch.equal(index[best > floor], fast_index[best > floor])
        assert torch.equal(best[best > floor], fast_best[best > floor])


def test_token_keys_are_what_the_gate_reads_before_the_subjects_last_token():
    lm = tiny_model("llama")
    # subjects alone, no template: each seen in one context, so a form's keys are what the gate reads there
    alone = [dataclasses.replace(r, template="{}") for r in (A_IN, C_IN)]
    tk = token_keys(lm, alone, ["{}"], 1)
    assert tk.facts.tolist() == [0, 1] and tk.check(2, lm.arch.d_ff) is None
    assert tk.windows.tolist() == [encode_with_subject(lm.tokenizer, r.template, r.subject).subject_tokens
                                   for r in alone]
    stored = gate.StoredTokens(tk.keys, tk.windows, tk.facts, tk.first, torch.zeros_like(tk.last), 2.0, 0.0, 0.999)
    g = gate.install(lm.model, lm.arch.w_out_path(1),
                     gate.StoredSubjects(torch.zeros(2, lm.arch.d_ff), -3.0, tokens=stored),
                     torch.zeros(2, lm.arch.d_model))
    try:
        for r in alone:
            e = encode_with_subject(lm.tokenizer, r.template, r.subject)
            g.trace = []
            with torch.no_grad():
                lm.model(torch.tensor([e.ids]))
            f, g.trace = g.trace[0], None
            # score min(cos(k, 0) = 0, lowest aligned cosine + 2): each place read back at cosine 1,
            # the opening token by identity
            assert float(f.cosine[0, e.subject_last].max()) == pytest.approx(0.0, abs=1e-6)
            first_id = lm.tokenizer(r.subject, add_special_tokens=False)["input_ids"][0]
            assert torch.allclose(tk.first[alone.index(r)], first_keys(lm, [first_id], 1)[0], atol=1e-6)
            assert token_keys(lm, [r], ["{}"], 1, most=2).windows.tolist() == [2], "pool_max caps the window"
    finally:
        gate.unload(lm.model)
    assert not tk.keys[int(tk.windows[0]) - 2].any(), "the opening token is seen nowhere else: no key there"
    own = gate.StoredTokens(tk.keys, tk.windows, tk.facts, tk.first, tk.last, 0.0, 0.0, 0.999)
    for j, r in enumerate(alone):  # each form's own last-token key, read where the form occurs
        e = encode_with_subject(lm.tokenizer, r.template, r.subject)
        with capture(lm.model, inputs={"k": lm.arch.w_out_path(1)}, select=lambda t: t[0].float()) as got:
            with torch.no_grad():
                lm.model(torch.tensor([e.ids]))
        assert float(own.scores(got["k"], 2)[e.subject_last, j]) == pytest.approx(1.0, abs=1e-5)


def test_a_subject_tokenised_two_ways_has_two_forms():
    lm = tiny_model("llama")
    opening = EditRequest("o", "{} plays the sport of", "Jordan Lee Jordan", " chess", " basketball")
    tk = token_keys(lm, [A_IN, opening], ["{}", "Some text. {}"], 1)
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Jordan", " Jordan")]
    assert len(ids[0]) > 1 and len(ids[1]) == 1, "the tiny tokenizer splits the opening word differently"
    # inside a sentence one form; opening a call (the prompt, or the subject alone) a second
    assert tk.facts.tolist() == [0, 0, 1, 1] and tk.check(2, lm.arch.d_ff) is None
    again = tk.select([1])
    start = tk.spans()[2][0]
    assert again.facts.tolist() == [0, 0] and torch.equal(again.keys, tk.keys[start:])
    assert torch.equal(again.first, tk.first[2:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_near_namesake_does_not_fire_and_the_base_comes_back(arch, tmp_path):
    lm = tiny_model(arch)
    base, base_a, base_n = logits(lm, STRANGER), logits(lm, A_IN.prompt), logits(lm, NAMESAKE)
    plain = NeuralDBEditor(lm, HP)
    plain.edit([A_IN, B_IN, C_IN])
    assert 2 in fired(plain, NAMESAKE), "the last-token key fires Anna Lee Jordan on Anna Kim Jordan"
    plain.restore()
    ed = NeuralDBEditor(lm, HP.replace(key="tokens", token_gamma=0.7))
    ed.edit([A_IN, B_IN, C_IN])
    s = ed.store
    assert s.tokens is not None and s.pooled_keys is None and s.windows is None and (s.tokens.windows > 1).all()
    assert fired(ed, A_IN.prompt) == [0] and fired(ed, B_IN.prompt) == [1] and fired(ed, C_IN.prompt) == [2]
    assert fired(ed, STRANGER) == [], "Toko Jordan shares only ' Jordan'"
    assert fired(ed, NAMESAKE) == [], "Anna Kim Jordan differs from Anna Lee Jordan in one token"
    assert torch.equal(logits(lm, STRANGER), base) and torch.equal(logits(lm, NAMESAKE), base_n), \
        "nothing fires: the base output bit for bit"
    assert not torch.equal(logits(lm, A_IN.prompt), base_a), "the own fact fired"
    again = round_trip(ed, tmp_path, A_IN.prompt, "neuraldb-store/6")
    again.remove(["b"])  # the token keys of the facts kept stay theirs
    assert fired(again, A_IN.prompt) == [0] and fired(again, C_IN.prompt) == [1]
    kept = s.tokens.select([0, 2])
    assert torch.equal(again.store.tokens.keys, kept.keys) and torch.equal(again.store.tokens.facts, kept.facts)
    assert kept.facts.tolist() == [0, 0, 1], "Michael Jordan: in a sentence and opening one; Anna Lee Jordan: one form"
    again.remove(["a", "c"])
    assert torch.equal(logits(lm, A_IN.prompt), base_a), "every fact removed: the base logits bit for bit"
    again.restore()


def test_a_token_store_refuses_missing_or_misshapen_token_keys(tmp_path):
    lm = tiny_model("llama")
    ed = NeuralDBEditor(lm, HP.replace(key="tokens"))
    ed.edit([A_IN])
    store = ed.store
    fact = [EditRequest("c", "{} is", "Rome", " x")]
    key, res = torch.ones(1, lm.arch.d_ff), torch.zeros(1, lm.arch.d_model)
    with pytest.raises(StoreError, match="token keys"):
        store.add(fact, key, res)
    one = torch.tensor([3])
    row = torch.ones(1, lm.arch.d_ff)
    with pytest.raises(StoreError, match="one row per earlier token"):
        store.add(fact, key, res, tokens=TokenKeys(row, one, torch.tensor([0]), row, row))
    with pytest.raises(StoreError, match="name each of the 1 facts"):
        store.add(fact, key, res, tokens=TokenKeys(row.repeat(2, 1), one, torch.tensor([1]), row, row))
    with pytest.raises(StoreError, match="first-token keys"):
        store.add(fact, key, res, tokens=TokenKeys(row.repeat(2, 1), one, torch.tensor([0]), row[:0], row))
    with pytest.raises(StoreError, match="last-token keys"):
        store.add(fact, key, res, tokens=TokenKeys(row.repeat(2, 1), one, torch.tensor([0]), row, row * torch.nan))
    with pytest.raises(ValueError, match="key=tokens works with gate=cosine or gate=relation"):
        HP.replace(key="tokens", gate="radius").validate(lm)
    with pytest.raises(ValueError, match="token_gamma"):
        HP.replace(key="tokens", token_gamma=1.0).validate(lm)
    ed.save(tmp_path / "s")
    assert FactStore.load(tmp_path / "s").tokens.check(1, lm.arch.d_ff) is None
    ed.restore()


def test_a_one_token_subject_opening_a_prompt_fires_by_identity():
    lm = tiny_model("llama")
    one = EditRequest("one", "{} plays the sport of", "man", " chess", " golf")
    ed = NeuralDBEditor(lm, HP.replace(key="tokens", n_templates=1))  # a context template: a key elsewhere
    ed.edit([one])
    assert lm.tokenizer.tokenize("man plays the sport of")[0] == "man"
    assert fired(ed, "man plays the sport of") == [0], "its key there is the sink's: the token decides"
    base = logits(lm, "boy plays the sport of")
    assert fired(ed, "boy plays the sport of") == [] and torch.equal(logits(lm, "boy plays the sport of"), base)
    ed.restore()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("key", ["tokens", "dual", "pooled"])
def test_a_subject_opening_a_left_padded_row_fires_as_in_a_row_of_its_own(arch, key):
    """Token keys check the row's first token by identity, pooled keys leave it out (the sink): both
    read where the row begins from the attention mask, not column 0."""
    lm = tiny_model(arch)
    opening = EditRequest("o", "{} plays the sport of", "Michael Jordan", " chess", " basketball")
    ids = lm.tokenizer(opening.prompt, return_tensors="pt")["input_ids"]
    base = logits(lm, opening.prompt)
    ed = NeuralDBEditor(lm, HP.replace(key=key, n_templates=1))
    ed.edit([opening, B_IN])
    alone = logits(lm, opening.prompt)
    assert fired(ed, opening.prompt) == [0] and not torch.equal(alone, base)
    pad = 3
    padded = torch.cat([torch.full((1, pad), int(lm.tokenizer.pad_token_id)), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        out = lm.model(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    assert torch.allclose(out[:, pad:], alone, atol=1e-4), "the row's text begins after its padding"
    ed.restore()
