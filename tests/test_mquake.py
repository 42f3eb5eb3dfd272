"""MQuAKE: loader on the shared files, answer matching, the four accuracies on hand cases, and a
scoring run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals import mquake
from tests.conftest import DATA, tiny_model

needs_data = pytest.mark.skipif(not (DATA / "mquake").is_dir(), reason="shared data absent")


@needs_data
def _without_v2(root: Path) -> Path:
    """A data folder holding the shared MQuAKE files but not the canonical CF-3k-v2."""
    (root / "mquake").mkdir(parents=True)
    for f in (DATA / "mquake").iterdir():
        if f.name != "MQuAKE-CF-3k-v2.json":
            (root / "mquake" / f.name).symlink_to(f)
    return root


def test_loader_keeps_each_rewrite_as_its_own_edit(tmp_path):
    rel, sha, instances = mquake.load("mquake-akew")
    assert rel == "mquake/AKEW_MQuAKE-CF.json" and sha.startswith("8469d4a0") and len(instances) == 354
    first = instances[0]
    assert first.case_id == "1" and len(first.edits) == 1
    assert first.edits[0].prompt == "Ellie Kemper is a citizen of" and first.edits[0].target_new == " Croatia"
    assert [h.edited for h in first.new_hops] == [True, False] and not any(h.edited for h in first.hops)
    assert first.new_answers[0] == "Kolinda Grabar-Kitarović" and len(first.questions) == 3
    assert sum(len(i.edits) for i in instances) == 277 + 2 * 72 + 3 * 5
    rel, _, _ = mquake.load("mquake", root=_without_v2(tmp_path))  # v2 when fetched, else v1 with a notice
    assert rel == "mquake/AKEW_MQuAKE-CF.json"
    assert "MQuAKE-CF-3k-v2" in mquake.stand_in("mquake", rel) and mquake.stand_in("mquake-akew", rel) is None
    _, _, hard = mquake.load("mquake-hard")
    assert len(hard) == 429 and all(len(i.edits) == 4 for i in hard)
    with pytest.raises(ValueError, match="unknown MQuAKE set"):
        mquake.load("nope")


def test_answer_matching():
    assert mquake.matches(" Jill Biden.", ["jill biden"])
    assert not mquake.matches("Jill", ["Jill Biden"])
    assert mquake.starts_with(" Croatia, a country in Europe", ["Croatia"])
    assert not mquake.starts_with(" the Republic", ["Croatia", ""])
    assert mquake.cot_answer("X is in Y. Y's capital is Z.\nAnswer: Z\n") == "Z"
    assert mquake.cot_answer("no answer line") == ""


def test_four_accuracies_by_hand():
    cases = [
        {"edits": [True, False], "hops": [True, True], "multihop_ok": True, "cot_ok": False},
        {"edits": [True], "hops": [True, False], "multihop_ok": False, "cot_ok": False},
    ]
    m = mquake.metrics(cases)
    assert m == {"edit_wise": pytest.approx(200 / 3), "instance_wise": 50.0, "multihop": 50.0, "multihop_cot": 0.0}
    assert mquake.metrics([])["multihop"] is None


@needs_data
def test_scoring_runs_every_prompt_family_on_a_tiny_model():
    _, _, instances = mquake.load("mquake-akew")
    lm = tiny_model("llama")
    opts = mquake.MquakeOptions(answer_tokens=3, cot_tokens=4, batch_size=4)
    cases = mquake.score(lm, instances[:2], mquake.Prompts.load(), edited=True, opts=opts)
    assert [c["case_id"] for c in cases] == ["1", instances[1].case_id]
    for c, inst in zip(cases, instances[:2]):
        assert len(c["edits"]) == len(inst.edits) and len(c["hops"]) == len(inst.new_hops)
        assert len(c["multihop"]) == 3 and len(c["cot"]) == 3
    assert set(mquake.metrics(cases)) == {"edit_wise", "instance_wise", "multihop", "multihop_cot"}
    edits = mquake.unique_edits([instances[0], instances[0]])
    assert len(edits) == len(instances[0].edits), "a rewrite shared by two instances is edited once"


@needs_data
def test_groups_with_contradicting_edits_are_refused():
    _, _, instances = mquake.load("mquake-akew")
    mquake.check_groups(instances, 1)
    with pytest.raises(ValueError, match="overwrites"):
        mquake.check_groups(instances, 100)
