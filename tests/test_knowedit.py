"""KnowEdit's metrics (EasyEdit's definitions) against a hand computation on a bigram model whose
next-token probabilities are known in closed form, and the loader on the shared KnowEdit files."""

from __future__ import annotations

import pytest
import torch

from evals import datasets, report
from evals.datasets import EvalRecord
from evals.evaluate import EvalOptions, metrics, score_records
from neuraldb.facts import parse_record
from tests.conftest import DATA, tiny_model

RAW = [
    {"subject": "Michel Rocard", "prompt": "The language of Michel Rocard is", "target_new": "English",
     "ground_truth": "French", "rephrase": "Michel Rocard speaks the language",
     "portability": {"Subject_Aliasing": [{"prompt": "The language of Rocard is",
                                           "ground_truth": [["English", "Eng"]]}],
                     "Reasoning": [{"prompt": "The capital where Michel Rocard's language is spoken is",
                                    "ground_truth": [["London"]]},
                                   {"prompt": "Michel Rocard's language is spoken in", "ground_truth": "Berlin"}]},
     "locality": {"Relation_Specificity": [{"prompt": "The guitar of Michel Rocard is",
                                            "ground_truth": [["Toko Yasuda", "Toko"]]}],
                  "Forgetfulness": [{"prompt": "The language of Michel Rocard, which is not English, is",
                                     "ground_truth": "French"}]}},
    {"subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target_new": "basketball",
     "ground_truth": "guitar",
     "portability": {"Logical_Generalization": [{"prompt": "The sport played by Toko Yasuda is",
                                                 "ground_truth": ["basketball"]}]},
     "locality": {"Relation_Specificity": [{"prompt": "Toko Yasuda is located in", "ground_truth": "Paris"},
                                           {"prompt": "The capital of Toko Yasuda is", "ground_truth": "Rome"}]}},
]


def _bigram(perturb: bool = False):
    """GPT-2 with zero attention / MLP outputs and positions: P(b | a) = softmax(ln_f(wte[a]) · wteᵀ)[b].
    ``perturb``: another embedding table, so that some argmax tokens change (an "edited" model)."""
    lm = tiny_model("gpt2")
    tr = lm.model.transformer
    with torch.no_grad():
        tr.wpe.weight.zero_()
        for block in tr.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        if perturb:  # a shift of the final norm's output towards token 5 moves about half of the argmaxes
            tr.ln_f.bias.copy_(8.0 * tr.wte.weight[5] / tr.wte.weight[5].norm())
        table = torch.log_softmax(lm.model.lm_head(tr.ln_f(tr.wte.weight)), -1)
    return lm, table


def _tokens(lm, table, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(teacher-forced argmax ids, answer ids) of ``answer`` after ``prompt`` under the bigram ``table``."""
    p = lm.tokenizer(prompt)["input_ids"]
    a = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [int(table[t].argmax()) for t in [p[-1]] + a[:-1]], a


def _acc(lm, table, prompt, answer) -> float:
    got, a = _tokens(lm, table, prompt, answer)
    return sum(int(x == y) for x, y in zip(got, a)) / len(a)


def _records():
    spec = datasets.get_spec("knowedit-cf")
    out = []
    for raw in RAW:
        fields, extra = spec.parser(raw)
        out.append(EvalRecord(parse_record(fields), **extra))
    return out


def test_knowedit_metrics_equal_a_hand_computation():
    (pre_lm, pre_t), (post_lm, post_t) = _bigram(), _bigram(perturb=True)
    records = _records()
    assert [p.kind for p in records[0].probes] == ["Subject_Aliasing", "Reasoning", "Reasoning",
                                                   "Relation_Specificity", "Forgetfulness"]
    assert records[0].generation_prompts == ("The language of Michel Rocard is",), "fluency continues the edit prompt"
    opts = EvalOptions(generation_every=0)
    pre = score_records(pre_lm, "counterfact", records, opts)
    post = score_records(post_lm, "counterfact", records, opts)
    m = metrics("counterfact", post, pre)

    def record(rec, kind_fn):
        by_kind: dict[str, list[float]] = {}
        for p in rec.probes:
            by_kind.setdefault(p.kind, []).append(kind_fn(p))
        return {k: sum(v) / len(v) for k, v in by_kind.items()}

    def score(p):
        if p.family == "portability":  # best alias
            return max(_acc(post_lm, post_t, p.prompt, a) for a in p.answers)
        before, _ = _tokens(pre_lm, pre_t, p.prompt, p.answers[0])
        after, _ = _tokens(post_lm, post_t, p.prompt, p.answers[0])
        return sum(int(x == y) for x, y in zip(after, before)) / len(before)

    per = [record(r, score) for r in records]
    edit = [_acc(post_lm, post_t, r.request.prompt, r.request.target_new) for r in records]
    assert m["edit_succ"] == pytest.approx(100 * sum(edit) / 2)
    for kind, key in [("Subject_Aliasing", "portability_subject_aliasing"), ("Reasoning", "portability_reasoning"),
                      ("Logical_Generalization", "portability_logical_generalization"),
                      ("Relation_Specificity", "locality_relation_specificity"),
                      ("Forgetfulness", "locality_forgetfulness")]:
        have = [p[kind] for p in per if kind in p]
        assert m[key] == pytest.approx(100 * sum(have) / len(have)), key
    port = [sum(p[k] for k in p if k in ("Subject_Aliasing", "Reasoning", "Logical_Generalization"))
            / sum(k in p for k in ("Subject_Aliasing", "Reasoning", "Logical_Generalization")) for p in per]
    assert m["portability"] == pytest.approx(100 * sum(port) / 2)
    loc = [sum(p[k] for k in p if k in ("Relation_Specificity", "Forgetfulness"))
           / sum(k in p for k in ("Relation_Specificity", "Forgetfulness")) for p in per]
    assert m["locality"] == pytest.approx(100 * sum(loc) / 2)
    assert 0 < m["locality"] < 100, "the perturbed model changes some answer tokens, not all"
    unedited = metrics("counterfact", pre)
    assert unedited["locality_relation_specificity"] == 100 and unedited["locality_forgetfulness"] == 100


def test_a_family_no_record_has_is_unavailable():
    lm, _ = _bigram()
    (rec,) = _records()[1:]
    m = metrics("counterfact", score_records(lm, "counterfact", [rec], EvalOptions(generation_every=0)))
    assert m["portability_subject_aliasing"] is None and m["locality_forgetfulness"] is None
    assert m["portability_logical_generalization"] is not None


def test_the_table_shows_knowedit_columns():
    lm, _ = _bigram()
    cases = score_records(lm, "counterfact", _records(), EvalOptions(generation_every=0))
    point = metrics("counterfact", cases)
    result = {"dataset": {"kind": "counterfact", "name": "knowedit-cf"}, "protocol": {"n": [2]},
              "pre": {"points": {"2": point}}, "editors": {}}
    header, rows = report.rows(result)
    assert "Edit Succ." in header and "Loc. relation" in header and "Consistency" not in header
    assert rows[0][header.index("Port. alias")] != "n/a" and rows[0][header.index("Loc. forget")] == "100.0"


@pytest.mark.skipif(not (DATA / "knowedit").is_dir(), reason="shared data not present")
def test_knowedit_loaders_keep_every_kind():
    cf = datasets.load("knowedit-cf")
    kinds = {p.kind for r in cf.records for p in r.probes}
    assert kinds == {"Subject_Aliasing", "Reasoning", "Logical_Generalization", "Relation_Specificity",
                     "Forgetfulness"}
    first = cf.records[0]
    assert first.request.subject == "Leonardo DiCaprio" and first.request.paraphrases
    alias = next(p for p in first.probes if p.kind == "Subject_Aliasing")
    assert alias.answers[0] == " Syria" and len(alias.answers) > 1, "aliases kept"
    zs = datasets.load("knowedit-zsre")
    assert any(p.kind == "Relation_Specificity" for p in zs.records[0].probes)


def test_a_probe_that_is_another_edits_prompt_is_left_out_of_locality_and_specificity():
    """In a run that also edits "Toko Yasuda is located in", that prompt is no locality probe of Toko
    Yasuda's other edit: its answer is meant to change. It is left out for every row alike, only
    when the two edits are in the model together."""
    from dataclasses import replace

    from evals.evaluate import edited_probes

    third = {"subject": "Toko Yasuda", "prompt": "Toko Yasuda is located in", "target_new": "Lyon",
             "ground_truth": "Paris",
             "portability": {"Subject_Aliasing": [{"prompt": "Yasuda is located in", "ground_truth": "Lyon"}]}}
    spec = datasets.get_spec("knowedit-cf")
    records = []
    for i, raw in enumerate([*RAW, third]):
        fields, extra = spec.parser(raw)
        rec = EvalRecord(parse_record(fields), **extra)
        records.append(replace(rec, request=replace(rec.request, id=f"r{i}")))
    got = edited_probes([records])
    assert got == {"r1": (frozenset({0}), frozenset({0}))}, "Toko Yasuda's first locality prompt is r2's edit"
    assert edited_probes([records[:2], records[2:]]) == {}, "edited apart, restored in between: kept"
    (pre_lm, _), (post_lm, _) = _bigram(), _bigram(perturb=True)
    opts = EvalOptions(generation_every=0)
    pre, post = (score_records(lm, "counterfact", records, opts) for lm in (pre_lm, post_lm))

    def cut(c):
        if c["id"] != "r1":
            return c
        return c | {"neighborhood": c["neighborhood"][1:], "locality_tokens": c["locality_tokens"][1:]}

    left_out = metrics("counterfact", post, pre, got)
    assert left_out == metrics("counterfact", [cut(c) for c in post], [cut(c) for c in pre])
    assert left_out["locality_relation_specificity"] is not None
    assert metrics("counterfact", pre, None, got)["locality_relation_specificity"] == 100
