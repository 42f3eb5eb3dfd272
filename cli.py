"""The ``neuraldb`` command line: edit facts into a model, ask it, manage stores."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
facts_app = typer.Typer(no_args_is_help=True, help="List, add or remove the facts of a store.")
app.add_typer(facts_app, name="facts")
data_app = typer.Typer(no_args_is_help=True, help="The local data folder ($NEURALDB_DATA): list and fetch.")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)

# Options several commands share.
ModelOpt = Annotated[str, typer.Option(help="Model name, local folder or .gguf file.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (accelerate device_map).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16 (CUDA).")]


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known user errors become one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from evals.catalog import DataFetchError
        from neuraldb.arch import UnsupportedModelError
        from neuraldb.data import DataNotFoundError
        from neuraldb.facts import FactFileError
        from neuraldb.files import ArtifactError
        from neuraldb.models import ModelNotAvailableError

        known = (FactFileError, ArtifactError, ModelNotAvailableError, UnsupportedModelError, DataNotFoundError,
                 DataFetchError, ValueError, KeyError)
        try:
            return fn(*args, **kwargs)
        except known as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class LineProgress:
    """Progress for a log (stderr is not a terminal, e.g. CI or ``nohup``), where a Rich bar would
    show nothing until it ends: one plain line per task each time it passes another ``1/steps`` of
    its total; a task without a total gets one line when the progress ends. Called like
    :class:`rich.progress.Progress` (``add_task``, ``advance``, ``update``)."""

    def __init__(self, console: Console, steps: int = 10) -> None:
        self.console, self.steps = console, steps
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.tasks:
            if not t["total"] and t["completed"]:
                self._line(t, f"{_count(t['completed'])} done")

    def add_task(self, description: str, total: float | None = 100.0) -> int:
        self.tasks.append({"description": description, "total": total, "completed": 0.0, "shown": 0,
                           "start": time.monotonic()})
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(self, task: int, completed: float | None = None, total: float | None = None) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if not t["total"]:
            return
        step = min(self.steps, int(self.steps * t["completed"] / t["total"]))
        if step > t["shown"]:
            t["shown"] = step
            share = 100 * t["completed"] / t["total"]
            self._line(t, f"{_count(t['completed'])}/{_count(t['total'])} ({share:.0f} %)")

    def _line(self, t: dict[str, Any], what: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - t["start"]), 60)
        self.console.print(f"{t['description']}: {what} {minutes}:{seconds:02d} elapsed", highlight=False,
                           soft_wrap=True)


def _count(x: float) -> str:
    """A count as Rich's M/N column shows it: whole numbers without an exponent."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _progress() -> Progress | LineProgress:
    """A Rich bar on a terminal; plain lines at every tenth in a log."""
    if not err.is_terminal:
        return LineProgress(err)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def _load_model(name: str, device: str, dtype: str):
    _quiet_transformers()
    from neuraldb import models

    with err.status(f"loading {name} …"):
        return models.load(name, device=device, dtype=dtype)


def _edit_with_progress(editor: Any, requests: list, **kw: Any) -> None:
    with _progress() as bar:
        task = bar.add_task(f"{editor.name}: writing facts", total=len(requests))
        editor.edit(requests, progress=lambda n: bar.advance(task, n), **kw)


def _hparams(editor_cls: Any, lm: Any, assignments: list[str], **options: Any) -> Any:
    """The editor's defaults for ``lm``, then ``--hparam KEY=VALUE``, then the named options given."""
    hp = editor_cls.default_hparams(lm).parse(assignments)
    fields = hp.to_dict()
    for name, value in options.items():
        if value is not None and name not in fields:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to {editor_cls.name} (its hyperparameters: {', '.join(fields)})")
    return hp.replace(**options)


def _layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--layers must be comma-separated layer numbers, got {text!r}") from None


def _prepare(editor: Any) -> None:
    """Run the editor's preparation (e.g. statistics) with a progress bar when it has long work."""
    with _progress() as bar:
        task: list[Any] = []
        editor.prepare(progress=lambda n: bar.advance(task[0], n),
                       start=lambda total: task.append(bar.add_task(editor.prepare_label, total=total)))


@app.command()
@fails_cleanly
def edit(
    facts: Path = typer.Argument(..., help="JSONL / JSON / CSV fact file (plain, CounterFact, MEND or ZsRE records)."),
    out: Path = typer.Option(..., "--out", "-o", help="Store folder to write."),
    model: ModelOpt = "smollm2-135m",
    editor: str = typer.Option("neuraldb", help="Editing method."),
    limit: int | None = typer.Option(None, help="Use only the first N facts of the file."),
    layer: int | None = typer.Option(None, help="NeuralDB's edit layer (default: the model's preset)."),
    layers: str | None = typer.Option(None, help="MEMIT / AlphaEdit edit layers, e.g. 3,4,5,6,7."),
    gamma: float | None = typer.Option(None, help="NeuralDB's gate threshold γ (a cosine, in (-1, 1))."),
    batch_size: int | None = typer.Option(None, help="NeuralDB: facts optimised together; MEMIT / AlphaEdit: "
                                                     "facts per sequential batch (default 100)."),
    steps: int | None = typer.Option(None, help="Optimisation steps per fact."),
    lr: float | None = typer.Option(None, help="Learning rate of the residual optimisation."),
    seed: int | None = typer.Option(None, help="Seed of the context templates."),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    report: Path | None = typer.Option(None, help="Where to save the JSON report (default: OUT.report.json)."),
    hparam: list[str] = typer.Option([], "--hparam", "-H", metavar="KEY=VALUE",
                                      help="Any hyperparameter as KEY=VALUE (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the store or edit artifact already at OUT."),
) -> None:
    """Write facts into a model and report how many were rewritten and what stayed unchanged.

    OUT is a NeuralDB fact store or, for MEMIT / AlphaEdit, a reversible weight-edit artifact;
    `neuraldb ask --edits OUT` uses either."""
    from neuraldb.editor import get_editor
    from neuraldb.facts import load_facts
    from neuraldb.files import check_out, check_writable, write_json
    from neuraldb.scoring import edit_report, preferences

    cls = get_editor(editor)
    requests = load_facts(facts, limit=limit)
    check_out(out, overwrite)
    report_path = report or out.with_name(out.name + ".report.json")
    if report_path.is_dir():
        raise ValueError(f"--report {report_path} is a folder; give a file name")
    if report_path.exists() and not overwrite:
        raise ValueError(f"--report {report_path} already exists: pass --overwrite to replace it")
    check_writable(report_path)
    lm = _load_model(model, device, dtype)
    hp = _hparams(cls, lm, hparam, layer=layer, layers=_layers(layers), gamma=gamma, batch_size=batch_size,
                  steps=steps, lr=lr, seed=seed)
    ed = cls(lm, hp)
    if editor == "neuraldb" and hp.key != "tokens":  # type: ignore[attr-defined]  # token keys read an opening token
        _warn_first_token_subjects(lm, requests)
    with err.status("scoring the unedited model …"):
        before = preferences(lm, requests)
    _prepare(ed)
    _edit_with_progress(ed, requests)
    with err.status("scoring the edited model …"):
        after = preferences(lm, requests)
    ed.save(out)
    summary = edit_report(before, after)
    table = Table(title=f"{editor} on {model}: {len(requests)} facts → {out}")
    table.add_column("metric")
    table.add_column("pre-edit", justify="right")
    table.add_column("post-edit", justify="right")
    table.add_row("rewritten (P(new) > P(true))", f"{summary['efficacy_pre']:.1f}%" if summary["n_edits"] else "-",
                  f"{summary['rewritten']}/{summary['n_edits']} ({summary['efficacy']:.1f}%)"
                  if summary["n_edits"] else "-")
    if summary["locality_prompts"]:
        table.add_row("locality: prefers own answer", f"{summary['locality_true_pre']:.1f}%",
                      f"{summary['locality_true_post']:.1f}%")
        table.add_row("locality: pre-edit preference kept", "", f"{summary['locality_kept']:.1f}%")
    console.print(table)
    write_json(report_path, {"editor": editor, "model": lm.name, "fingerprint": lm.fingerprint, "facts": str(facts),
                              "n": len(requests), "hparams": ed.hparams.to_dict(), "summary": summary})
    err.print(f"report saved to {report_path}")


def _warn_first_token_subjects(lm: Any, requests: list) -> None:
    from neuraldb.targets import starts_with_subject

    first = [r.id for r in requests if starts_with_subject(lm, r)]
    if first:
        err.print(f"[yellow]warning:[/] {len(first)} fact(s) ({', '.join(first[:5])}{' …' if len(first) > 5 else ''}) "
                  "have a one-token subject at the very start of the prompt; a prompt that starts with it gives the "
                  "gate no context to recognise it (prefix such prompts, e.g. 'Q: …')", highlight=False)


def _generate(lm: Any, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    import torch

    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@app.command()
@fails_cleanly
def ask(
    prompt: str = typer.Argument(..., help="Prompt to complete."),
    edits: Path = typer.Option(..., "--edits", "--store", "-s",
                               help="Edit artifact: a NeuralDB store or MEMIT / AlphaEdit weight edits."),
    max_new_tokens: int = typer.Option(12, help="Tokens to generate."),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Complete PROMPT with the base and the edited model side by side (and, for NeuralDB, show
    which facts fired)."""
    from neuraldb.editor import identify

    if not prompt.strip():
        raise ValueError("the prompt is empty: give the text to complete")
    cls, model_name = identify(edits)
    lm = _load_model(model_name, device, dtype)
    _, base = _generate(lm, prompt, max_new_tokens)  # before the edits are loaded: the base model
    ed = cls.load(lm, edits)
    tracing = getattr(ed, "tracing", None)
    trace: list = []
    if tracing is not None:
        with tracing() as trace:
            prompt_ids, edited = _generate(lm, prompt, max_new_tokens)
    else:
        prompt_ids, edited = _generate(lm, prompt, max_new_tokens)
    tok = lm.tokenizer
    table = Table(title=prompt, show_lines=True)
    table.add_column("base model")
    table.add_column(f"edited ({cls.name}, {_count_facts(ed)} facts)")
    table.add_row(tok.decode(base, skip_special_tokens=True), tok.decode(edited, skip_special_tokens=True))
    console.print(table)
    if tracing is None:
        layers = ", ".join(str(x) for x in ed.hparams.layers)
        console.print(f"{cls.name} folds its edits into the weights of layers {layers}: no per-fact attribution")
        return
    fired = _fired(trace, prompt_ids + edited, ed, tok)
    if fired:
        ft = Table(title="facts that fired")
        for col in ("token", "position", "fact", "cosine", "new target"):
            ft.add_column(col)
        for row in fired:
            ft.add_row(*row)
        console.print(ft)
    else:
        console.print("no stored fact fired (the output is the base model's)")


def _count_facts(ed: Any) -> int:
    return len(ed.store) if hasattr(ed, "store") else len(ed.facts)


def _fired(trace: list, ids: list[int], ed: Any, tok: Any) -> list[tuple[str, ...]]:
    """(token, position, fact id, cosine, target) for every gated token, in order."""
    import torch

    index = torch.cat([f.index[0] for f in trace])
    cosine = torch.cat([f.cosine[0] for f in trace])
    fired = torch.cat([f.fired[0] for f in trace])
    rows = []
    for pos in fired.nonzero().squeeze(1).tolist():
        fact = ed.store.facts[int(index[pos])]
        rows.append((repr(tok.decode([ids[pos]])), str(pos), fact.id, f"{float(cosine[pos]):.3f}", fact.target_new))
    return rows


@facts_app.command("list")
@fails_cleanly
def facts_list(store: Path = typer.Argument(..., help="NeuralDB store or weight-edit artifact.")) -> None:
    """Show the facts of a store (or of MEMIT / AlphaEdit weight edits)."""
    from neuraldb.editor import identify
    from neuraldb.files import read_artifact
    from neuraldb.store import FactStore

    cls, _ = identify(store)
    if cls.name == "neuraldb":
        s = FactStore.load(store)
        title = f"{store}: {len(s)} facts, model {s.model_name}, layer {s.layer}, γ {s.gamma}"
        facts = s.facts
    else:
        from baselines.closed_form import FORMAT, META
        from neuraldb import schema

        meta, _ = read_artifact(store, META, FORMAT)  # the tensor file's sha256 is checked too
        facts = schema.edits(meta, str(store))
        layers = ", ".join(str(x) for x in meta["hparams"]["layers"])
        title = f"{store}: {len(facts)} facts, {cls.name} on {meta['model']['name']}, layers {layers}"
    table = Table(title=title)
    for col in ("id", "prompt", "subject", "target_new", "target_true"):
        table.add_column(col)
    for f in facts:
        table.add_row(f.id, f.template, f.subject, f.target_new, f.target_true or "")
    console.print(table)


def _neuraldb_store(path: Path) -> None:
    """Refuse weight-edit artifacts where a NeuralDB store is needed, saying why."""
    from neuraldb.editor import identify

    cls, _ = identify(path)
    if cls.name != "neuraldb":
        raise ValueError(f"{path} holds {cls.name} weight edits: they are folded into the weights, so facts cannot "
                         "be added or removed one by one (edit again from the base model)")


@facts_app.command("remove")
@fails_cleanly
def facts_remove(
    store: Path = typer.Argument(..., help="Store folder."),
    ids: list[str] = typer.Argument(..., help="Fact ids to remove."),
) -> None:
    """Remove facts by id (the store is rewritten atomically)."""
    from neuraldb.files import locked
    from neuraldb.store import FactStore

    _neuraldb_store(store)
    with locked(store):  # read, change, write: another writer waits
        s = FactStore.load(store)
        before = len(s)
        s.remove(list(dict.fromkeys(ids)))  # an id named twice is removed once
        s.save(store)
    console.print(f"removed {before - len(s)} fact(s); {len(s)} left in {store}")


@facts_app.command("add")
@fails_cleanly
def facts_add(
    store: Path = typer.Argument(..., help="Store folder."),
    facts: Path = typer.Argument(..., help="Fact file."),
    replace: bool = typer.Option(False, help="Replace facts whose id is already stored."),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Compute and add facts to an existing store, with the store's model and hyperparameters."""
    from neuraldb.facts import load_facts
    from neuraldb.files import locked
    from neuraldb.neuraldb_editor import NeuralDBEditor
    from neuraldb.store import FactStore

    _neuraldb_store(store)
    requests = load_facts(facts)
    meta = FactStore.load(store)
    lm = _load_model(meta.model_name, device, dtype)
    with locked(store):  # read, change, write: a second `facts add` waits and adds on top
        ed = NeuralDBEditor.load(lm, store)
        _edit_with_progress(ed, requests, replace=replace)
        ed.save(store)
    console.print(f"added {len(requests)} fact(s); {len(ed.store)} in {store}")


@app.command()
@fails_cleanly
def stats(
    model: ModelOpt = "smollm2-135m",
    layers: str = typer.Option(..., help="Layers, e.g. 3,4,5,6,7 (all computed in one pass)."),
    corpus: str = typer.Option("wikitext", help="Local corpus under $NEURALDB_DATA: wikitext or lambada."),
    tokens: int = typer.Option(300_000, help="Tokens the statistics cover."),
    max_length: int = typer.Option(256, help="Tokens per window."),
    dtype: str = typer.Option("float32", "--stats-dtype", help="Accumulation dtype: float32 or float64."),
    device: DeviceOpt = "cpu",
) -> None:
    """Compute (or find cached) the second moments E[k kᵀ] MEMIT and AlphaEdit need."""
    from baselines.covariance import StatsConfig, corpus_windows, second_moments, stats_path, windows_sha

    lm = _load_model(model, device, "float32")
    cfg = StatsConfig(corpus=corpus, n_tokens=tokens, max_length=max_length, dtype=dtype)
    wanted = list(_layers(layers) or ())
    with _progress() as bar:
        task: list[Any] = []
        got = second_moments(lm, wanted, cfg, progress=lambda n: bar.advance(task[0], n),
                             start=lambda total: task.append(bar.add_task("statistics (tokens)", total=total)))
    table = Table(title=f"second moments of {model}: {got.forward_passes} forward passes for {len(got.computed)} "
                        f"layer(s) computed")
    for col in ("layer", "source", "trace", "cache folder"):
        table.add_column(col)
    sha = windows_sha(corpus_windows(lm, cfg))
    for layer in sorted(got.mom2):
        c = got.mom2[layer]
        table.add_row(str(layer), "computed" if layer in got.computed else "cache", f"{float(c.trace()):.4g}",
                      str(stats_path(lm, layer, cfg, sha)))
    console.print(table)


def _ns(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--n must be comma-separated numbers of edits, got {text!r}") from None


def _run_comparison(editors: list[str], *, model: str, dataset: str, n: str, batch_size: int, sequential: bool,
                    sample_seed: int | None, generation_every: int, seed: int, keep_edited_probes: bool,
                    hparam: list[str], out: Path | None,
                    resume: bool, rows_from: list[Path], check: Path | None, tolerance: float, device: str, dtype: str,
                    general: str | None, limit: int | None, mquake_set: str | None, mquake_n: int,
                    mquake_group: int) -> None:
    """Shared body of ``eval`` and ``compare``; ``mquake_set``: MQuAKE after the main benchmark, same editors,
    saved inside the main result (``"mquake"``) and its report."""
    from evals import datasets, mquake, report, runner
    from evals.evaluate import EvalOptions
    from evals.protocol import Protocol
    from neuraldb.editor import get_editor
    from neuraldb.files import check_writable, write_json, write_text

    for name in editors:
        get_editor(name)
    protocol = Protocol(dataset, _ns(n), batch_size, sequential, sample_seed)
    protocol.validate()
    opts = EvalOptions(generation_every=generation_every, seed=seed, keep_edited_probes=keep_edited_probes)
    opts.validate()
    if check is not None and not check.is_file():
        raise ValueError(f"--check {check}: no such file")
    if absent := [str(p) for p in rows_from if not p.is_file()]:
        raise ValueError(f"--rows-from {', '.join(absent)}: no such file")
    baseline = runner.read_result(check, "--check") if check else None
    is_mquake = dataset in mquake.SOURCES
    checks = None
    if general is not None:
        from evals.general import resolve

        checks = runner.General(tuple(resolve(general)), limit)
        if is_mquake:
            raise ValueError("--general runs with the CounterFact / ZsRE protocols, not with MQuAKE's restored groups")
    if mquake_set is not None:
        if is_mquake:
            raise ValueError("--mquake adds MQuAKE to a CounterFact / ZsRE run; for MQuAKE alone use --dataset")
        if mquake_set not in mquake.SOURCES:
            raise ValueError(f"--mquake: unknown MQuAKE set {mquake_set!r}; available: {', '.join(mquake.SOURCES)}")
        rel, _, found = mquake.load(mquake_set)
        if mquake_n > len(found):
            raise ValueError(f"--mquake-n {mquake_n}: {mquake_set} has {len(found)} instances")
        if note := mquake.stand_in(mquake_set, rel):
            err.print(f"[yellow]note[/]: {note}", highlight=False)
    if is_mquake:
        if len(protocol.n) != 1:
            raise ValueError("MQuAKE takes one --n (instances); groups of --batch-size instances are edited together")
        rel, _, _ = mquake.load(dataset)
        if note := mquake.stand_in(dataset, rel):
            err.print(f"[yellow]note[/]: {note}", highlight=False)
    else:
        if dataset not in datasets.SPECS:
            raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join([*datasets.SPECS, *mquake.SOURCES])}")
        ds = datasets.load(dataset)
        datasets.select(ds.records, protocol.n[-1], sample_seed)  # fail early when too few records
    if out is not None:  # checked before the model loads, not after the run
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name")
        check_writable(out)
    lm = _load_model(model, device, dtype)
    chosen = runner.editor_hparams(lm, editors, hparam, batch_size)
    out = out or Path("results") / f"{dataset}-{lm.name.replace('/', '_')}-{'-'.join(editors)}-n{protocol.n[-1]}.json"
    with _progress() as bar:
        bars: dict[str, Any] = {}

        def announcer(count: int, unit: str, name: str, then: str = "",
                      edits: int | None = None) -> Callable[[str], None]:
            def started(what: str) -> None:
                bars.clear()
                doing = "scoring" if what == "unedited model" else "editing and scoring"
                err.print(f"[bold]{what}[/]: {doing} {count} {unit} of {name}{then}", highlight=False)
                if edits and what != "unedited model":  # the edits' clock starts with the row
                    advance("edits", 0, edits)
            return started

        then = f", then lm-eval on {', '.join(checks.tasks)} (output held back)" if checks else ""
        started = announcer(protocol.n[-1], "instances" if is_mquake else "records", dataset, then,
                            None if is_mquake else protocol.n[-1])

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = bar.add_task(stage, total=total)
            bar.update(bars[stage], completed=done, total=total)

        if is_mquake:
            result = runner.run_mquake(lm, dataset, chosen, protocol.n[0], batch_size, out, sample_seed, resume,
                                       advance, started, rows_from)
        else:
            result = runner.run(lm, ds, chosen, protocol, opts, out, resume, advance, _prepare_quiet, started, checks,
                                rows_from)
        if mquake_set is not None:
            result["mquake"] = runner.run_mquake(
                lm, mquake_set, runner.editor_hparams(lm, editors, hparam, mquake_group), mquake_n, mquake_group,
                runner.mquake_path(out), sample_seed, resume, advance, announcer(mquake_n, "instances", mquake_set),
                [runner.mquake_path(p) for p in rows_from if runner.mquake_path(p).is_file()])
            write_json(out, result)
    console.print(report.rich_table(result))
    if "mquake" in result:
        console.print(report.rich_table(result["mquake"]))
    if checks is not None:
        from evals.general import results_table

        runs = {"Pre-edited": result["pre"]["general"]} | {
            report.NAMES.get(k, k): v["general"] for k, v in result["editors"].items()}
        console.print(results_table(runs, f"General abilities (lm-eval, limit {limit}) after {protocol.n[-1]} edits"))
    for part in (result, result.get("mquake")):
        for method, edit_s, eval_s in report.timings(part) if part else ():
            console.print(f"{method}: editing {edit_s:.0f} s, evaluation {eval_s:.0f} s"
                          + (" (MQuAKE)" if part is not result else ""), highlight=False)
    md = out.with_suffix(".md")
    write_text(md, report.markdown(result))
    png = out.with_suffix(".png")
    plotted = report.plot(result, png)
    err.print(f"saved {out}, {runner.cases_path(out)}, {md}" + (f", {png}" if plotted else ""))
    if baseline is not None:
        failures = report.check(result, baseline, tolerance)
        if failures:
            for f in failures:
                err.print(f"[bold red]regression:[/] {f}", highlight=False)
            raise typer.Exit(1)
        err.print(f"check passed: no metric more than {tolerance:g} points below {check}")


def _prepare_quiet(editor: Any) -> None:
    _prepare(editor)


_MQ_HELP = ("Also run MQuAKE (mquake, mquake-akew, mquake-hard) with the same editors; its table joins the "
            "result JSON and report.")

# Options `eval` and `compare` share: declared once, used by both signatures.
DatasetOpt = Annotated[str, typer.Option(help="counterfact, mcf, counterfact-mend, zsre, knowedit-cf, mquake, "
                                              "mquake-hard, … (`neuraldb data list`).")]
NOpt = Annotated[str, typer.Option("--n", "--num-edits",
                                   help="Numbers of edits to evaluate at, e.g. 1000 or 100,500,1000 (the first N "
                                        "records each). Under torchrun write --num-edits: torchrun reads --n as "
                                        "its own (ambiguous) option.")]
RunBatchOpt = Annotated[int, typer.Option(help="Facts per edit call (MEMIT / AlphaEdit: per closed-form batch).")]
SequentialOpt = Annotated[bool, typer.Option(help="Keep all edits (evaluate after the first N); --no-sequential: "
                                                  "restore after each batch (MEMIT's evaluate.py).")]
SampleSeedOpt = Annotated[int | None, typer.Option(help="Evaluate a seeded random sample instead of the first N.")]
GenerationEveryOpt = Annotated[int, typer.Option(help="Generate for fluency on every k-th case (0: never).")]
GenSeedOpt = Annotated[int, typer.Option(help="Seed of the generation sampler.")]
KeepEditedOpt = Annotated[bool, typer.Option(help="Also count neighbourhood and locality prompts that are the edit "
                                                  "prompt of a fact edited in the run (left out by default: their "
                                                  "answer is meant to change).")]
RunHparamOpt = Annotated[list[str], typer.Option(
    "--hparam", "-H", metavar="[EDITOR:]KEY=VALUE",
    help="Hyperparameter, e.g. memit:mom2_update_weight=5000; without EDITOR: for every editor (repeatable).")]
RunOutOpt = Annotated[Path | None, typer.Option(help="Result JSON (default results/DATASET-MODEL-EDITORS-nN.json);"
                                                     " a Markdown report and, for several N, a PNG go beside it.")]
ResumeOpt = Annotated[bool, typer.Option(
    help="Reuse rows already in OUT from the same run, and continue a row cut short from its last "
         "finished edit batch (OUT.partial/).")]
RowsFromOpt = Annotated[list[Path], typer.Option(
    "--rows-from", metavar="RESULT.json",
    help="Take rows of the same run from this result file too, e.g. one editor's row computed in another "
         "process (repeatable).")]
CheckOpt = Annotated[Path | None, typer.Option(help="Baseline result JSON: exit 1 naming each metric that fell "
                                                    "more than --tolerance points below it.")]
ToleranceOpt = Annotated[float, typer.Option(help="Points a metric may fall below --check's baseline.")]
GeneralOpt = Annotated[str | None, typer.Option(help="lm-eval general-ability tasks before and after editing: "
                                                     "glue6, paper6 or TASK,TASK (cola, mmlu, lambada_openai, …).")]
LimitOpt = Annotated[int | None, typer.Option(help="--general: first N documents of each task (each MMLU subject).")]
MquakeOpt = Annotated[str | None, typer.Option("--mquake", help=_MQ_HELP)]
MquakeNOpt = Annotated[int, typer.Option(help="--mquake: instances (the first N).")]
MquakeGroupOpt = Annotated[int, typer.Option(help="--mquake: instances edited together, then restored.")]


def _run_options(
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "counterfact",
    n: NOpt = "100",
    batch_size: RunBatchOpt = 100,
    sequential: SequentialOpt = True,
    sample_seed: SampleSeedOpt = None,
    generation_every: GenerationEveryOpt = 1,
    seed: GenSeedOpt = 0,
    keep_edited_probes: KeepEditedOpt = False,
    hparam: RunHparamOpt = [],  # noqa: B006 - typer copies the default
    out: RunOutOpt = None,
    resume: ResumeOpt = False,
    rows_from: RowsFromOpt = [],  # noqa: B006 - typer copies the default
    check: CheckOpt = None,
    tolerance: ToleranceOpt = 2.0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    general: GeneralOpt = None,
    limit: LimitOpt = None,
    mquake_set: MquakeOpt = None,
    mquake_n: MquakeNOpt = 100,
    mquake_group: MquakeGroupOpt = 1,
) -> None:
    """The options ``eval`` and ``compare`` share, declared once: a signature, never called."""


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command(first, **options)`` the signature ``(first, <_run_options' parameters>)`` typer reads."""
    first = [p for p in inspect.signature(command, eval_str=True).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = inspect.signature(_run_options, eval_str=True)
    command.__signature__ = shared.replace(parameters=[*first, *shared.parameters.values()])  # type: ignore[attr-defined]
    return command


@app.command("eval")
@fails_cleanly
@_with_run_options
def eval_cmd(editor: Annotated[str, typer.Option(help="Editing method.")] = "neuraldb", **options: Any) -> None:
    """Edit N benchmark records with one editor and print pre- and post-edit metrics."""
    _run_comparison([editor], **options)


@app.command()
@fails_cleanly
@_with_run_options
def compare(editors: Annotated[str, typer.Option(help="Comma-separated editing methods.")] = "neuraldb,memit,alphaedit",
            **options: Any) -> None:
    """Run several editors on the same records in one process and print one table (paper layout)."""
    names = [e.strip() for e in editors.split(",") if e.strip()]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--editors must name distinct editors, got {editors!r}")
    _run_comparison(names, **options)


@app.command()
@fails_cleanly
def explain(
    result: Path = typer.Argument(..., help="Result JSON of `eval` / `compare` with a NeuralDB row."),
    editor: str = typer.Option("neuraldb", help="The row to explain (a NeuralDB editor's)."),
    out: Path | None = typer.Option(None, help="JSON to write (default: RESULT.explain.json)."),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default: the result's).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the result's).")] = None,
) -> None:
    """Which stored fact fired on which scored prompt of a result, and which firing made a
    neighbour worse (shared last word, same subject, own fact, other)."""
    from evals import explain as ex
    from evals.runner import cases_path
    from neuraldb.files import check_writable, write_json

    saved = _read_json(result, "result")
    cases_file = cases_path(result)
    cases = _read_json(cases_file, "per-case file") if cases_file.exists() else None
    model = saved.get("model", {}) if isinstance(saved.get("model"), dict) else {}
    if "name" not in model:
        raise ValueError(f"{result} is not an eval / compare result (no model)")
    try:
        ex.check(saved, editor)
    except ValueError as e:
        raise ValueError(f"{result}: {e}") from None
    target = out or result.with_name(result.name.removesuffix(".json") + ".explain.json")
    if target.resolve() in (result.resolve(), cases_file.resolve()):
        raise ValueError(f"--out {target} would overwrite an input of explain; choose another file")
    if target.is_dir():
        raise ValueError(f"--out {target} is a directory; give a file name")
    check_writable(target)
    device = device or str(model.get("device") or "cpu")
    dtype = dtype or str(model.get("dtype") or "float32").removeprefix("torch.")
    lm = _load_model(model["name"], device, dtype)
    if lm.fingerprint != model.get("fingerprint"):
        raise ValueError(f"{result} was run on a model with fingerprint {model.get('fingerprint')} "
                         f"({model.get('dtype')}), not on this {model['name']} ({lm.fingerprint}, {dtype})")
    with err.status("tracing the gate over every scored prompt …"):
        explained = ex.explain(lm, saved, cases, editor)
    for table in ex.tables(explained):
        console.print(table)
    write_json(target, explained)
    err.print(f"saved {target}" + ("" if cases is not None else f" (no {cases_file.name}: firing only)"))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    import json

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON {what}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON {what} (not an object)")
    return obj


@data_app.command("list")
def data_list() -> None:
    """Benchmarks and files under $NEURALDB_DATA, checked against the known sha256."""
    from evals import catalog, datasets
    from neuraldb.data import data_dir

    root = data_dir()
    table = Table(title=f"data files under {root}")
    for col in ("folder", "files", "sha256", "records", "MB"):
        table.add_column(col, justify="left" if col == "folder" else "right")
    for g in catalog.survey(root):
        status = ("[red]mismatch: " + ", ".join(g.mismatched) + "[/]") if g.mismatched else f"{g.verified} ok"
        table.add_row(g.name, f"{g.present}/{g.expected}", status, f"{g.records:,}", f"{g.bytes / 1e6:.1f}")
    console.print(table)
    bench = Table(title="benchmarks (`--dataset NAME`)")
    for col in ("name", "metrics", "records", "description"):
        bench.add_column(col)
    for name, spec in datasets.SPECS.items():
        try:
            ds = datasets.load(name, root)
            count = f"{len(ds.records):,}"
        except Exception:  # noqa: BLE001 — listed as missing, never fatal
            count = "[dim]missing[/]"
        bench.add_row(name, spec.kind, count, spec.description)
    console.print(bench)
    console.print(f"fetchable when online (`neuraldb data fetch NAME`): {', '.join(sorted(catalog.REMOTES))}")


@data_app.command("fetch")
@fails_cleanly
def data_fetch(name: str = typer.Argument(..., help="counterfact, mcf, zsre, consistency or mquake.")) -> None:
    """Download canonical files into $NEURALDB_DATA and check their sha256."""
    from evals import catalog

    with _progress() as bar:
        tasks: dict[str, Any] = {}

        def progress(path: str, got: int, total: int | None) -> None:
            if path not in tasks:
                tasks[path] = bar.add_task(path, total=total)
            bar.update(tasks[path], completed=got)

        got = catalog.fetch(name, progress=progress)
    for remote, digest, verified in got:
        note = "sha256 verified" if verified else f"sha256 {digest} (no published checksum to verify against)"
        console.print(f"{remote.path}: {note}", highlight=False)


@app.command("models")
def models_cmd() -> None:
    """Known model names, whether they are installed, and how to install them."""
    from neuraldb.models import describe_models

    table = Table(title="models (any local HF folder or .gguf file works too)")
    for col in ("name", "description", "installed", "converted", "install"):
        table.add_column(col)
    for row in describe_models():
        table.add_row(*row.values())
    console.print(table)


def main() -> None:  # pragma: no cover
    """The console script. Under ``torchrun`` every rank runs the command; rank 0 alone prints and
    writes (``neuraldb.distributed``)."""
    from neuraldb import distributed

    if not distributed.is_main():
        console.quiet = err.quiet = True
    try:
        app()
    finally:
        distributed.finish()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
