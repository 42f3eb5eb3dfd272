"""Second moments C = E[k kᵀ] of the FFN output projections' inputs (MEMIT's ``layer_stats``).

One pass over a local text corpus serves every requested layer: each batch runs one forward
pass, stopped after the highest layer, with a capture on every layer's projection input. Sums
are accumulated in the configured dtype over all non-padding tokens, checkpointed every few
batches (an interrupted run resumes where it stopped), and each layer's result is cached under
a key made of the model fingerprint, the module, the corpus name, the sha256 of the token windows
(which covers the files, the tokenizer and the windowing), the token count, the window length and
the dtype: any mismatch is recomputed, never reused.

The reference computes C over 100,000 Wikipedia articles (tens of millions of tokens); the
files available offline here are WikiText-2 (~1.3 M tokens) and LAMBADA, so the token count is
a parameter and is recorded with the result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neuraldb.data import data_file
from neuraldb.files import ArtifactError, read_artifact, write_artifact
from neuraldb.hooks import capture, stop_after
from neuraldb.models import LoadedModel, cache_dir, dumps

FORMAT = "neuraldb-stats/1"
META = "stats.json"


@dataclass(frozen=True)
class Corpus:
    """Files under ``$NEURALDB_DATA``; ``.jsonl`` records are joined from ``fields``."""

    files: tuple[str, ...]
    fields: tuple[str, ...] = ()


CORPORA: dict[str, Corpus] = {
    "wikitext": Corpus(("wikitext/wikitext-2-raw-train-partial/wikitext2_train_5k.txt",
                        "wikitext/wikitext-2/valid.txt", "wikitext/wikitext-2/test.txt")),
    "lambada": Corpus(("lambada/lambada_openai.jsonl",), fields=("context", "continuation")),
}

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class StatsConfig:
    """What the statistics are computed over.

    ``n_tokens`` tokens (BOS included) of ``corpus``, cut into windows of ``max_length`` tokens,
    ``batch_tokens`` tokens per forward pass, sums accumulated in ``dtype``; a checkpoint every
    ``checkpoint_every`` batches.
    """

    corpus: str = "wikitext"
    n_tokens: int = 300_000
    max_length: int = 256
    dtype: str = "float32"
    batch_tokens: int = 4096
    checkpoint_every: int = 16

    def validate(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; available: {', '.join(sorted(CORPORA))}")
        if self.dtype not in DTYPES:
            raise ValueError(f"stats dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.n_tokens < 1 or self.max_length < 2 or self.batch_tokens < self.max_length:
            raise ValueError("need n_tokens ≥ 1, max_length ≥ 2 and batch_tokens ≥ max_length")


@dataclass
class Moments:
    """``mom2[l]``: ``[d_ff, d_ff]`` E[k kᵀ] at layer l (CPU, the configured dtype); ``computed``:
    the layers this call computed (the others came from the cache); ``forward_passes``: forward
    passes run by this call (one per batch, whatever the number of layers); ``tokens``: tokens
    the statistics cover."""

    mom2: dict[int, torch.Tensor]
    computed: list[int]
    forward_passes: int
    tokens: int


Progress = Callable[[int], None]  # called with the number of tokens just processed


def second_moments(lm: LoadedModel, layers: list[int], cfg: StatsConfig = StatsConfig(),
                   progress: Progress | None = None, start: Progress | None = None) -> Moments:
    """E[k kᵀ] at ``layers``: cached layers are loaded, the others computed together in one pass.

    ``start(total_tokens)`` is called once before a pass begins (for a progress bar).
    """
    cfg.validate()
    for layer in layers:
        lm.arch.check_layer(layer)
    windows = corpus_windows(lm, cfg)
    corpus_sha = windows_sha(windows)
    mom2: dict[int, torch.Tensor] = {}
    missing = []
    tokens = sum(len(w) for w in windows)
    for layer in sorted(set(layers)):
        cached = _load(lm, layer, cfg, corpus_sha)
        if cached is None:
            missing.append(layer)
        else:
            mom2[layer] = cached
    if not missing:
        return Moments(mom2, [], 0, tokens)
    if start:
        start(sum(len(w) for w in windows))
    sums, count, passes = _accumulate(lm, missing, windows, cfg, corpus_sha, progress)
    for layer in missing:
        mom2[layer] = (sums[layer] / count).cpu()
        _save(lm, layer, cfg, corpus_sha, mom2[layer], count)
    shutil.rmtree(_partial_dir(lm, missing, cfg, corpus_sha), ignore_errors=True)
    return Moments(mom2, missing, passes, count)


# ----------------------------------------------------------------------------------------------
# corpus


def windows_sha(windows: list[list[int]]) -> str:
    """sha256 of the token windows: covers the corpus files, the tokenizer and how windows are cut."""
    h = hashlib.sha256()
    for w in windows:
        h.update(torch.tensor(w, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def _texts(corpus: Corpus) -> list[str]:
    texts = []
    for rel in corpus.files:
        path = data_file(rel)
        if corpus.fields:
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                texts.append(" ".join(str(record[f]) for f in corpus.fields))
        else:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            texts.extend("".join(lines[i : i + 200]) for i in range(0, len(lines), 200))
    return texts


def corpus_windows(lm: LoadedModel, cfg: StatsConfig) -> list[list[int]]:
    """Token windows covering ``cfg.n_tokens`` tokens of the corpus (one BOS fewer at most), in file order.

    The corpus is tokenised as one stream (no special tokens) and cut into windows of
    ``max_length`` tokens; each window starts with BOS when the tokenizer adds one to its inputs.
    """
    tok = lm.tokenizer
    bos = tok("a", add_special_tokens=True)["input_ids"][:1]
    bos = bos if bos and bos[0] == tok.bos_token_id else []
    stream: list[int] = []
    texts = _texts(CORPORA[cfg.corpus])
    for i in range(0, len(texts), 64):  # tokenise only as much as the windows need
        for ids in tok(texts[i : i + 64], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
        if len(stream) >= cfg.n_tokens:
            break
    body = cfg.max_length - len(bos)
    windows: list[list[int]] = []
    pos, total = 0, 0
    while total < cfg.n_tokens:
        take = min(body, cfg.n_tokens - total - len(bos))
        if take <= 0:
            break
        if pos + take > len(stream):
            raise ValueError(f"corpus {cfg.corpus!r} has only {total + len(stream) - pos} tokens for this "
                             f"tokenizer; asked for {cfg.n_tokens}")
        windows.append(bos + stream[pos : pos + take])
        pos += take
        total += take + len(bos)
    return windows


# ----------------------------------------------------------------------------------------------
# the pass


def _accumulate(lm: LoadedModel, layers: list[int], windows: list[list[int]], cfg: StatsConfig, corpus_sha: str,
                progress: Progress | None) -> tuple[dict[int, torch.Tensor], int, int]:
    """Σ k kᵀ per layer and the token count, resuming from a checkpoint when one matches."""
    arch, dev, acc = lm.arch, lm.device, DTYPES[cfg.dtype]
    rows = max(1, cfg.batch_tokens // cfg.max_length)
    batches = [windows[i : i + rows] for i in range(0, len(windows), rows)]
    partial = _partial_dir(lm, layers, cfg, corpus_sha)
    sums, count, done = _resume(partial, layers, arch.d_ff, acc)
    sums = {k: v.to(dev) for k, v in sums.items()}
    if progress and done:
        progress(sum(len(w) for b in batches[:done] for w in b))
    probes = {str(layer): arch.w_out_path(layer) for layer in layers}
    passes = 0
    for b in range(done, len(batches)):
        ids, mask = _pad(batches[b], lm.tokenizer.pad_token_id)
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.no_grad(), capture(lm.model, inputs=probes) as got:
            with stop_after(lm.model, arch.layer_path(max(layers))):
                lm.backbone(input_ids=ids, attention_mask=mask)
        passes += 1
        real = mask.bool()
        for layer in layers:
            act = got[str(layer)]  # [rows, T, d_ff], on this layer's device (accelerate may shard)
            k = act[real.to(act.device)].to(acc)  # [tokens, d_ff]
            sums[layer] = sums[layer].to(act.device)
            sums[layer].addmm_(k.T, k)
        count += int(real.sum())
        if progress:
            progress(int(real.sum()))
        if (b + 1) % cfg.checkpoint_every == 0 and b + 1 < len(batches):
            write_artifact(partial, META, {"format": FORMAT + "-partial", "batches": b + 1, "count": count},
                           {str(layer): s for layer, s in sums.items()})
    return sums, count, passes


def _pad(windows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, T]`` right-padded ids and attention mask."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, : len(w)] = 1
    return ids, mask


def _resume(partial: Path, layers: list[int], d_ff: int, acc: torch.dtype) -> tuple[dict[int, torch.Tensor], int, int]:
    """(sums, token count, batches done) from a checkpoint, or zeros."""
    fresh = ({layer: torch.zeros(d_ff, d_ff, dtype=acc) for layer in layers}, 0, 0)
    try:
        meta, t = read_artifact(partial, META, FORMAT + "-partial")
    except ArtifactError:
        return fresh
    if any(str(layer) not in t or t[str(layer)].shape != (d_ff, d_ff) for layer in layers):
        return fresh
    return {layer: t[str(layer)].to(acc) for layer in layers}, int(meta["count"]), int(meta["batches"])


# ----------------------------------------------------------------------------------------------
# cache


def _describe(lm: LoadedModel, layer: int, cfg: StatsConfig, corpus_sha: str) -> dict[str, object]:
    """Everything the result depends on (batch_tokens and checkpointing do not change it)."""
    return {"format": FORMAT, "model": lm.name, "fingerprint": lm.fingerprint, "module": lm.arch.w_out_path(layer),
            "layer": layer, "corpus": cfg.corpus, "windows_sha256": corpus_sha, "n_tokens": cfg.n_tokens,
            "max_length": cfg.max_length, "dtype": cfg.dtype}


def _key(obj: object) -> str:
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


def _model_dir(lm: LoadedModel) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name)
    return cache_dir() / "stats" / safe


def stats_path(lm: LoadedModel, layer: int, cfg: StatsConfig, corpus_sha: str | None = None) -> Path:
    """The cache folder of one layer's statistics."""
    desc = _describe(lm, layer, cfg, corpus_sha or windows_sha(corpus_windows(lm, cfg)))
    return _model_dir(lm) / f"layer{layer}-{_key(desc)}"


def _partial_dir(lm: LoadedModel, layers: list[int], cfg: StatsConfig, corpus_sha: str) -> Path:
    desc = [_describe(lm, layer, cfg, corpus_sha) for layer in layers] + [asdict(cfg)]
    return _model_dir(lm) / f"partial-{_key(desc)}"


def _load(lm: LoadedModel, layer: int, cfg: StatsConfig, corpus_sha: str) -> torch.Tensor | None:
    path = stats_path(lm, layer, cfg, corpus_sha)
    try:
        meta, t = read_artifact(path, META, FORMAT)
    except ArtifactError:
        return None
    expected = _describe(lm, layer, cfg, corpus_sha)
    if any(meta.get(k) != v for k, v in expected.items()) or "mom2" not in t:
        return None
    return t["mom2"]


def _save(lm: LoadedModel, layer: int, cfg: StatsConfig, corpus_sha: str, mom2: torch.Tensor, count: int) -> None:
    meta = _describe(lm, layer, cfg, corpus_sha) | {"tokens": count}
    write_artifact(stats_path(lm, layer, cfg, corpus_sha), META, meta, {"mom2": mom2})
