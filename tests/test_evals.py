"""The evaluation suite: scoring against a model whose probabilities are known in closed form,
dataset loaders on the shared data, unavailable metrics, the protocol and the regression check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evals import datasets, report
from evals.datasets import EvalRecord
from evals.evaluate import EvalOptions, metrics, score_records
from evals.protocol import Protocol
from neuraldb.facts import parse_record
from tests.conftest import DATA, tiny_model


@pytest.fixture(scope="module")
def bigram():
    """A GPT-2 whose attention and MLP outputs are zero and whose positions are zero, so the next
    token depends on the current token only: P(b | a) = softmax(ln_f(wte[a]) · wteᵀ)[b]."""
    lm = tiny_model("gpt2")
    tr = lm.model.transformer
    with torch.no_grad():
        tr.wpe.weight.zero_()
        for block in tr.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        table = torch.log_softmax(lm.model.lm_head(tr.ln_f(tr.wte.weight)), -1)  # [V, V] log P(b | a)
    return lm, table


def _by_hand(lm, table, prompt: str, target: str) -> tuple[float, list[bool]]:
    """Mean log-probability and per-token argmax hits of ``target`` after ``prompt`` (bigram)."""
    p = lm.tokenizer(prompt)["input_ids"]
    o = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
    prev = [p[-1]] + o[:-1]
    lps = [float(table[a, b]) for a, b in zip(prev, o)]
    return sum(lps) / len(lps), [int(table[a].argmax()) == b for a, b in zip(prev, o)]


CF = [
    {"case_id": 1, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
     "target_new": "Rome", "target_true": "Paris",
     "paraphrases": ["Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in the city of"],
     "locality": [["Rome is the capital of", "Italy"], ["The language of Michel Rocard is", "French"]]},
    {"case_id": 2, "prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan",
     "target_new": "guitar", "target_true": "basketball", "paraphrases": ["Michael Jordan is good at"],
     "locality": [["Toko Yasuda plays the", "guitar"]]},
]


def _records(raw):
    return [EvalRecord(parse_record(r)) for r in raw]


def test_counterfact_scores_equal_the_closed_form_probabilities(bigram):
    lm, table = bigram
    records = _records(CF)
    cases = score_records(lm, "counterfact", records, EvalOptions(generation_every=0, batch_size=3))
    es, ps, ns = [], [], []
    for rec, case in zip(records, cases):
        r = rec.request
        new, true = (_by_hand(lm, table, r.prompt, t)[0] for t in (r.target_new, r.target_true))
        assert case["rewrite"] == pytest.approx([new, true], abs=1e-5)
        es.append(float(new > true))
        ps.append(sum(_by_hand(lm, table, p, r.target_new)[0] > _by_hand(lm, table, p, r.target_true)[0]
                      for p in r.paraphrases) / len(r.paraphrases))
        ns.append(sum(_by_hand(lm, table, q, a)[0] > _by_hand(lm, table, q, r.target_new)[0]
                      for q, a in r.locality) / len(r.locality))
    m = metrics("counterfact", cases)
    assert m["efficacy"] == pytest.approx(100 * sum(es) / 2)
    assert m["generalization"] == pytest.approx(100 * sum(ps) / 2)
    assert m["specificity"] == pytest.approx(100 * sum(ns) / 2)
    assert m["fluency"] is None and m["consistency"] is None, "no generation prompts: unavailable, not 0"


def test_zsre_token_accuracy_is_teacher_forced_per_position(bigram):
    lm, table = bigram
    raw = [{"case_id": 7, "src": "What is the capital of Italy?", "subject": "Italy", "alt": "Berlin",
            "answers": ["Rome"], "rephrase": "Which city is the capital of Italy?",
            "loc": "nq question: who plays the guitar", "loc_ans": "John Lennon"}]
    spec = datasets.get_spec("zsre")
    fields, extra = spec.parser(raw[0])
    rec = EvalRecord(parse_record(fields), **extra)
    assert rec.request.target_new == " Rome", "MEMIT / AlphaEdit protocol: answers[0]"
    (case,) = score_records(lm, "zsre", [rec], EvalOptions())
    r = rec.request

    def acc(prompt, target):
        hits = _by_hand(lm, table, prompt, target)[1]
        return sum(hits) / len(hits)

    assert case["rewrite"] == pytest.approx(acc(r.prompt, " Rome"))
    assert case["paraphrase"] == pytest.approx([acc(r.paraphrases[0], " Rome")])
    assert case["neighborhood"] == pytest.approx([acc("nq question: who plays the guitar?", " John Lennon")])
    m = metrics("zsre", [case])
    assert m["efficacy"] == pytest.approx(100 * case["rewrite"])


def test_missing_prompt_families_are_unavailable(bigram):
    lm, _ = bigram
    bare = _records([{"id": "a", "prompt": "{} plays the sport of", "subject": "Michael Jordan",
                      "target_new": "guitar", "target_true": "basketball"}])
    m = metrics("counterfact", score_records(lm, "counterfact", bare, EvalOptions()))
    assert m["efficacy"] is not None
    assert m["generalization"] is None and m["specificity"] is None and m["score"] is None
    assert m["fluency"] is None and m["consistency"] is None


def test_generations_are_seeded_and_feed_fluency(bigram):
    lm, _ = bigram
    rec = EvalRecord(parse_record(CF[0]), generation_prompts=("The Eiffel Tower is", "Rome is"))
    opts = EvalOptions(max_length=12)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = score_records(lm, "counterfact", [rec], opts)[0]
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG state is left untouched"
    b = score_records(lm, "counterfact", [rec], opts)[0]
    assert a["texts"] == b["texts"] and len(a["texts"]) == 2
    assert all(t.startswith(p) for t, p in zip(a["texts"], rec.generation_prompts))
    assert metrics("counterfact", [a])["fluency"] is not None


@pytest.mark.skipif(not (DATA / "counterfact").is_dir(), reason="shared data not present")
def test_dataset_loaders_on_the_shared_data():
    cf = datasets.load("counterfact")
    assert len(cf.records) == 1031 and cf.kind == "counterfact"
    r = cf.records[0]
    assert len(r.request.paraphrases) == 2 and len(r.request.locality) == 10 and len(r.generation_prompts) == 10
    assert r.relation_id and r.target_new_id
    mend = datasets.load("counterfact-mend")
    assert len(mend.records) == 21_919
    assert mend.records[0].request.prompt == "The mother tongue of Danielle Darrieux is"
    assert all(not x.generation_prompts for x in mend.records[:50])
    zsre = datasets.load("zsre")
    assert len(zsre.records) == 1037 and zsre.files[0][1].startswith("0cf155da")
    assert datasets.select(zsre.records, 3, sample_seed=1) == datasets.select(zsre.records, 3, sample_seed=1)
    with pytest.raises(ValueError, match="has 1037"):
        datasets.select(zsre.records, 5000)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("nope")


def test_protocol_batches_end_at_every_n():
    assert Protocol("x", (100, 250), 100).chunks() == [(0, 100), (100, 200), (200, 250)]
    assert Protocol("x", (50,), 100).chunks() == [(0, 50)]
    with pytest.raises(ValueError):
        Protocol("x", (200, 100)).validate()


def _result(**metrics_by_editor):
    pts = {name: {"points": {"50": m}, "hparams": {}, "edit_seconds": 1.0, "eval_seconds": 1.0}
           for name, m in metrics_by_editor.items()}
    return {"editors": pts}


def test_check_names_each_metric_that_fell():
    base = _result(memit={"efficacy": 90.0, "specificity": 80.0, "fluency": 600.0, "consistency": None})
    same = _result(memit={"efficacy": 89.0, "specificity": 80.0, "fluency": 600.0, "consistency": None})
    assert report.check(same, base, 2) == []
    worse = _result(memit={"efficacy": 70.0, "specificity": 77.5, "fluency": 599.0, "consistency": None})
    failures = report.check(worse, base, 2)
    assert len(failures) == 2
    assert failures[0].startswith("memit@50 efficacy: 70.0") and "specificity" in failures[1]
    assert report.check(_result(), base, 2) == ["memit: not in the result"]
    other = base | {"dataset": {"name": "zsre", "records_sha256": "x"}}
    assert report.check(same, other, 2)[0].startswith("baseline differs in dataset")
    # MQuAKE run with --mquake is checked inside the same result
    with_mq = base | {"mquake": _result(memit={"edit_wise": 80.0, "multihop": 10.0})}
    assert report.check(same | {"mquake": _result(memit={"edit_wise": 79.0, "multihop": 10.0})}, with_mq, 2) == []
    assert report.check(same | {"mquake": _result(memit={"edit_wise": 60.0, "multihop": 10.0})}, with_mq, 2) == [
        "MQuAKE: memit@50 edit_wise: 60.0 < baseline 80.0 − 2"]
    assert report.check(same, with_mq, 2) == ["MQuAKE: memit: not in the result"]


def test_fluency_entropy_matches_hand_count():
    from evals.metrics import ngram_entropy

    # "x y x y" → bigrams (x,y)×2 (y,x)×1: H2 = −(2/3 log 2/3 + 1/3 log 1/3); trigrams two distinct: H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("x y x y") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)


def _two_cases():
    """Two CounterFact cases, scoring without generations, a tiny Llama: a quick whole run."""
    ds = datasets.load("counterfact")
    return datasets.Dataset(ds.spec, ds.files, ds.records[:2]), EvalOptions(generation_every=0), tiny_model("llama")


@pytest.mark.skipif(not (DATA / "counterfact").is_dir(), reason="shared data not present")
def test_resume_reuses_rows_and_refuses_another_run(tmp_path, monkeypatch):
    from evals import runner

    ds, opts, lm = _two_cases()
    chosen = runner.editor_hparams(lm, ["neuraldb"], ["steps=2", "layer=1"], 2)
    out = tmp_path / "r.json"
    first = runner.run(lm, ds, chosen, Protocol("counterfact", (2,), 2), opts, out)

    def boom(*args, **kwargs):
        raise AssertionError("a saved row was recomputed")

    monkeypatch.setattr(runner, "run_editor", boom)
    monkeypatch.setattr(runner, "evaluate_unedited", boom)
    again = runner.run(lm, ds, chosen, Protocol("counterfact", (2,), 2), opts, out, resume=True)
    assert again["editors"] == json.loads(out.read_text())["editors"]
    assert again["pre"]["points"] == first["pre"]["points"]
    with pytest.raises(ValueError, match="--resume .*r.json: a different run .*differs in protocol"):
        runner.run(lm, ds, chosen, Protocol("counterfact", (2,), 1), opts, out, resume=True)


@pytest.mark.skipif(not (DATA / "counterfact").is_dir(), reason="shared data not present")
def test_rows_computed_in_separate_runs_join_one_result(tmp_path, monkeypatch):
    from evals import runner

    ds, opts, lm = _two_cases()
    protocol = Protocol("counterfact", (2,), 2)
    both = runner.editor_hparams(lm, ["neuraldb", "memit"], ["neuraldb:steps=2", "neuraldb:layer=1",
                                                             "memit:steps=2", "memit:layers=1,2"], 2)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    alone = runner.run(lm, ds, both, protocol, opts, tmp_path / "both.json")
    runner.run(lm, ds, {"neuraldb": both["neuraldb"]}, protocol, opts, a)
    runner.run(lm, ds, {"memit": both["memit"]}, protocol, opts, b, rows_from=[a])  # its unedited row from a

    def boom(*args, **kwargs):
        raise AssertionError("a row held by another file was recomputed")

    monkeypatch.setattr(runner, "run_editor", boom)
    monkeypatch.setattr(runner, "evaluate_unedited", boom)
    joined = runner.run(lm, ds, both, protocol, opts, tmp_path / "joined.json", rows_from=[b, a])
    assert list(joined["editors"]) == ["neuraldb", "memit"], "the order of --editors, not of the files"
    assert joined["pre"]["points"] == alone["pre"]["points"]
    for name in ("neuraldb", "memit"):  # the same numbers as one run computing both
        assert joined["editors"][name]["points"] == alone["editors"][name]["points"]
    cases = json.loads(runner.cases_path(tmp_path / "joined.json").read_text())
    assert cases == json.loads(runner.cases_path(tmp_path / "both.json").read_text())
    # OUT itself named by --rows-from (no --resume) keeps its rows; with --resume as well
    for resume in (False, True):
        again = runner.run(lm, ds, both, protocol, opts, tmp_path / "joined.json", resume, rows_from=[
            tmp_path / "joined.json"])
        assert again["editors"] == joined["editors"]
    other = runner.editor_hparams(lm, ["memit"], ["memit:steps=3", "memit:layers=1,2"], 2)
    with pytest.raises(ValueError, match="b.json: run with other hyperparameters: memit \\(steps\\)"):
        runner.run(lm, ds, other, protocol, opts, tmp_path / "e.json", rows_from=[b])
    with pytest.raises(ValueError, match="--rows-from .*a.json: a different run .*differs in protocol"):
        runner.run(lm, ds, both, Protocol("counterfact", (2,), 1), opts, tmp_path / "c.json", rows_from=[a])
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--rows-from .*junk.json: not a neuraldb result file"):
        runner.run(lm, ds, both, protocol, opts, tmp_path / "f.json", rows_from=[tmp_path / "junk.json"])
    runner.cases_path(b).unlink()
    with pytest.raises(ValueError, match="b.json: per-case scores of pre, memit are missing"):
        runner.run(lm, ds, both, protocol, opts, tmp_path / "d.json", rows_from=[b])


@pytest.mark.skipif(not (DATA / "counterfact").is_dir(), reason="shared data not present")
def test_a_row_cut_short_continues_from_its_last_batch(tmp_path, monkeypatch):
    from baselines.closed_form import ClosedFormEditor
    from evals import runner
    from neuraldb.neuraldb_editor import NeuralDBEditor

    ds, opts, lm = _two_cases()
    protocol = Protocol("counterfact", (1, 2), 1)  # two batches of one fact, evaluated after each
    names = ["neuraldb", "alphaedit", "memit"]
    both = runner.editor_hparams(lm, names, ["neuraldb:steps=2", "neuraldb:layer=1", "alphaedit:steps=2",
                                             "alphaedit:layers=1,2", "memit:steps=2", "memit:layers=1,2"], 1)
    whole = runner.run(lm, ds, both, protocol, opts, tmp_path / "whole.json")
    second = ds.records[1].request.id

    class Stopped(Exception):
        """What the end of a session does to a run."""

    stopped: set[type] = set()

    def stop_before_second_batch(*classes: type) -> None:
        for cls in classes:  # each editor is stopped once

            def edit(self, requests, *args, real=cls.edit, **kwargs):
                if requests[0].id == second and type(self) not in stopped:
                    stopped.add(type(self))
                    raise Stopped
                return real(self, requests, *args, **kwargs)

            monkeypatch.setattr(cls, "edit", edit)

    stop_before_second_batch(NeuralDBEditor, ClosedFormEditor)
    out, partial = tmp_path / "cut.json", tmp_path / "cut.partial"
    with pytest.raises(Stopped):
        runner.run(lm, ds, both, protocol, opts, out, resume=True)
    assert (partial / "neuraldb" / "state.json").is_file()
    with pytest.raises(Stopped):  # neuraldb's row continues and is saved; alphaedit's is cut
        runner.run(lm, ds, both, protocol, opts, out, resume=True)
    assert not (partial / "neuraldb").exists() and (partial / "alphaedit" / "editor").is_dir()
    with pytest.raises(Stopped):  # alphaedit's row continues; memit's is cut
        runner.run(lm, ds, both, protocol, opts, out, resume=True)
    # a saved state that does not read back (here: a corrupt tensor file) is dropped, the row starts over
    (partial / "memit" / "editor" / "tensors.safetensors").write_bytes(b"junk")
    done = runner.run(lm, ds, both, protocol, opts, out, resume=True)
    assert not partial.exists()
    for name in both:  # the same numbers as an uninterrupted run, at both N
        assert done["editors"][name]["points"] == whole["editors"][name]["points"]
        assert done["editors"][name].get("resumed_at") == ([1] if name != "memit" else None)
    cases = json.loads(runner.cases_path(out).read_text())
    assert cases == json.loads(runner.cases_path(tmp_path / "whole.json").read_text())
    # without --resume a partial row is not continued: the row starts over
    monkeypatch.undo()
    stopped.clear()
    stop_before_second_batch(NeuralDBEditor)
    with pytest.raises(Stopped):
        runner.run(lm, ds, both, protocol, opts, out)
    assert (partial / "neuraldb" / "state.json").is_file()
    again = runner.run(lm, ds, both, protocol, opts, out)
    assert "resumed_at" not in again["editors"]["neuraldb"] and not partial.joinpath("neuraldb").exists()
    assert again["editors"]["neuraldb"]["points"] == whole["editors"]["neuraldb"]["points"]
