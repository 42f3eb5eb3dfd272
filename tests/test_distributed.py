"""Editing spread over processes with torchrun writes the store one process writes, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, tiny_model

SUBJECTS = ["The Eiffel Tower", "Danielle Darrieux", "Michael Jordan", "Toko Yasuda", "John Lennon",
            "Michel Rocard", "Berlin", "London"]
TARGETS = ["Rome", "Paris", "guitar", "French", "Italy", "basketball", "English", "Germany"]


def _facts(path: Path) -> Path:
    lines = [json.dumps({"id": f"f{i}", "prompt": "The home of {} is", "subject": s, "target_new": t})
             for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]
    path.write_text("\n".join(lines) + "\n")
    return path


def _edit(launcher: list[str], facts: Path, model: Path, out: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, "-m", "cli", "edit", str(facts), "--model", str(model), "--out", str(out),
           "--batch-size", "3", "--steps", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_two_processes_write_the_one_process_store(tmp_path):
    model = tmp_path / "tiny-llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    facts = _facts(tmp_path / "facts.jsonl")
    _edit([sys.executable], facts, model, tmp_path / "one")
    _edit([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], facts, model,
          tmp_path / "two")
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:  # 8 facts in batches of 3: rank 0 optimised batches 0 and 2, rank 1 batch 1
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not list(tmp_path.glob("two.tmp-*")) and not list(tmp_path.glob("*.tmp-*"))
