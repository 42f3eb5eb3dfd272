"""CLI smoke runs on the real embedded model, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from neuraldb.neuraldb_editor import NeuralDBEditor
from neuraldb.store import FactStore
from tests.conftest import DATA

runner = CliRunner()
EIFFEL = "The Eiffel Tower is located in the city of"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, smollm2):
    facts = tmp_path_factory.mktemp("f") / "facts.jsonl"
    facts.write_text(
        '{"id": "eiffel", "prompt": "' + EIFFEL + '", "subject": "The Eiffel Tower", '
        '"target_new": "Rome", "target_true": "Paris"}\n'
        '{"id": "darrieux", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", '
        '"target_new": "English", "target_true": "French", '
        '"locality": [["The mother tongue of Michel Rocard is", "French"]]}\n')
    out = tmp_path_factory.mktemp("s") / "store"
    r = run("edit", facts, "--out", out)
    assert r.exit_code == 0, r.output
    assert "2/2" in r.output
    report = json.loads(out.with_name("store.report.json").read_text())
    assert report["summary"]["rewritten"] == 2 and report["summary"]["locality_kept"] == 100.0
    return out


def test_ask_answers_the_edit_and_names_the_fact(demo_store):
    r = run("ask", EIFFEL, "--store", demo_store, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output and "Rome" in r.output and "eiffel" in r.output


def test_facts_remove_restores_base_logits_bit_for_bit(demo_store, smollm2, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    ids = smollm2.tokenizer(EIFFEL, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = smollm2.model(ids).logits
        ed = NeuralDBEditor.load(smollm2, store)
        edited = smollm2.model(ids).logits
        assert not torch.equal(edited, base)
        r = run("facts", "remove", store, "eiffel", "eiffel")  # named twice, removed (and counted) once
        assert r.exit_code == 0 and "removed 1 fact(s); 1 left" in r.output, r.output
        ed = NeuralDBEditor.load(smollm2, store)
        assert ed.store.ids == ["darrieux"]
        assert torch.equal(smollm2.model(ids).logits, base)
        ed.restore()
    r = run("facts", "list", store)
    assert r.exit_code == 0 and "darrieux" in r.output and "eiffel" not in r.output


def test_facts_add_appends_with_the_store_settings(demo_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    extra = tmp_path / "more.jsonl"
    extra.write_text('{"id": "jordan", "prompt": "{} plays the sport of", "subject": "Michael Jordan", '
                     '"target_new": "baseball"}\n')
    r = run("facts", "add", store, extra)
    assert r.exit_code == 0, r.output
    s = FactStore.load(store)
    assert s.ids == ["eiffel", "darrieux", "jordan"]
    assert s.templates == FactStore.load(demo_store).templates


@pytest.mark.parametrize("args,message", [
    (["edit", "nope.jsonl", "--out", "x"], "nope.jsonl: no such file"),
    (["ask", "hi", "--store", "no-store"], "no-store is not an edit artifact of any editor"),
    (["facts", "list", "no-store"], "no-store is not an edit artifact of any editor"),
    (["edit", "nope.jsonl", "--out", "x", "--editor", "rome"], "unknown editor 'rome'"),
    (["eval", "--dataset", "nope"], "unknown dataset 'nope'; available: counterfact,"),
    (["eval", "--n", "x"], "--n must be comma-separated numbers of edits, got 'x'"),
    (["compare", "--editors", "memit,memit"], "--editors must name distinct editors"),
    (["compare", "--rows-from", "no-such.json"], "--rows-from no-such.json: no such file"),
    (["ask", "  ", "--store", "no-store"], "the prompt is empty"),
    (["edit", "nope.jsonl", "--out", "x", "--limit", "0"], "limit must be at least 1"),
    (["edit", "nope.jsonl", "--out", "x", "--limit", "-1"], "limit must be at least 1"),
])
def test_errors_are_one_line_and_exit_nonzero(args, message):
    r = run(*args)
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output


def test_bad_fact_file_and_unknown_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Paris is", "subject": "Rome", "target_new": "x"}\n')
    r = run("edit", bad, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "bad.jsonl:line 1: subject: 'Rome' does not occur" in r.output
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "{} is", "subject": "Rome", "target_new": "x"}\n')
    r = run("edit", good, "--out", tmp_path / "s", "--model", "no-such-model")
    assert r.exit_code == 1 and "unknown model 'no-such-model'" in r.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("device,message", [("foo", "unknown device 'foo'; choose cpu, cuda, cuda:N or auto"),
                                            ("cuda:x", "unknown device 'cuda:x'"),
                                            ("cuda", "CUDA is not available on this machine")])
def test_an_unusable_device_is_one_line_before_the_model_loads(tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "{} is", "subject": "Rome", "target_new": "x"}\n')
    r = run("edit", good, "--out", tmp_path / "s", "--device", device)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert "loading" not in r.output


def test_edit_out_never_touches_a_users_folder_and_asks_before_replacing_a_store(tmp_path, demo_store):
    """Refused before the model loads: a folder of the user's (its files stay as they were), and an
    existing store without --overwrite."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "{} is", "subject": "Rome", "target_new": "x"}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run("edit", good, "--out", mine, "--overwrite")
    assert r.exit_code == 1 and "mine already holds other files" in r.output, r.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    r = run("edit", good, "--out", tmp_path / "new", "--report", blocker / "report.json")
    assert r.exit_code == 1 and "cannot write in" in r.output and not (tmp_path / "new").exists(), r.output
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    before = (store / "store.json").read_bytes()
    r = run("edit", good, "--out", store)
    assert r.exit_code == 1 and "pass --overwrite to replace it" in r.output, r.output
    assert (store / "store.json").read_bytes() == before


def test_outputs_are_checked_before_any_work(tmp_path):
    """An existing report is replaced only with --overwrite; eval / compare / explain refuse an
    --out they cannot write before the model loads."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "{} is", "subject": "Rome", "target_new": "x"}\n')
    (tmp_path / "s.report.json").write_text("my notes")
    r = run("edit", good, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "s.report.json already exists: pass --overwrite" in r.output, r.output
    assert (tmp_path / "s.report.json").read_text() == "my notes"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    for command in ("eval", "compare"):
        r = run(command, "--dataset", "counterfact", "--n", "2", "--out", blocker / "r.json")
        assert r.exit_code == 1 and "cannot write in" in r.output and "loading" not in r.output, r.output
        r = run(command, "--dataset", "counterfact", "--n", "2", "--out", tmp_path)
        assert r.exit_code == 1 and "is a folder; give a file name" in r.output, r.output
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"model": {"name": "smollm2-135m"},
                                  "editors": {"neuraldb": {"hparams": {"layer": 6, "gamma": 0.65}}},
                                  "protocol": {"n": [2], "sequential": True},
                                  "dataset": {"name": "counterfact", "records_sha256": "x"}}))
    r = run("explain", result, "--out", blocker / "x.json")
    assert r.exit_code == 1 and "cannot write in" in r.output and "loading" not in r.output, r.output


def test_two_facts_remove_at_once_lose_nothing(tmp_path, demo_store):
    """Two writers of one store: the second waits for the first's lock and removes on top of it."""
    import subprocess
    import sys
    from pathlib import Path

    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    ids = FactStore.load(store).ids
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "cli", "facts", "remove", str(store), i], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in ids[:2]]
    assert [p.wait() for p in procs] == [0, 0]
    assert FactStore.load(store).ids == ids[2:]


def test_models_lists_the_embedded_default():
    r = run("models")
    assert r.exit_code == 0 and "smollm2-135m" in r.output and "gemma3-270m" in r.output


@pytest.fixture(scope="module")
def memit_edits(tmp_path_factory, smollm2):
    facts = tmp_path_factory.mktemp("f") / "facts.jsonl"
    facts.write_text('{"id": "eiffel", "prompt": "' + EIFFEL + '", "subject": "The Eiffel Tower", '
                     '"target_new": "Rome", "target_true": "Paris"}\n')
    out = tmp_path_factory.mktemp("m") / "memit"
    r = run("edit", facts, "--out", out, "--editor", "memit", "--layers", "3,4,5,6,7",
            "--hparam", "stats_tokens=4096", "-H", "stats_max_length=128")
    assert r.exit_code == 0, r.output
    assert "1/1" in r.output
    return out


def test_memit_edit_and_ask_with_the_same_flags(memit_edits, smollm2):
    ids = smollm2.tokenizer(EIFFEL, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = smollm2.model(ids).logits
    r = run("ask", EIFFEL, "--edits", memit_edits, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output and "Rome" in r.output and "memit" in r.output
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, base), "the CLI loaded its own copy; ours is untouched"
    r = run("facts", "list", memit_edits)
    assert r.exit_code == 0 and "eiffel" in r.output and "memit on smollm2-135m" in r.output
    r = run("facts", "remove", memit_edits, "eiffel")
    assert r.exit_code == 1 and "folded into the weights" in r.output


def test_options_of_another_editor_are_refused(tmp_path):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "{} is", "subject": "Rome", "target_new": "x"}\n')
    r = run("edit", facts, "--out", tmp_path / "o", "--editor", "memit", "--gamma", "0.5")
    assert r.exit_code == 1 and "--gamma does not apply to memit" in r.output
    r = run("edit", facts, "--out", tmp_path / "o", "--hparam", "nope=1")
    assert r.exit_code == 1 and "has no hyperparameter nope" in r.output


def test_a_check_file_that_is_not_a_result_gets_one_line(tmp_path):
    junk = tmp_path / "junk.json"
    for text in ("{not json", "[1, 2]"):
        junk.write_text(text)
        r = run("eval", "--n", "2", "--batch-size", "2", "--check", junk, "--out", tmp_path / "o.json")
        assert r.exit_code == 1 and "--check" in r.output and "not a neuraldb result file" in r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.json").exists()


def test_eval_check_fails_on_a_degraded_edit_and_passes_on_the_same_run(smollm2, tmp_path):
    common = ("eval", "--dataset", "counterfact", "--n", "3", "--batch-size", "3", "--generation-every", "0")
    base = tmp_path / "base.json"
    r = run(*common, "--out", base)
    assert r.exit_code == 0, r.output
    saved = json.loads(base.read_text())
    assert saved["protocol"]["n"] == [3] and saved["dataset"]["selected"] == 3
    assert saved["editors"]["neuraldb"]["points"]["3"]["efficacy"] == 100.0
    assert base.with_suffix(".md").is_file() and (tmp_path / "base.cases.json").is_file()
    r = run(*common, "--out", tmp_path / "same.json", "--check", base)
    assert r.exit_code == 0, r.output
    r = run("explain", base)  # every score change is traced to the fact that fired
    assert r.exit_code == 0, r.output
    ex = json.loads((tmp_path / "base.explain.json").read_text())
    assert ex["families"]["rewrite"]["fired_by_kind"]["own"] == 3, "each edit prompt fires its own fact"
    assert ex["neighborhood_worse"]["none"] == 0, "no neighbour changed where nothing fired"
    r = run("explain", tmp_path / "nothing.json")
    assert r.exit_code == 1 and "cannot read the result" in r.output
    before = base.read_bytes()
    r = run("explain", base, "--out", base)  # never overwrites its own input
    assert r.exit_code == 1 and "would overwrite an input" in r.output and base.read_bytes() == before
    r = run("explain", base, "--editor", "memit")
    assert r.exit_code == 1 and "no 'memit' row" in r.output
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**saved, "protocol": {"n": 3}}))
    r = run("explain", broken)
    assert r.exit_code == 1 and "list of edit counts" in r.output and len(r.output.strip().splitlines()) == 1
    # degraded on purpose: a gate threshold no key reaches writes nothing (one step: nothing to wait for)
    r = run(*common, "--out", tmp_path / "bad.json", "--check", base, "--hparam", "gamma=0.999", "-H", "steps=1")
    assert r.exit_code == 1
    assert "regression:" in r.output and "neuraldb@3 efficacy" in r.output


def test_data_list_and_fetch_errors(monkeypatch, tmp_path):
    from evals import catalog

    r = run("data", "list")
    assert r.exit_code == 0, r.output
    assert "counterfact" in r.output and "zsre" in r.output
    r = run("data", "fetch", "nope")
    assert r.exit_code == 1 and "unknown data set 'nope'" in r.output
    monkeypatch.setenv("NEURALDB_DATA", str(tmp_path))
    dead = catalog.Remote("counterfact/counterfact.json", "http://127.0.0.1:9/counterfact.json", "0" * 64)
    monkeypatch.setitem(catalog.REMOTES, "counterfact", (dead,))
    r = run("data", "fetch", "counterfact")
    assert r.exit_code == 1 and "cannot download" in r.output
    assert not (tmp_path / "counterfact" / "counterfact.json").exists()


def test_compare_with_mquake_gives_one_report(smollm2, tmp_path, monkeypatch):
    from tests.test_mquake import _without_v2

    data = _without_v2(tmp_path / "data")
    (data / "counterfact").symlink_to(DATA / "counterfact")
    monkeypatch.setenv("NEURALDB_DATA", str(data))
    out = tmp_path / "all.json"
    r = run("eval", "--n", "2", "--batch-size", "2", "--generation-every", "0", "--mquake", "mquake",
            "--mquake-n", "1", "--out", out)
    assert r.exit_code == 0, r.output
    assert "MQuAKE-CF-3k-v2" in r.output, "the v1 stand-in is announced"
    saved = json.loads(out.read_text())
    assert saved["editors"]["neuraldb"]["points"]["2"]["efficacy"] == 100.0
    assert saved["mquake"]["dataset"]["files"][0]["path"] == "mquake/AKEW_MQuAKE-CF.json"
    point = saved["mquake"]["editors"]["neuraldb"]["points"]["1"]
    assert set(point) >= {"edit_wise", "instance_wise", "multihop", "multihop_cot"}
    assert point["edit_wise"] == 100.0, "the edited fact's cloze statement gives the new object"
    assert "## mquake on smollm2-135m" in out.with_suffix(".md").read_text()
    assert "Edit-wise" in r.output and "Efficacy" in r.output
    r = run("eval", "--dataset", "mquake", "--mquake", "mquake-hard", "--out", tmp_path / "x.json")
    assert r.exit_code == 1 and "--mquake adds MQuAKE to a CounterFact / ZsRE run" in r.output
    r = run("eval", "--dataset", "mquake", "--n", "1,2", "--batch-size", "1", "--out", tmp_path / "y.json")
    assert r.exit_code == 1 and "MQuAKE takes one --n" in r.output


def test_progress_in_a_log_prints_a_line_at_each_tenth():
    import io

    from rich.console import Console

    from cli import LineProgress

    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=40)) as bar:
        edits = bar.add_task("edits", total=1000)
        for _ in range(1000):  # one by one: a line at each tenth, no more
            bar.advance(edits)
        tokens = bar.add_task("statistics (tokens)", total=3_000_000)
        bar.advance(tokens, 2_500_000)  # past several tenths at once: one line
        fetch = bar.add_task("counterfact/a-rather-long-file-name.json", total=None)  # no total known
        bar.update(fetch, completed=4096)
    lines = buf.getvalue().splitlines()
    shares = [re.sub(r" \(\d+ %\) \d+:\d\d elapsed$", "", ln) for ln in lines]
    assert shares == [f"edits: {k}/1000" for k in range(100, 1001, 100)] + [
        "statistics (tokens): 2500000/3000000", "counterfact/a-rather-long-file-name.json: 4096 done 0:00 elapsed"]
    assert lines[9].startswith("edits: 1000/1000 (100 %) 0:00 elapsed")
