"""General-ability runs through lm-eval: a local task scored by hand, RNG and model left untouched, task
selection and data availability (SciQ is not in the shared data)."""

from __future__ import annotations

import csv
import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from evals import general
from neuraldb.models import LoadedModel
from tests.conftest import DATA, tiny_model

needs_data = pytest.mark.skipif(not (DATA / "glue" / "SST-2" / "dev.tsv").is_file(), reason="shared data absent")
SST2_QUESTION = "\nQuestion: Is this sentence positive or negative?\nAnswer:"


def _score(lm: LoadedModel, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is the argmax, tokenised as lm-eval
    does for a causal model (the whole string encoded, the continuation being the tokens past the context's)
    and keeping the last ``max_length + 1`` tokens (max_length = the model's positions)."""
    whole = lm.tokenizer.encode(context + continuation)
    n_cont = len(whole) - len(lm.tokenizer.encode(context))
    tokens = torch.tensor(whole[-(lm.model.config.max_position_embeddings + 1):])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(tokens[None, :-1]).logits[0].float(), -1)[-n_cont:]
    targets = tokens[-n_cont:]
    return logp.gather(-1, targets[:, None]).sum().item(), bool((logp.argmax(-1) == targets).all())


def _sst2_by_hand(lm: LoadedModel, n: int) -> float:
    """SST-2 accuracy on the first ``n`` dev sentences: the higher of " negative" / " positive" after the prompt."""
    with (DATA / "glue" / "SST-2" / "dev.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    hits = []
    for sentence, label in rows:
        lls = [_score(lm, sentence + SST2_QUESTION, " " + choice)[0] for choice in ("negative", "positive")]
        hits.append(int(np.argmax(lls)) == int(label))
    return sum(hits) / len(hits)


@needs_data
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_sst2_matches_hand_scoring(model: str, request: pytest.FixtureRequest) -> None:
    lm = tiny_model("llama") if model == "tiny" else request.getfixturevalue("smollm2")
    n = 16 if model == "tiny" else 8  # the tiny model truncates the longer prompts to its 128 positions
    scores = general.run_general(lm, ["sst2"], limit=n, batch_size=4)["sst2"]
    assert scores["n"] == n
    assert scores["acc"] == pytest.approx(_sst2_by_hand(lm, n), abs=1e-9)
    assert scores["acc_stderr"] > 0


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws(seed: int | None = None) -> tuple[float, float, float]:
    """One number from each of Python's, numpy's and torch's global generators (seeded first if asked)."""
    if seed is not None:
        _seed(seed)
    return random.random(), float(np.random.rand()), torch.rand(1).item()


@needs_data
def test_lambada_matches_hand_scoring() -> None:
    """A loglikelihood task checks the log-probabilities themselves (random tiny models always pick the same
    SST-2 answer, so the accuracy above is a weak check for them): perplexity = exp(−mean log-likelihood)."""
    lm, n = tiny_model("llama"), 4
    with (DATA / "lambada" / "lambada_openai.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    lls, greedy = zip(*(_score(lm, r["context"], " " + r["continuation"]) for r in rows))
    scores = general.run_general(lm, ["lambada_openai"], limit=n, batch_size=2)["lambada_openai"]
    assert scores["n"] == n
    assert math.log(scores["perplexity"]) == pytest.approx(-sum(lls) / n, rel=1e-5)
    assert scores["acc"] == sum(greedy) / n


@needs_data
def test_rng_and_model_left_as_found() -> None:
    lm = tiny_model("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}

    expected = _draws(seed=123)
    _seed(123)
    general.run_general(lm, ["cola"], limit=2, batch_size=2, seed=7)
    assert _draws() == expected
    assert not lm.model.training and "tie_weights" not in vars(lm.model)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


@needs_data
def test_harness_output_is_held_back(capsys) -> None:
    """lm-eval's tqdm bars, prints and notices do not reach the terminal; when it fails they do."""
    general.run_general(tiny_model("llama"), ["mrpc"], limit=2, batch_size=2, bootstrap_iters=10)
    out, err = capsys.readouterr()
    assert out == "" and err == "", (out, err)
    with pytest.raises(RuntimeError), general._quiet_lm_eval():
        print("Running loglikelihood requests")
        logging.getLogger("lm_eval.api.task").warning("metric acc is defined, but aggregation is not")
        raise RuntimeError("harness failed")
    shown = capsys.readouterr().err
    assert "Running loglikelihood requests" in shown and "aggregation is not" in shown, \
        "a failing harness shows what it printed and logged"
    assert logging.getLogger("lm_eval").propagate and not logging.getLogger("lm_eval").handlers


def test_resolve() -> None:
    assert general.resolve("glue6") == ["cola", "sst2", "mrpc", "qnli", "rte", "nli"]
    assert general.resolve("paper6") == ["mmlu", "commonsense_qa", "arc_challenge", "lambada_openai", "wsc273",
                                         "sciq"]
    assert general.resolve("cola, mmlu") == ["cola", "mmlu"]
    assert general.resolve("ndb_cola,glue6")[:2] == ["cola", "sst2"]
    with pytest.raises(ValueError, match="glue6.*paper6.*cola"):
        general.resolve("cola,hellaswag")


@needs_data
def test_available_on_shared_data() -> None:
    runnable, missing = general.available(general.resolve("glue6,paper6"))
    assert runnable == [t for t in general.TASKS if t != "sciq"]
    assert list(missing) == ["sciq"] and "sciq/test.jsonl" in missing["sciq"]


def test_unavailable_task_is_reported_not_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEURALDB_DATA", str(tmp_path))
    runnable, missing = general.available(["mmlu", "sciq"])
    assert runnable == [] and "and 113 more" in missing["mmlu"]
    result = general.run_general(tiny_model("llama"), ["sciq"], limit=1)
    assert result == {"sciq": {"n": 0, "unavailable": missing["sciq"]}}


def test_sciq_runs_once_its_file_is_there(tmp_path, monkeypatch) -> None:
    doc = {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
           "distractor3": "argon", "correct_answer": "carbon dioxide", "support": " Plants take in gas."}
    (tmp_path / "sciq").mkdir()
    (tmp_path / "sciq" / "test.jsonl").write_text("\n".join(json.dumps(doc) for _ in range(3)) + "\n")
    monkeypatch.setenv("NEURALDB_DATA", str(tmp_path))
    scores = general.run_general(tiny_model("llama"), ["sciq"], limit=None, batch_size=4)["sciq"]
    assert scores["n"] == 3 and scores["acc"] in (0.0, 1.0) and "acc_norm" in scores


@needs_data
def test_editing_metrics_do_not_depend_on_general_checks(tmp_path):
    """The same edits and records with and without lm-eval runs give identical editing metrics."""
    from evals import datasets, runner
    from evals.evaluate import EvalOptions
    from evals.protocol import Protocol

    ds = datasets.load("counterfact")
    ds = datasets.Dataset(ds.spec, ds.files, ds.records[:2])
    protocol, opts = Protocol("counterfact", (1, 2), batch_size=1), EvalOptions(max_length=24)
    results = []
    for i, checks in enumerate((None, runner.General(("sst2",), limit=2))):
        lm = tiny_model("llama")
        chosen = runner.editor_hparams(lm, ["neuraldb"], ["steps=3", "layer=1"], 1)
        torch.manual_seed(0)
        results.append(runner.run(lm, ds, chosen, protocol, opts, tmp_path / f"r{i}.json", general=checks))
    plain, checked = results
    assert "general" not in plain["pre"] and checked["pre"]["general"]["sst2"]["n"] == 2
    assert checked["editors"]["neuraldb"]["general"]["sst2"]["n"] == 2
    assert plain["pre"]["points"] == checked["pre"]["points"]
    assert plain["editors"]["neuraldb"]["points"] == checked["editors"]["neuraldb"]["points"]
    saved = [json.loads((tmp_path / f"r{i}.cases.json").read_text()) for i in (0, 1)]
    assert saved[0] == saved[1], "per-case scores and generated texts are identical too"
