"""Fact files: every accepted shape parses; every malformed input names file, line and field."""

from __future__ import annotations

import json

import pytest

from neuraldb.facts import FactFileError, load_facts

from .conftest import DATA


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_jsonl_plain_records(tmp_path):
    p = write(tmp_path, "f.jsonl", '{"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", '
              '"target_new": "Rome", "target_true": "Paris", "id": "e"}\n\n'
              '{"prompt": "{} plays", "subject": "Jordan", "target_new": {"str": "chess"}}\n')
    a, b = load_facts(p)
    assert (a.id, a.template, a.prompt, a.target_new, a.target_true) == (
        "e", "{} is in", "The Eiffel Tower is in", " Rome", " Paris")
    assert b.target_new == " chess" and b.target_true is None and len(b.id) == 10


def test_csv_records(tmp_path):
    p = write(tmp_path, "f.csv", "id,prompt,subject,target_new\nx,{} speaks,Darrieux,English\n")
    (r,) = load_facts(p)
    assert (r.id, r.prompt, r.target_new) == ("x", "Darrieux speaks", " English")


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "Paris is", "subject": "Rome", "target_new": "x"}', "line 2: subject: 'Rome' does not occur"),
    ('{"prompt": "{} is", "subject": "Rome", "target_new": "  "}', "line 2: target_new: missing or empty"),
    ('{"prompt": "{} is", "subject": "", "target_new": "x"}', "line 2: subject: missing or empty"),
    ('{"prompt": "{} is", "subject": "Rome", "target_new": "x", "id": "1"}', "line 2: id: duplicate id '1'"),
    ('{"prompt": "{} is", "subject": "Rome", ', "f.jsonl:2: bad JSON"),
    ('["not", "an", "object"]', "line 2: record: expected a JSON object"),
])
def test_errors_name_file_line_and_field(tmp_path, line, message):
    good = '{"prompt": "{} is", "subject": "Paris", "target_new": "x", "id": "1"}'
    p = write(tmp_path, "f.jsonl", good + "\n" + line + "\n")
    with pytest.raises(FactFileError) as e:
        load_facts(p)
    assert str(p) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FactFileError, match="no such file"):
        load_facts(tmp_path / "nope.jsonl")
    with pytest.raises(FactFileError, match="no facts found"):
        load_facts(write(tmp_path, "e.json", "[]"))
    with pytest.raises(FactFileError, match="expected a JSON list"):
        load_facts(write(tmp_path, "o.json", '{"a": 1}'))


def test_counterfact_rome_schema(tmp_path):
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
           "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
           "paraphrase_prompts": ["Spike Hughes was born in"], "neighborhood_prompts": ["Max Mosley originates from"]}
    (r,) = load_facts(write(tmp_path, "cf.json", json.dumps([rec])))
    assert (r.id, r.template, r.target_new, r.target_true) == ("7", "{} originates from", " Philadelphia", " London")
    assert r.paraphrases == ("Spike Hughes was born in",)
    assert r.locality == (("Max Mosley originates from", " London"),)


def test_shared_mend_counterfact_and_zsre_files():
    cf = load_facts(DATA / "counterfact/easyedit_mend/counterfact-edit.json", limit=3)
    assert cf[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert (cf[0].target_new, cf[0].target_true, cf[0].id) == (" English", " French", "0")
    assert cf[0].locality == (("Michel Rocard is a native speaker of", " French"),)
    zs = load_facts(DATA / "zsre/zsre_mend_eval_portability_gpt4.json", limit=3)
    assert all(z.subject in z.prompt and z.target_new.strip() for z in zs)
    assert zs[0].locality[0][0].startswith("nq question:")
