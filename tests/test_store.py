"""The store: round trip, add / remove / replace, refusal of a mismatched model or a corrupt file,
atomic writes and byte-identical saves."""

from __future__ import annotations

import json

import pytest
import torch

from neuraldb.facts import EditRequest
from neuraldb.store import FactStore, StoreError


def make(n=3, d_ff=8, d_model=4):
    s = FactStore("m", "fp", "llama", 2, 0.65, d_ff, d_model, {"layer": 2}, ["{}"])
    facts = [EditRequest(str(i), "{} is", f"S{i}", f" T{i}") for i in range(n)]
    g = torch.Generator().manual_seed(0)
    s.add(facts, torch.randn(n, d_ff, generator=g), torch.randn(n, d_model, generator=g))
    return s


def test_round_trip_and_determinism(tmp_path):
    s = make()
    s.save(tmp_path / "a")
    make().save(tmp_path / "b")
    for f in ("store.json", "tensors.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    t = FactStore.load(tmp_path / "a")
    assert t.ids == ["0", "1", "2"] and t.facts == s.facts
    assert torch.equal(t.keys, s.keys) and torch.equal(t.residuals, s.residuals)
    torch.testing.assert_close(t.keys.norm(dim=1), torch.ones(3))


def test_add_remove_replace():
    s = make()
    with pytest.raises(StoreError, match="already in the store"):
        s.add([EditRequest("1", "{} is", "X", " Y")], torch.ones(1, 8), torch.ones(1, 4))
    s.add([EditRequest("1", "{} is", "X", " Y")], torch.ones(1, 8), torch.ones(1, 4), replace=True)
    assert s.ids == ["0", "2", "1"] and torch.equal(s.residuals[2], torch.ones(4))
    s.remove(["0"])
    assert s.ids == ["2", "1"] and s.keys.shape == (2, 8)
    with pytest.raises(KeyError, match="no fact with id 'zz'"):
        s.remove(["zz"])


def test_mismatched_model_is_refused():
    s = make()
    with pytest.raises(StoreError, match="fingerprint"):
        s.check_model("other", 8, 4)
    with pytest.raises(StoreError, match="d_ff=8, d_model=4 do not match"):
        s.check_model("fp", 16, 4)


def test_corrupt_store_is_refused(tmp_path):
    make().save(tmp_path / "s")
    t = tmp_path / "s" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:-3] + b"xyz")
    with pytest.raises(StoreError, match="corrupt: sha256"):
        FactStore.load(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text("{")
    with pytest.raises(StoreError, match="store.json is corrupt"):
        FactStore.load(tmp_path / "s")
    with pytest.raises(StoreError, match="not a neuraldb store"):
        FactStore.load(tmp_path / "nothing")


def test_failed_save_keeps_the_old_store(tmp_path, monkeypatch):
    make().save(tmp_path / "s")
    before = (tmp_path / "s" / "store.json").read_text()
    bigger = make(5)

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("neuraldb.files.save_file", boom)
    with pytest.raises(OSError):
        bigger.save(tmp_path / "s")
    assert (tmp_path / "s" / "store.json").read_text() == before
    assert len(json.loads(before)["facts"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]  # the writers' lock file stays


def test_radii_round_trip_and_old_stores_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from neuraldb.files import meta_sha256, sha256_file

    s = make()
    s.add([EditRequest("r", "{} is", "R", " T")], torch.ones(1, 8), torch.ones(1, 4), radii=torch.tensor([0.8]))
    assert s.thresholds().tolist() == pytest.approx([0.65, 0.65, 0.65, 0.8])
    s.save(tmp_path / "new")
    assert torch.equal(FactStore.load(tmp_path / "new").radii, s.radii)
    s.remove(["r"])  # no fact has a radius: written in format 1, without a radii tensor, as before radii
    s.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "store.json").read_text())
    assert meta["format"] == "neuraldb-store/1"
    tensors = tmp_path / "old" / "tensors.safetensors"
    assert set(load_file(str(tensors))) == {"keys", "residuals"}
    old = FactStore.load(tmp_path / "old")
    assert old.ids == s.ids and torch.equal(old.thresholds(), torch.full((3,), 0.65))
    # a format-2 store without radii, or with radii that are not numbers, is corrupt
    for radii in (None, torch.tensor([float("nan")] * 3)):
        save_file({"keys": s.keys, "residuals": s.residuals} | ({} if radii is None else {"radii": radii}),
                  str(tensors))
        meta.update(format="neuraldb-store/2", tensors_sha256=sha256_file(tensors))
        meta["meta_sha256"] = meta_sha256(meta)  # resealed: the tensors, not the checksum, are wrong
        (tmp_path / "old" / "store.json").write_text(json.dumps(meta))
        with pytest.raises(StoreError, match="radii"):
            FactStore.load(tmp_path / "old")


def test_a_save_never_replaces_a_folder_holding_other_files(tmp_path):
    """A user's folder (or a parent of several stores) given as a store path is refused whole: its
    files stay, nothing is written beside them; a store is replaced by a store."""
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    (mine / "old-store").mkdir()
    with pytest.raises(StoreError, match="notes already holds other files .*old-store, thesis.tex"):
        make().save(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["old-store", "thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary folder left behind
    make().save(tmp_path / "s")
    make(5).save(tmp_path / "s")  # a store over a store: replaced
    assert len(FactStore.load(tmp_path / "s")) == 5
    (tmp_path / "empty").mkdir()
    make().save(tmp_path / "empty")
    assert len(FactStore.load(tmp_path / "empty")) == 3


def test_an_output_folder_is_checked_before_any_work(tmp_path):
    from neuraldb.files import ArtifactError, check_out

    check_out(tmp_path / "new" / "store")  # does not exist yet: fine
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ArtifactError, match="f.txt exists and is not a folder"):
        check_out(tmp_path / "f.txt")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.csv").write_text("x")
    with pytest.raises(ArtifactError, match="user already holds other files"):
        check_out(tmp_path / "user", overwrite=True)
    make().save(tmp_path / "s")
    with pytest.raises(ArtifactError, match="pass --overwrite to replace it"):
        check_out(tmp_path / "s")
    check_out(tmp_path / "s", overwrite=True)
    with pytest.raises(ArtifactError, match="cannot write in"):
        check_out(tmp_path / "f.txt" / "store")  # its parent is a file
