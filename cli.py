"""The ``neuraldb`` command line: edit facts into a model, ask it, manage stores."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
facts_app = typer.Typer(no_args_is_help=True, help="List, add or remove the facts of a store.")
app.add_typer(facts_app, name="facts")
console = Console()
err = Console(stderr=True)


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known user errors become one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from neuraldb.arch import UnsupportedModelError
        from neuraldb.facts import FactFileError
        from neuraldb.models import ModelNotAvailableError
        from neuraldb.store import StoreError

        try:
            return fn(*args, **kwargs)
        except (FactFileError, StoreError, ModelNotAvailableError, UnsupportedModelError, ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def _load_model(name: str, device: str, dtype: str):
    _quiet_transformers()
    from neuraldb import models

    with err.status(f"loading {name} …"):
        return models.load(name, device=device, dtype=dtype)


def _write_json(path: Path, obj: Any) -> None:
    from neuraldb.models import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _edit_with_progress(editor: Any, requests: list, **kw: Any) -> None:
    with _progress() as bar:
        task = bar.add_task(f"{editor.name}: writing facts", total=len(requests))
        editor.edit(requests, progress=lambda n: bar.advance(task, n), **kw)


def _hparams(editor_cls: Any, lm: Any, **overrides: Any) -> Any:
    return editor_cls.default_hparams(lm).replace(**overrides)


@app.command()
@fails_cleanly
def edit(
    facts: Path = typer.Argument(..., help="JSONL / JSON / CSV fact file (plain, CounterFact, MEND or ZsRE records)."),
    out: Path = typer.Option(..., "--out", "-o", help="Store folder to write."),
    model: str = typer.Option("smollm2-135m", help="Model name, local folder or .gguf file."),
    editor: str = typer.Option("neuraldb", help="Editing method."),
    limit: int | None = typer.Option(None, help="Use only the first N facts of the file."),
    layer: int | None = typer.Option(None, help="Edit layer (default: the model's preset)."),
    gamma: float | None = typer.Option(None, help="Gate threshold γ (cosine)."),
    batch_size: int | None = typer.Option(None, help="Facts optimised together."),
    steps: int | None = typer.Option(None, help="Optimisation steps per fact."),
    lr: float | None = typer.Option(None, help="Learning rate of the residual optimisation."),
    seed: int | None = typer.Option(None, help="Seed of the context templates."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (accelerate device_map)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (CUDA)."),
    report: Path | None = typer.Option(None, help="Where to save the JSON report (default: OUT.report.json)."),
) -> None:
    """Write facts into a model and report how many were rewritten and what stayed unchanged."""
    from neuraldb.editor import get_editor
    from neuraldb.facts import load_facts
    from neuraldb.scoring import edit_report, preferences

    requests = load_facts(facts, limit=limit)
    cls = get_editor(editor)
    lm = _load_model(model, device, dtype)
    hp = _hparams(cls, lm, layer=layer, gamma=gamma, batch_size=batch_size, steps=steps, lr=lr, seed=seed)
    ed = cls(lm, hp)
    _warn_first_token_subjects(lm, requests)
    with err.status("scoring the unedited model …"):
        before = preferences(lm, requests)
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
    path = report or out.with_name(out.name + ".report.json")
    _write_json(path, {"editor": editor, "model": lm.name, "fingerprint": lm.fingerprint, "facts": str(facts),
                       "n": len(requests), "hparams": ed.hparams.to_dict(), "summary": summary})
    err.print(f"report saved to {path}")


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
    store: Path = typer.Option(..., "--store", "-s", help="NeuralDB store folder."),
    max_new_tokens: int = typer.Option(12, help="Tokens to generate."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Complete PROMPT with the base and the edited model side by side, and show which facts fired."""
    from neuraldb.neuraldb_editor import NeuralDBEditor
    from neuraldb.store import FactStore

    meta = FactStore.load(store)
    lm = _load_model(meta.model_name, device, dtype)
    ed = NeuralDBEditor.load(lm, store)
    with ed.disabled():
        _, base = _generate(lm, prompt, max_new_tokens)
    with ed.tracing() as trace:
        prompt_ids, edited = _generate(lm, prompt, max_new_tokens)
    tok = lm.tokenizer
    table = Table(title=prompt, show_lines=True)
    table.add_column("base model")
    table.add_column(f"edited ({len(ed.store)} facts)")
    table.add_row(tok.decode(base, skip_special_tokens=True), tok.decode(edited, skip_special_tokens=True))
    console.print(table)
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
def facts_list(store: Path = typer.Argument(..., help="Store folder.")) -> None:
    """Show the facts of a store."""
    from neuraldb.store import FactStore

    s = FactStore.load(store)
    table = Table(title=f"{store}: {len(s)} facts, model {s.model_name}, layer {s.layer}, γ {s.gamma}")
    for col in ("id", "prompt", "subject", "target_new", "target_true"):
        table.add_column(col)
    for f in s.facts:
        table.add_row(f.id, f.template, f.subject, f.target_new, f.target_true or "")
    console.print(table)


@facts_app.command("remove")
@fails_cleanly
def facts_remove(
    store: Path = typer.Argument(..., help="Store folder."),
    ids: list[str] = typer.Argument(..., help="Fact ids to remove."),
) -> None:
    """Remove facts by id (the store is rewritten atomically)."""
    from neuraldb.store import FactStore

    s = FactStore.load(store)
    s.remove(ids)
    s.save(store)
    console.print(f"removed {len(ids)} fact(s); {len(s)} left in {store}")


@facts_app.command("add")
@fails_cleanly
def facts_add(
    store: Path = typer.Argument(..., help="Store folder."),
    facts: Path = typer.Argument(..., help="Fact file."),
    replace: bool = typer.Option(False, help="Replace facts whose id is already stored."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Compute and add facts to an existing store, with the store's model and hyperparameters."""
    from neuraldb.facts import load_facts
    from neuraldb.neuraldb_editor import NeuralDBEditor
    from neuraldb.store import FactStore

    requests = load_facts(facts)
    meta = FactStore.load(store)
    lm = _load_model(meta.model_name, device, dtype)
    ed = NeuralDBEditor.load(lm, store)
    _edit_with_progress(ed, requests, replace=replace)
    ed.save(store)
    console.print(f"added {len(requests)} fact(s); {len(ed.store)} in {store}")


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
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
