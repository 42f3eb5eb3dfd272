"""Hostile input, seeded: malformed fact files and tampered artifacts give one line of our own error
type or a correct result, never another exception; a writer killed at any moment leaves the old or
the new store; two writers never lose an update (issue 19)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuraldb import files, schema
from neuraldb.facts import EditRequest, FactFileError, load_facts
from neuraldb.files import ArtifactError, meta_sha256, sha256_file
from neuraldb.store import FactStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
WEIRD = ["", " ", "\x00", "\u200b", "\ufeff", "\u2028", "\u0085", "{}", "{} {}", "Paris", "x" * 300]


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value of any kind."""
    kind = rng.randrange(10 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 7, 10**30])
    if kind == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308])
    if kind in (4, 5):
        return rng.choice(WEIRD)
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["str", "prompt", "ground_truth", "a"]): _value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _good(rng: random.Random, i: int) -> dict:
    """A valid record of one of the accepted shapes."""
    subject = rng.choice(["Danielle Darrieux", "Eiffel Tower", "Renault 5"])
    shape = rng.randrange(4)
    if shape == 0:
        return {"id": f"p{i}", "prompt": "The home of {} is", "subject": subject, "target_new": "Rome",
                "paraphrases": [f"Where is {subject}? It is in"], "locality": [["Paris is in", "France"]]}
    if shape == 1:
        return {"case_id": i, "requested_rewrite": {"prompt": "{} is located in", "subject": subject,
                                                    "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
                "paraphrase_prompts": [f"{subject} lies in"], "neighborhood_prompts": ["The Louvre is in"]}
    if shape == 2:
        return {"case_id": i, "src": f"Where is {subject}?", "subject": subject, "alt": "Rome",
                "answers": ["Paris"], "rephrase": f"In which city is {subject}?", "loc": "nq question: who",
                "loc_ans": "x"}
    return {"id": f"k{i}", "prompt": f"The city of {subject} is", "subject": subject, "target_new": "Rome",
            "ground_truth": [["Paris", "Paname"]],
            "locality": {"Relation_Specificity": [{"prompt": f"The owner of {subject} is", "ground_truth": [["x"]]}]}}


def _paths(rec: dict) -> list[tuple]:
    out = []
    for k, v in rec.items():
        out.append((k,))
        if isinstance(v, dict):
            out += [(k, *p) for p in _paths(v)]
    return out


def _mutate(rng: random.Random, rec: dict) -> dict:
    rec = json.loads(json.dumps(rec))
    path = rng.choice(_paths(rec))
    parent = rec
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _value(rng)
    return rec


def _fact_file(rng: random.Random, tmp: Path, n: int) -> Path:
    """A fact file that is valid, has mutated records, or is broken as a file."""
    records = [_good(rng, i) for i in range(rng.randint(1, 3))]
    if rng.random() < 0.8:
        j = rng.randrange(len(records))
        records[j] = _mutate(rng, records[j])
    form = rng.choice(["jsonl", "json", "csv", "bytes"])
    path = tmp / f"f{n}.{form if form != 'bytes' else rng.choice(['jsonl', 'json', 'csv'])}"
    if form == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records) + "\n",
                        encoding="utf-8")
    elif form == "json":
        path.write_text(json.dumps(records if rng.random() < 0.8 else {"facts": records}), encoding="utf-8")
    elif form == "csv":
        cells = [str(_value(rng)) if rng.random() < 0.3 else "The home of {} is", "Eiffel Tower", "Rome"]
        extra = ",extra" if rng.random() < 0.2 else ""
        quoted = '"' + cells[0].replace('"', '""') + '"'
        path.write_text(("\ufeff" if rng.random() < 0.3 else "") + "id,prompt,subject,target_new\n"
                        f"c{n},{quoted},{cells[1]},{cells[2]}{extra}\n", encoding="utf-8")
    else:
        path.write_bytes(rng.choice([b"\xff\xfe{", b"[" * 100_000, b'{"id": 1' + b"1" * 5000 + b"}",
                                     b'[{"prompt": "{} is", "subject": "\xe9", "target_new": "x"}]', b"",
                                     b"\x00\x00", b"id,prompt\n" + b"x" * 140_000 + b",y\n"]))
    return path


def test_fuzzed_fact_files_give_one_line_errors_or_valid_facts(tmp_path):
    rng = random.Random(1234)
    outcomes = {"accepted": 0, "refused": 0}
    for n in range(1200):
        path = _fact_file(rng, tmp_path, n)
        try:
            facts = load_facts(path)
        except FactFileError as e:
            msg = str(e)
            assert "\n" not in msg and str(path) in msg, msg
            outcomes["refused"] += 1
            continue
        for f in facts:
            assert isinstance(f, EditRequest) and isinstance(f.id, str) and f.id
            assert f.template.count("{}") == 1 and f.subject.strip() and f.target_new.strip()
            assert "\x00" not in f.subject + f.target_new + f.template
            assert all(isinstance(p, str) for p in f.paraphrases)
            assert all(isinstance(p, str) and isinstance(a, str) for p, a in f.locality)
        outcomes["accepted"] += 1
    assert min(outcomes.values()) > 200, outcomes  # both sides are exercised


# ---- every example of issue 19's items 4 and 5 --------------------------------------------------

PLAIN = {"id": "a", "prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome"}


@pytest.mark.parametrize("record,message", [
    ({"case_id": 1, "requested_rewrite": None}, "requested_rewrite: expected an object, got null"),
    ({"case_id": 1, "requested_rewrite": "x"}, "requested_rewrite: expected an object, got a string"),
    ({"case_id": 1, "requested_rewrite": [3]}, "requested_rewrite: expected an object, got a number"),
    ({"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "S", "target_new": "x", "target_true": 5}},
     "requested_rewrite.target_true: expected a string, got a number"),
    ({"src": "Where is S?", "subject": "S", "alt": "x", "loc": 5, "loc_ans": "y"}, "loc: expected a string"),
    (PLAIN | {"paraphrases": "Where is it"}, "paraphrases: expected a list of strings, got a string"),
    ({"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "S", "target_new": "x"},
      "paraphrase_prompts": "S is"}, "paraphrase_prompts: expected a list of strings, got a string"),
    (PLAIN | {"locality": 3}, "locality: expected a list of [prompt, answer] pairs, got a number"),
    (PLAIN | {"locality": {"Relation_Specificity": "x"}}, "locality.Relation_Specificity: expected a list"),
    (PLAIN | {"locality": {"Forgetfulness": [{"prompt": 4, "ground_truth": "x"}]}}, "locality.Forgetfulness.prompt"),
    (PLAIN | {"prompt": "{} and {} are in"}, "prompt: holds {} 2 times"),
    (PLAIN | {"subject": "\x00"}, "subject: missing or empty"),
    (PLAIN | {"subject": "\u200b\u200b"}, "subject: missing or empty"),
    (PLAIN | {"target_new": " \ufeff "}, "target_new: missing or empty"),
    (PLAIN | {"target_new": "Ro\x00me"}, "target_new: holds a NUL character"),
    (PLAIN | {"id": True}, "id: expected a string or an integer, got a boolean"),
    (PLAIN | {"id": ["a"]}, "id: expected a string or an integer, got a list"),
    (PLAIN | {"id": float("nan")}, "id: expected a string or an integer, got a number"),
])
def test_wrong_fields_are_named(tmp_path, record, message):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(FactFileError) as e:
        load_facts(path)
    assert message in str(e.value) and f"{path}:line 1: " in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data,message", [
    (b"\xff\xfe\x00{", "not UTF-8 text (byte 0)"),
    (b'{"id": ' + b"1" * 5000 + b"}\n", ":1: bad JSON: Exceeds the limit"),
    (b"[" * 100_000 + b"]" * 100_000, "bad JSON"),
])
def test_broken_files_are_named(tmp_path, data, message):
    path = tmp_path / ("f.jsonl" if b"id" in data else "f.json")
    path.write_bytes(data)
    with pytest.raises(FactFileError) as e:
        load_facts(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_csv_bom_newlines_long_fields_and_extra_cells(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_text('\ufeffid,prompt,subject,target_new,paraphrases\nx,"{} is\nlocated in",Eiffel Tower,Rome,'
                 "Where is the Eiffel Tower? In\n", encoding="utf-8")
    (r,) = load_facts(p)
    assert (r.id, r.template, r.paraphrases) == ("x", "{} is\nlocated in", ("Where is the Eiffel Tower? In",))
    long = tmp_path / "long.csv"
    long.write_text("id,prompt,subject,target_new\nx," + "a" * 140_000 + ",b,c\n")
    with pytest.raises(FactFileError, match=r"long.csv:line \d+: bad CSV: field larger than field limit"):
        load_facts(long)
    extra = tmp_path / "extra.csv"
    extra.write_text("id,prompt,subject,target_new\nx,{} is,S,T,surplus\n")
    with pytest.raises(FactFileError, match="extra.csv:line 2: 5 fields, the header names 4"):
        load_facts(extra)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps(PLAIN | {"target_new": "Ro\u2028me\u0085"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (r,) = load_facts(p)
    assert r.target_new == " Ro\u2028me\u0085".rstrip()


# ---- tampered artifacts ---------------------------------------------------------------------------


def _store(n: int = 3) -> FactStore:
    s = FactStore("m", "fp", "llama", 2, 0.65, 8, 4, {"layer": 2, "gamma": 0.65}, ["{}", "A. {}"])
    g = torch.Generator().manual_seed(n)
    s.add([EditRequest(str(i), "{} is", f"S{i}", f" T{i}") for i in range(n)], torch.randn(n, 8, generator=g),
          torch.randn(n, 4, generator=g))
    return s


def _reseal(folder: Path, meta: dict) -> None:
    """Write ``meta`` with both checksums recomputed, as a forger would."""
    meta["tensors_sha256"] = sha256_file(folder / files.TENSORS)
    meta[files.META_SHA] = meta_sha256(meta)
    (folder / "store.json").write_text(json.dumps(meta))


def _load_or_refuse(folder: Path) -> FactStore | None:
    try:
        s = FactStore.load(folder)
    except StoreError as e:
        assert "\n" not in str(e) and str(folder) in str(e), str(e)
        return None
    assert -1 < s.gamma < 1 and torch.isfinite(s.keys).all() and torch.isfinite(s.residuals).all()
    torch.testing.assert_close(s.keys.norm(dim=1), torch.ones(len(s)))
    return s


def test_fuzzed_store_descriptions_and_tensors(tmp_path):
    rng = random.Random(99)
    base = tmp_path / "base"
    _store().save(base)
    meta0 = json.loads((base / "store.json").read_text())
    refused = 0
    for n in range(300):
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        (folder / files.TENSORS).write_bytes((base / files.TENSORS).read_bytes())
        meta = json.loads(json.dumps(meta0))
        if n % 3 == 2:  # tensors: NaN / inf / not unit / wrong shape
            t = {"keys": torch.nn.functional.normalize(torch.randn(3, 8), dim=1), "residuals": torch.randn(3, 4)}
            name = rng.choice(["keys", "residuals"])
            t[name] = rng.choice([t[name] * 2, t[name][:2], torch.full_like(t[name], float("nan")),
                                  torch.full_like(t[name], float("inf")), t[name].long()])
            save_file(t, str(folder / files.TENSORS))
        else:
            target = meta
            path = rng.choice([("gamma",), ("layer",), ("model",), ("model", "d_ff"), ("model", "name"), ("hparams",),
                               ("hparams", "gamma"), ("templates",), ("facts",), ("facts", 0), ("facts", 0, "prompt"),
                               ("facts", 1, "id"), ("facts", 2, "locality"), ("format",)])
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = _value(rng)
        _reseal(folder, meta)
        refused += _load_or_refuse(folder) is None
    assert refused > 250


@pytest.mark.parametrize("change,message", [
    ({"gamma": -5}, "gamma: expected a number in (-1, 1), got -5"),
    ({"layer": 3}, "hparams: layer 2 is not the store's layer 3"),
    ({"layer": "2"}, "layer: expected an integer"),
    ({"hparams": None}, "hparams: expected an object, got null"),
    ({"model": {"name": "m"}}, "model.fingerprint: expected a non-empty string"),
    ({"facts": [{"id": "0"}]}, "fact '0': prompt: expected a non-empty string"),
])
def test_store_description_is_validated(tmp_path, change, message):
    _store().save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "store.json").read_text()) | change
    _reseal(tmp_path / "s", meta)
    with pytest.raises(StoreError) as e:
        FactStore.load(tmp_path / "s")
    assert message in str(e.value)


def test_store_description_is_checksummed_and_tensors_checked(tmp_path):
    folder = tmp_path / "s"
    _store().save(folder)
    meta = json.loads((folder / "store.json").read_text())
    (folder / "store.json").write_text(json.dumps(meta | {"gamma": 0.1}))  # edited by hand, checksum not updated
    with pytest.raises(StoreError, match="contents do not match its meta_sha256"):
        FactStore.load(folder)
    for bad, message in [(torch.randn(3, 8), "keys are not unit vectors"),
                         (torch.full((3, 8), float("nan")), "keys must be a 2-D tensor of finite numbers")]:
        save_file({"keys": bad, "residuals": torch.randn(3, 4)}, str(folder / files.TENSORS))
        _reseal(folder, meta)
        with pytest.raises(StoreError, match=message):
            FactStore.load(folder)
    save_file({"keys": torch.nn.functional.normalize(torch.randn(3, 8), dim=1),
               "residuals": torch.full((3, 4), float("inf"))}, str(folder / files.TENSORS))
    _reseal(folder, meta)
    with pytest.raises(StoreError, match="residuals must be a 2-D tensor of finite numbers"):
        FactStore.load(folder)
    (folder / files.TENSORS).write_bytes((2**63 - 1).to_bytes(8, "little") + b"{}")  # header length 2^63
    _reseal(folder, meta)
    with pytest.raises(StoreError, match="tensors.safetensors is corrupt"):
        FactStore.load(folder)


def test_non_finite_tensors_are_never_written(tmp_path):
    s = _store()
    _store().save(tmp_path / "s")
    before = (tmp_path / "s" / "store.json").read_bytes()
    s.residuals[1, 2] = float("nan")
    with pytest.raises(StoreError, match="tensor residuals holds values that are not finite numbers"):
        s.save(tmp_path / "s")
    assert (tmp_path / "s" / "store.json").read_bytes() == before


def test_weight_edit_descriptions_are_validated():
    good = {"format": "neuraldb-weight-edits/1", "editor": "memit",
            "model": {"name": "m", "fingerprint": "f", "model_type": "llama", "d_ff": 8, "d_model": 4},
            "hparams": {"layers": [1]}, "templates": ["{}"], "facts": [],
            "layers": [{"layer": 1, "path": "p", "format": "dense", "base_sha256": "a", "edited_sha256": "b"}]}
    schema.edits(good, "e")
    with pytest.raises(ArtifactError, match="e is corrupt: layers: expected a non-empty list"):
        schema.edits(good | {"layers": []}, "e")
    rng = random.Random(5)
    for _ in range(100):
        meta = json.loads(json.dumps(good))
        key = rng.choice(list(meta))
        meta[key] = _value(rng)
        try:
            schema.edits(meta, "e")
        except ArtifactError as e:
            assert "\n" not in str(e)


def test_facts_list_checks_a_weight_edit_artifacts_tensors(tmp_path):
    folder = tmp_path / "edits"
    meta = {"format": "neuraldb-weight-edits/1", "editor": "memit",
            "model": {"name": "smollm2-135m", "fingerprint": "f", "model_type": "llama", "d_ff": 8, "d_model": 4},
            "hparams": {"layers": [1]}, "templates": ["{}"], "facts": [],
            "layers": [{"layer": 1, "path": "p", "format": "dense", "base_sha256": "a", "edited_sha256": "b"}]}
    files.write_artifact(folder, "edits.json", meta, {"layer1.delta": torch.zeros(4, 8)})
    save_file({"layer1.delta": torch.ones(4, 8)}, str(folder / files.TENSORS))  # swapped, sha256 not updated
    r = subprocess.run([sys.executable, "-m", "cli", "facts", "list", str(folder)], cwd=ROOT, capture_output=True,
                       text=True, env=os.environ | {"COLUMNS": "200"})
    assert r.returncode == 1 and "sha256 does not match" in r.stderr and "Traceback" not in r.stderr


# ---- crashes and concurrency ----------------------------------------------------------------------

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_fuzz import _store
stores = [_store(3), _store(5)]
i = 0
while True:
    stores[i % 2].save({path!r})
    i += 1
"""


def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_store(tmp_path):
    path = tmp_path / "s"
    _store(3).save(path)
    versions = {3: _store(3), 5: _store(5)}
    rng = random.Random(7)
    for _ in range(8):
        p = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))], cwd=ROOT)
        time.sleep(1.5 + rng.random())  # the interpreter starts in ~1 s; then it saves in a loop
        p.send_signal(signal.SIGKILL)
        p.wait()
        s = FactStore.load(path)  # recovers an interrupted swap, removes leftovers
        assert torch.equal(s.keys, versions[len(s)].keys) and s.facts == versions[len(s)].facts
        assert sorted(x.name for x in tmp_path.iterdir()) == [".s.lock", "s"]


def test_a_swap_interrupted_between_its_renames_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "s"
    _store(3).save(path)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 2:  # the old folder is moved aside; the process dies before the new one moves in
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _store(5).save(path)
    monkeypatch.setattr(files.os, "replace", real)
    assert not path.exists() and any(".old-" in x.name for x in tmp_path.iterdir())
    assert len(FactStore.load(path)) == 3
    assert sorted(x.name for x in tmp_path.iterdir()) == [".s.lock", "s"]


ADDER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from neuraldb.facts import EditRequest
from neuraldb.files import locked
from neuraldb.store import FactStore
with locked({path!r}):
    s = FactStore.load({path!r})
    time.sleep(1.0)  # the other writer starts meanwhile
    s.add([EditRequest({fid!r}, "{{}} is", "X" + {fid!r}, " Y")], torch.ones(1, 8), torch.ones(1, 4))
    s.save({path!r})
"""


def test_two_writers_never_lose_an_update(tmp_path):
    path = tmp_path / "s"
    _store(3).save(path)
    procs = []
    for fid in ("a", "b"):
        procs.append(subprocess.Popen([sys.executable, "-c", ADDER.format(root=str(ROOT), path=str(path), fid=fid)],
                                      cwd=ROOT))
        time.sleep(0.3)
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(FactStore.load(path).ids) == ["0", "1", "2", "a", "b"]


def test_a_held_lock_refuses_after_waiting(tmp_path):
    path = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                               f"from neuraldb.files import locked\nwith locked({str(path)!r}):\n"
                               "    print('held', flush=True); time.sleep(30)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match="is being written by another process"), files.locked(path, wait=0.2):
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("change,message", [
    ({"layer": 99, "hparams.layer": 99}, "layer"),
    ({"hparams.steps": "many"}, "hyperparameter steps must be int"),
    ({"hparams.gate": 3}, "hyperparameter gate must be str"),
])
def test_a_store_whose_hyperparameters_do_not_fit_the_model_is_refused(tmp_path, change, message):
    """The description agrees with itself but not with the model it is loaded into, or holds a
    value of the wrong type: one StoreError line naming the field, not a traceback."""
    from neuraldb.neuraldb_editor import NeuralDBEditor

    from .conftest import tiny_model

    lm = tiny_model("llama")
    ed = NeuralDBEditor(lm, NeuralDBEditor.default_hparams(lm).parse(["steps=2", "key=last"]))
    ed.edit([EditRequest("a", "{} is located in", "Eiffel Tower", " Rome")])
    ed.save(tmp_path / "s")
    ed.restore()
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    for key, value in change.items():
        *parents, last = key.split(".")
        target = meta
        for k in parents:
            target = target[k]
        target[last] = value
    _reseal(tmp_path / "s", meta)
    with pytest.raises(StoreError) as e:
        NeuralDBEditor.load(lm, tmp_path / "s")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reading_makes_no_file(tmp_path):
    """Opening a missing or whole store takes no lock and leaves nothing beside it."""
    with pytest.raises(StoreError, match="not a neuraldb store"):
        FactStore.load(tmp_path / "nothing")
    assert list(tmp_path.iterdir()) == []
    _store().save(tmp_path / "s")
    (tmp_path / ".s.lock").unlink()
    FactStore.load(tmp_path / "s")
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
