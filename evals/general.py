"""General-ability benchmarks run with lm-evaluation-harness on an in-memory (possibly edited) model.

The tasks are the local ``ndb_*`` configs in ``evals/tasks/``: lm-eval's built-in prompts, choices, targets
and metrics, with documents read from ``$NEURALDB_DATA`` (see ``evals/tasks/utils.py``), so nothing is
fetched from the hub. :func:`run_general` evaluates the model object itself (no reload, no saved copy):

* the response cache is off: lm-eval keys it by request only, so an edited model would get the scores of
  the model that filled it;
* lm-eval reseeds Python's ``random``, numpy and torch; their states are restored afterwards, so an
  editor sampling after an evaluation behaves as if the evaluation had not happened;
* the model is left as found: same weights (HFLM's re-tying of embeddings is suppressed) and same
  train/eval mode.

Task names here are lm-eval's names without the ``ndb_`` prefix (``cola``, ``mmlu``, ...).
"""

from __future__ import annotations

import io
import logging
import math
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from evals.tasks.utils import FILES
from neuraldb.data import data_dir
from neuraldb.models import LoadedModel

TASK_DIR = Path(__file__).with_name("tasks")
PREFIX = "ndb_"
SUITES: dict[str, list[str]] = {
    "glue6": ["cola", "sst2", "mrpc", "qnli", "rte", "nli"],
    "paper6": ["mmlu", "commonsense_qa", "arc_challenge", "lambada_openai", "wsc273", "sciq"],
}
TASKS: list[str] = [t for suite in SUITES.values() for t in suite]
LOWER_IS_BETTER = {"perplexity"}

Scores = dict[str, Any]
"""One task's result: ``{metric: value, metric_stderr: value or None, "n": documents}``, or
``{"n": 0, "unavailable": reason}`` for a task whose data is missing."""


def resolve(spec: str) -> list[str]:
    """Task names for ``"glue6"``, ``"paper6"`` or comma-separated task / suite names (e.g. ``"cola,mmlu"``).

    Names may carry the ``ndb_`` prefix; duplicates are dropped, order is kept.
    """
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        name = part.removeprefix(PREFIX)
        if name in SUITES:
            out += SUITES[name]
        elif name in TASKS:
            out.append(name)
        else:
            raise ValueError(f"unknown task or suite {part!r}; choose from suites {', '.join(SUITES)} "
                             f"or tasks {', '.join(TASKS)}")
    return list(dict.fromkeys(out))


def available(tasks: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``tasks`` into those whose data files are all under ``$NEURALDB_DATA`` and the others.

    Returns:
        (runnable task names, {unavailable task name: reason})
    """
    root = data_dir()
    runnable, missing = [], {}
    for task in tasks:
        absent = [f for f in FILES[task] if not (root / f).is_file()]
        if not absent:
            runnable.append(task)
        else:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            missing[task] = f"{absent[0]}{more} not found under {root}"
    return runnable, missing


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the Python ``random``, numpy and torch (CPU and CUDA) generator states on exit."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _left_as_found(model: torch.nn.Module) -> Iterator[None]:
    """Keep the model's weights and mode: HFLM calls ``model.tie_weights()``, which would silently re-tie an
    edited, untied output embedding, so that call is made a no-op while lm-eval holds the model."""
    training = model.training
    model.tie_weights = lambda *args, **kwargs: None  # instance attribute shadows the method
    try:
        yield
    finally:
        del model.tie_weights
        model.train(training)


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's tqdm bars, ``print``s ("bootstrapping for stddev") and log records (per-task notices) are
    held back: they would interleave with neuraldb's own progress and tables. If the harness fails, what it
    wrote is shown."""
    held = io.StringIO()
    logger, handler = logging.getLogger("lm_eval"), logging.StreamHandler(held)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with redirect_stdout(held), redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _evaluate(lm: LoadedModel, tasks: list[str], limit: int | None, batch_size: int, seed: int,
              bootstrap_iters: int) -> dict[str, Any]:
    """lm-eval's raw result dict for the ``ndb_`` versions of ``tasks``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with preserved_rng(), _left_as_found(lm.model), _quiet_lm_eval():
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        return lm_eval.simple_evaluate(
            model=model, tasks=[PREFIX + t for t in tasks], task_manager=manager, limit=limit,
            use_cache=None, cache_requests=False, log_samples=False, bootstrap_iters=bootstrap_iters,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )


def _documents(raw: dict[str, Any], name: str) -> int:
    """Documents evaluated for a task, or summed over a group's tasks."""
    if name in raw["n-samples"]:
        return int(raw["n-samples"][name]["effective"])
    return sum(_documents(raw, sub) for sub in raw.get("group_subtasks", {}).get(name, []))


def _scores(raw: dict[str, Any], name: str) -> Scores:
    """``{"acc": .., "acc_stderr": .., "n": ..}`` from lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}``."""
    out: Scores = {}
    for key, value in raw["results"][name].items():
        metric, sep, _filter = key.partition(",")
        if sep:
            out[metric] = None if value in ("N/A", None) else float(value)
    out["n"] = _documents(raw, name)
    return out


def run_general(lm: LoadedModel, tasks: list[str], limit: int | None, batch_size: int = 16, seed: int = 0,
                bootstrap_iters: int = 1000) -> dict[str, Scores]:
    """Evaluate ``lm`` on ``tasks`` (names from :func:`resolve`) with lm-eval, zero-shot.

    Args:
        limit: first ``limit`` documents of each task (of each MMLU subject); ``None`` for all.
        batch_size: HFLM's batch size (``simple_evaluate`` ignores its own for a model object).
        seed: lm-eval's python / numpy / torch / few-shot seeds for this run.
        bootstrap_iters: resamples for the bootstrapped standard errors (mcc, f1, perplexity); lm-eval's
            default of 100,000 takes minutes for a stderr, 0 skips them.

    Returns:
        ``{task: {metric: value, metric_stderr: value, "n": documents}}`` in the order of ``tasks``; ``mmlu``
        is the question-weighted (micro) average over the 57 subjects; a task whose data file is absent
        maps to ``{"n": 0, "unavailable": reason}``.
    """
    runnable, missing = available(tasks)
    for task, reason in missing.items():
        logging.getLogger(__name__).warning("general: skipping %s: %s", task, reason)
    raw = _evaluate(lm, runnable, limit, batch_size, seed, bootstrap_iters) if runnable else None
    out: dict[str, Scores] = {}
    for task in tasks:
        out[task] = {"n": 0, "unavailable": missing[task]} if task in missing else _scores(raw, PREFIX + task)
    return out


# ---------------------------------------------------------------- presentation


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _cell(scores: Scores | None, metric: str) -> str:
    if scores is None or "unavailable" in scores:
        return "unavailable"
    value, stderr = scores.get(metric), scores.get(f"{metric}_stderr")
    if value is None or math.isnan(value):
        return "n/a"
    return _number(value) + (f" ± {_number(stderr)}" if stderr is not None and not math.isnan(stderr) else "")


def _metrics(runs: list[dict[str, Scores]], task: str) -> list[str]:
    names = [m for run in runs for m in run.get(task, {}) if m not in ("n", "unavailable")]
    return [m for m in dict.fromkeys(names) if not m.endswith("_stderr")] or ["-"]


def _delta(before: Scores | None, after: Scores | None, metric: str) -> str:
    a, b = (before or {}).get(metric), (after or {}).get(metric)
    if not isinstance(a, float) or not isinstance(b, float):
        return ""
    d = b - a
    better = d < 0 if metric in LOWER_IS_BETTER else d > 0
    colour = "green" if better else "red" if d else "white"
    return f"[{colour}]{'+' if d >= 0 else '-'}{_number(abs(d))}[/{colour}]"


def results_table(runs: dict[str, dict[str, Scores]], title: str = "General abilities (lm-eval)") -> Table:
    """One row per task and metric, one column per run (e.g. ``{"pre-edit": .., "post-edit": ..}``); with
    exactly two runs a Δ column (second − first) is added, green where the second is better."""
    labels, results = list(runs), list(runs.values())
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(results) == 2:
        table.add_column("Δ", justify="right")
    table.add_column("n", justify="right")
    tasks = list(dict.fromkeys(t for run in results for t in run))
    for task in tasks:
        for i, metric in enumerate(_metrics(results, task)):
            row = [task if i == 0 else "", metric] + [_cell(run.get(task), metric) for run in results]
            if len(results) == 2:
                row.append(_delta(results[0].get(task), results[1].get(task), metric))
            row.append(str(max(run.get(task, {}).get("n", 0) for run in results)))
            table.add_row(*row)
    return table
