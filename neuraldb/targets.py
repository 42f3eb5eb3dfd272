"""Target residuals: the vector δ that, added at the edit site, makes the model say the new target.

Loss per fact (MEMIT ``compute_z`` / ROME ``compute_v``, §2.1a of the methods brief):

    mean over context templates of −(1/T)·Σ_t log P(y_t | template(prompt) ⊕ y_<t)
    + kl_factor · KL(P_δ ‖ P_0) at the subject's last token of "{subject} is a"
    + weight_decay · ‖δ‖ / ‖v₀‖²,      subject to ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖

where v₀ is the value δ is added to (the FFN output for ``site="ffn"``, the block output for
``site="block"``) at the subject's last token of the bare prompt. With ``keep_factor`` > 0 a term

    + keep_factor · mean over the *keep* prompts of KL(P_δ ‖ P_0) at the prompt's last token

asks the residual to leave the answers to other relations of the same subject alone: the keep
prompts are :data:`KEEP_TEMPLATES` (generic relations, "{}'s mother is", …) filled with the
subject; one whose unedited answer (top-1 token) equals the edit prompt's unedited answer probably
asks the edited relation itself and is left out. Adam on δ only; a fact stops once its loss
(with the ``fast`` solvers: its NLL) is below ``early_stop_loss``; the last iteration does not step.

:func:`optimize` runs the solver ``cfg.solver`` names (:data:`SOLVERS`). The batched solvers put
many facts in one forward/backward: the layers up to the edit layer run once (their outputs and
the attention keys/values of every position before the subject's last token are cached), the KL
rows run only up to that token (the one their loss reads), and logits are computed only at the
loss positions. :func:`optimize_full_forward` is the reference protocol (one fact at a time, a
full forward with full logits at every step), which the benchmark and the tests check them against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from neuraldb import distributed
from neuraldb.editor import Hparams
from neuraldb.facts import EditRequest
from neuraldb.hooks import cache_from, capture, get_module, hooks, like, prefix_cache, start_at_layer, stop_after
from neuraldb.models import LoadedModel
from neuraldb.prompts import Encoded, aligned_batch, encode_with_subject

KL_TEMPLATE = "{} is a"

# Generic relations of a subject whose answers an edit should not change (both word orders: the
# subject's last token sees the relation only when it comes first). Written for this library, not
# taken from any benchmark. keep_factor is off by default: on CounterFact training records it costs
# generalisation (README, "Specificity").
KEEP_TEMPLATES = (
    "{} was born in the city of", "The mother of {} is", "{} is a citizen of", "The native language of {} is",
    "{} works as a", "{} is located in the country of", "The gender of {} is", "{} died in",
    "{} is a member of", "{} was founded by", "The official language of {} is", "{} plays the",
    "The capital of {} is", "The religion of {} is", "{} is owned by", "The occupation of {} is",
)

Progress = Callable[[int], None]  # called with the number of facts finished


@dataclass(frozen=True)
class Solver:
    """How the residual's loss is minimised (its terms are the same for every solver).

    ``batched``: many facts per forward, the prefix cached (:func:`optimize`), or the reference
    protocol (:func:`optimize_full_forward`); ``stop_on``: what ``early_stop_loss`` is compared
    with, the total loss (MEMIT's rule) or the target's NLL alone; ``lr_scale``: Adam's learning
    rate is ``lr_scale`` times ``lr``; ``fit_templates``: the loss reads the bare prompt and only the
    first this many context templates (the keys still average every template: the gate is the same);
    ``first_step``: the first step is not Adam's but a step of this fraction of the norm clamp along
    each fact's negative gradient (None: Adam's from the start); ``autocast``: the per-step passes
    above the edit layer run under ``torch.autocast`` with this dtype ("bfloat16", "float16"; None:
    the model's own dtype); the loss is computed in float32 either way.
    """

    batched: bool
    stop_on: Literal["loss", "nll"]
    lr_scale: float = 1.0
    fit_templates: int | None = None  # context templates the loss reads (None: all; keys always use all)
    first_step: float | None = None  # first step: this fraction of the clamp along −gradient (None: Adam's)
    autocast: str | None = None  # dtype of the per-step passes under torch.autocast (None: off)


SOLVERS: dict[str, Solver] = {
    "reference": Solver(batched=False, stop_on="loss"),  # MEMIT's compute_z, one fact at a time
    "batched": Solver(batched=True, stop_on="loss"),  # the same rule, batched (the first fast path)
    # NLL stop, 4× Adam's step, the loss on the bare prompt and two context templates (the keys still
    # average all of them): the previous default
    "fast": Solver(batched=True, stop_on="nll", lr_scale=4.0, fit_templates=2),
    # the default, chosen on training records (README, "Solvers"): ``fast`` with 8× Adam's step
    "fast8": Solver(batched=True, stop_on="nll", lr_scale=8.0, fit_templates=2),
}


@dataclass(frozen=True)
class TargetConfig:
    """Hyperparameters of the residual optimisation (names follow MEMIT's hparams)."""

    layer: int
    site: Literal["ffn", "block"] = "ffn"
    steps: int = 25  # v_num_grad_steps
    lr: float = 0.5  # v_lr
    weight_decay: float = 0.5  # v_weight_decay
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    skip_first_token_keys: bool = True  # see average_keys
    keep_factor: float = 0.0  # weight of the KL on other relations of the subject (0: off, MEMIT's loss)
    keep_templates: tuple[str, ...] = KEEP_TEMPLATES
    position: Literal["subject", "last"] = "subject"  # where δ is added: the subject's last token or the prompt's
    solver: str = "fast8"  # a key of SOLVERS

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if SOLVERS[self.solver].autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"solver {self.solver}: autocast must be bfloat16, float16 or None, "
                             f"got {SOLVERS[self.solver].autocast!r}")
        if self.position not in ("subject", "last"):
            raise ValueError(f"position must be 'subject' or 'last', got {self.position!r}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.lr <= 0 or self.clamp_norm_factor <= 0:
            raise ValueError("lr and clamp_norm_factor must be positive")
        if not 0 <= self.keep_factor < float("inf"):
            raise ValueError(f"keep_factor must be a finite number ≥ 0, got {self.keep_factor}")
        if bad := next((t for t in self.keep_templates if t.count("{}") != 1), None):
            raise ValueError(f"keep template {bad!r} must hold exactly one {{}}")

    @property
    def keep(self) -> tuple[str, ...]:
        """The keep templates in use (none when ``keep_factor`` is 0)."""
        return self.keep_templates if self.keep_factor > 0 else ()


@dataclass(frozen=True, kw_only=True)
class TargetHparams(Hparams):
    """The target-optimisation and context-template fields every locate-and-edit editor has
    (``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``;
    ``n_templates`` prefixes of ``template_length`` tokens generated with ``seed``)."""

    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    n_templates: int = 5
    template_length: int = 10
    seed: int = 0
    keep_factor: float = 0.0
    solver: str = "fast8"

    def target_config(self, layer: int, site: Literal["ffn", "block"], skip_first: bool = True) -> TargetConfig:
        return TargetConfig(layer=layer, site=site, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay,
                            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                            early_stop_loss=self.early_stop_loss, skip_first_token_keys=skip_first,
                            keep_factor=self.keep_factor, solver=self.solver)


@dataclass
class Targets:
    """Optimised residuals for F facts.

    Attributes:
        delta: ``[F, d_model]`` residual to add at the site (FFN output or block output).
        keys: ``[F, d_ff]`` FFN keys at the edit layer (input of W_out at the subject's last token),
            ½·bare prompt + ½·mean over the other context templates.
        init: ``[F, d_model]`` v₀, the site's value at the subject's last token of the bare prompt.
        loss, nll: ``[F]`` final total loss and target NLL (per token, averaged over templates).
        steps: ``[F]`` iterations each fact ran.
    """

    delta: torch.Tensor
    keys: torch.Tensor
    init: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @staticmethod
    def cat(parts: list[Targets]) -> Targets:
        return Targets(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("delta", "keys", "init", "loss", "nll", "steps")))


# ----------------------------------------------------------------------------------------------
# rows: every fact contributes one rewriting row per context template and one KL row


@dataclass
class Rows:
    """The rows of one batch of facts, and where their losses are read.

    ``encoded[r]`` holds row r's input ids (prompt + target without its last token); for a
    rewriting row, ``targets[r]`` are its target ids, predicted from positions
    ``n_prompt - 1 + t``; ``kl`` lists the KL row of every fact (in fact order); ``bare`` the
    bare-template row of every fact; ``keep`` the keep rows (other relations of the subject, KL
    at their last token), if any.
    """

    encoded: list[Encoded]
    fact: list[int]
    targets: list[tuple[int, ...]]
    kl: list[int]
    bare: list[int]
    templated: list[list[int]]
    keep: list[int] = field(default_factory=list)


def build_rows(lm: LoadedModel, requests: list[EditRequest], templates: list[str], targets: bool = True,
               keep: tuple[str, ...] = (), position: Literal["subject", "last"] = "subject") -> Rows:
    """Rows of ``requests`` under every context template (``templates[0]`` is the bare "{}"), one
    KL row per fact, and one row per ``keep`` template. ``targets=False``: prompts only, no KL rows
    (enough for keys). ``position="last"``: every row's anchor (``subject_last``, where keys are read
    and δ is added) is its prompt's last token instead of the subject's last token."""
    rows = _build_rows(lm, requests, templates, targets, keep)
    if position == "last":
        rows.encoded = [Encoded(e.ids, e.n_prompt, e.n_prompt - 1) for e in rows.encoded]
    return rows


def _build_rows(lm: LoadedModel, requests: list[EditRequest], templates: list[str], targets: bool,
                keep: tuple[str, ...]) -> Rows:
    rows = Rows([], [], [], [], [], [])
    for i, req in enumerate(requests):
        rows.templated.append([])
        for j, context in enumerate(templates):
            target = req.target_new if targets else ""
            e = encode_with_subject(lm.tokenizer, req.template, req.subject, context, target)
            if j == 0:
                rows.bare.append(len(rows.encoded))
            else:
                rows.templated[i].append(len(rows.encoded))
            rows.encoded.append(Encoded(e.ids[:-1], e.n_prompt, e.subject_last, e.subject_first) if targets else e)
            rows.fact.append(i)
            rows.targets.append(e.ids[e.n_prompt:])
        if not targets:
            continue
        rows.kl.append(len(rows.encoded))
        rows.encoded.append(encode_with_subject(lm.tokenizer, KL_TEMPLATE, req.subject))
        rows.fact.append(i)
        rows.targets.append(())
        for template in keep:
            rows.keep.append(len(rows.encoded))
            rows.encoded.append(encode_with_subject(lm.tokenizer, template, req.subject))
            rows.fact.append(i)
            rows.targets.append(())
    return rows


def average_keys(row_keys: torch.Tensor, rows: Rows, skip_first: bool = True) -> torch.Tensor:
    """``[rows, d_ff]`` → ``[facts, d_ff]``: ½·bare + ½·mean(templated), or one of the two alone.

    With ``skip_first`` (NeuralDB), a row whose subject ends on the first token (position 0) is
    left out: there the key is the attention-sink activation shared by every first token
    (cosine ≈ 0.99 between any two subjects), which would make the fact fire on the first token
    of every prompt. MEMIT / AlphaEdit average every row, as their reference does.
    """
    first = 0 if skip_first else -1
    out = []
    for bare, templated in zip(rows.bare, rows.templated):
        parts = []
        if rows.encoded[bare].subject_last > first:
            parts.append(row_keys[bare])
        usable = [r for r in templated if rows.encoded[r].subject_last > first]
        if usable:
            parts.append(row_keys[usable].mean(0))
        if not parts:
            raise ValueError("subject has no context in any prompt: cannot compute its key")
        out.append(torch.stack(parts).mean(0))
    return torch.stack(out)


def starts_with_subject(lm: LoadedModel, request: EditRequest) -> bool:
    """True when the subject is the prompt's very first token (no key can recognise it there)."""
    return encode_with_subject(lm.tokenizer, request.template, request.subject).subject_last == 0


@dataclass
class LossIndex:
    """Flat gather indices for the NLL: entry e reads ``(row[e], col[e])`` for token ``token[e]``."""

    row: torch.Tensor
    col: torch.Tensor
    token: torch.Tensor
    fact: torch.Tensor
    weight: torch.Tensor  # 1 / (target length · rewriting rows of the fact)


def loss_index(rows: Rows, offsets: torch.Tensor, first_col: int, only: set[int] | None = None) -> LossIndex:
    """The NLL entries of the rewriting rows (of those in ``only`` when given), each weighted by
    1 / (its target length · the fact's rewriting rows in use)."""
    used = [r for r in range(len(rows.fact)) if rows.targets[r] and (only is None or r in only)]
    n_rows = torch.bincount(torch.tensor([rows.fact[r] for r in used]))
    r_, c_, t_, f_, w_ = [], [], [], [], []
    for r in used:
        e, tgt = rows.encoded[r], rows.targets[r]
        for t, token in enumerate(tgt):
            r_.append(r)
            c_.append(int(offsets[r]) + e.n_prompt - 1 + t - first_col)
            t_.append(token)
            f_.append(rows.fact[r])
            w_.append(1.0 / (len(tgt) * int(n_rows[rows.fact[r]])))
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return LossIndex(long(r_), long(c_), long(t_), long(f_), torch.tensor(w_))


LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fact_losses(
    logits_at: LogitsAt, idx: LossIndex, kl: KLIndex, delta: torch.Tensor, init_norm: torch.Tensor,
    cfg: TargetConfig, kl_logits_at: LogitsAt | None = None, keep: KLIndex | None = None,
    keep_logits_at: LogitsAt | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-fact (loss, nll, KL log-probs) for logits ``[N, vocab]`` read by ``logits_at(rows, cols)``
    (the KL rows' by ``kl_logits_at``, the keep rows' by ``keep_logits_at`` when they ran in passes
    of their own). ``keep``: the keep rows, whose KL enters with their ``weight``.

    Returns ``loss [F]`` and ``nll [F]`` (facts without entries get 0 NLL / KL) and the KL rows'
    log-probabilities ``[len(kl.rows), vocab]``.
    """
    n_facts = delta.shape[0]
    logp = torch.log_softmax(logits_at(idx.row, idx.col), -1)
    token_lp = logp.gather(1, idx.token.view(-1, 1).to(logp.device)).squeeze(1).cpu()
    nll = torch.zeros(n_facts).index_add(0, idx.fact, -token_lp * idx.weight)
    kl_logp = torch.log_softmax((kl_logits_at or logits_at)(kl.rows, kl.cols), -1)
    init = kl_logp.detach() if kl.init is None else kl.init
    kl_div = torch.zeros(n_facts).index_add(0, kl.fact, (kl_logp.exp() * (kl_logp - init)).sum(-1).cpu())
    wd = cfg.weight_decay * delta.norm(dim=1) / init_norm**2
    loss = nll + cfg.kl_factor * kl_div + wd
    if keep is not None and len(keep.rows):
        keep_logp = torch.log_softmax((keep_logits_at or logits_at)(keep.rows, keep.cols), -1)
        div = (keep_logp.exp() * (keep_logp - keep.init)).sum(-1).cpu() * keep.weight
        loss = loss + torch.zeros(n_facts).index_add(0, keep.fact, div)
    return loss, nll, kl_logp.detach()


@dataclass
class KLIndex:
    """KL rows: the rows, the column each row's KL is read at (the subject's last token of the
    "{} is a" rows; the last token of a keep row), the fact each row belongs to, the initial
    (δ = 0) log-probabilities there (None: take them from this pass), and, for keep rows, each row's
    weight (``keep_factor`` / the fact's keep rows in use; 0 for a row left out)."""

    rows: torch.Tensor
    cols: torch.Tensor
    fact: torch.Tensor
    init: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def take(self, remap: torch.Tensor, width: int | None = None) -> KLIndex:
        """The entries whose row ``remap`` keeps (``remap[r]`` ≥ 0), rows renumbered."""
        k = remap[self.rows] >= 0
        init = None if self.init is None else self.init[k.to(self.init.device)]
        return KLIndex(remap[self.rows[k]], self.cols[k], self.fact[k], init,
                       None if self.weight is None else self.weight[k])


def keep_index(lm: LoadedModel, rows: Rows, offsets: torch.Tensor, first_col: int, logits_of: LogitsAt,
               answer_cols: torch.Tensor, cfg: TargetConfig) -> KLIndex | None:
    """The keep rows' KL index: column of each row's last token (minus ``first_col``), initial
    log-probabilities from ``logits_of(rows, cols)`` (the δ = 0 pass) and weights. A keep row whose
    unedited top-1 token equals its fact's unedited answer (the bare row's top-1 at
    ``answer_cols[fact]``, the first target position) probably asks the edited relation: weight 0."""
    if not rows.keep:
        return None
    keep = torch.tensor(rows.keep)
    cols = torch.tensor([int(offsets[r]) + len(rows.encoded[r].ids) - 1 - first_col for r in rows.keep])
    fact = torch.tensor([rows.fact[r] for r in rows.keep])
    with torch.no_grad():
        init = torch.log_softmax(logits_of(keep, cols), -1)
        bare = torch.tensor(rows.bare)
        answer = logits_of(bare, answer_cols).argmax(-1)
    used = (init.argmax(-1) != answer[fact.to(answer.device)]).float().cpu()
    n_used = torch.zeros(len(rows.bare)).index_add(0, fact, used)
    weight = cfg.keep_factor * used / n_used[fact].clamp(min=1)
    return KLIndex(keep, cols, fact, init, weight)


def _site_modules(lm: LoadedModel, cfg: TargetConfig) -> tuple[str, nn.Module | None]:
    """(path of the module whose output δ is added to, post-FFN norm or None)."""
    arch = lm.arch
    if cfg.site == "block":
        return arch.layer_path(cfg.layer), None
    post = arch.post_norm_path(cfg.layer)
    return arch.w_out_path(cfg.layer), (get_module(lm.model, post) if post else None)


class _Adam:
    """Adam on δ ``[F, d]`` with per-fact early stopping and the norm clamp."""

    def __init__(self, n: int, d: int, cfg: TargetConfig, max_norm: torch.Tensor):
        self.delta = torch.zeros(n, d, requires_grad=True)
        self.opt = torch.optim.Adam([self.delta], lr=cfg.lr * SOLVERS[cfg.solver].lr_scale)
        self.max_norm = max_norm
        self.done = torch.zeros(n, dtype=torch.bool)

    def step(self, loss: torch.Tensor, along_gradient: float | None = None) -> None:
        """One Adam step, or with ``along_gradient`` = f a step to f · the clamp along −∇ (per fact)."""
        self.opt.zero_grad()
        loss[~self.done].sum().backward()
        frozen = self.delta.detach()[self.done].clone()
        if along_gradient is None:
            self.opt.step()
        else:
            with torch.no_grad():
                unit = self.delta.grad / self.delta.grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
                self.delta -= along_gradient * self.max_norm.unsqueeze(1) * unit
        with torch.no_grad():
            self.delta[self.done] = frozen
            norm = self.delta.norm(dim=1).clamp(min=1e-12)
            self.delta.mul_((self.max_norm / norm).clamp(max=1.0).unsqueeze(1))


LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _run(loss_fn: LossFn, n: int, d: int, init_norm: torch.Tensor,
         cfg: TargetConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimisation loop shared by both protocols. Returns (delta, loss, nll, steps).

    ``loss_fn(delta [F, d], live [F] bool)`` returns per-fact (loss, nll); only live facts'
    values are used, so it may skip the others.
    """
    adam = _Adam(n, d, cfg, cfg.clamp_norm_factor * init_norm)
    steps = torch.zeros(n, dtype=torch.long)
    final_loss, final_nll = torch.zeros(n), torch.zeros(n)
    on_nll = SOLVERS[cfg.solver].stop_on == "nll"
    for it in range(cfg.steps):
        live = ~adam.done
        loss, nll = loss_fn(adam.delta, live)
        final_loss[live], final_nll[live] = loss.detach()[live], nll.detach()[live]
        steps[live] = it + 1
        adam.done |= live & ((nll if on_nll else loss).detach() < cfg.early_stop_loss)
        if bool(adam.done.all()) or it == cfg.steps - 1:
            break
        adam.step(loss, SOLVERS[cfg.solver].first_step if it == 0 else None)
    return adam.delta.detach(), final_loss, final_nll, steps


# ----------------------------------------------------------------------------------------------
# fast path


def _optimize_batch(lm: LoadedModel, requests: list[EditRequest], templates: list[str], cfg: TargetConfig) -> Targets:
    model, arch, dev = lm.model, lm.arch, lm.device
    rows = build_rows(lm, requests, templates, keep=cfg.keep, position=cfg.position)
    fit = _fit_rows(rows, SOLVERS[cfg.solver].fit_templates)
    batch = aligned_batch(rows.encoded, lm.tokenizer.pad_token_id)
    ids, mask, pos, s = (batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.position_ids.to(dev),
                         batch.anchor)
    site_path, post = _site_modules(lm, cfg)
    kl_rows = torch.tensor(rows.kl)
    # The per-step pass starts at column `cut`: the subject's last token, whose block output gets δ.
    # Columns before it are fixed, so their keys/values are reused from the cache, except where a
    # sliding-window cache would not hold them all (then the pass starts at column 0).
    window = getattr(model.config, "sliding_window", None)
    cut = s if window is None or ids.shape[1] <= window else 0
    # Once, over whole rows: blocks ≤ l for every row (keys, site values, block-l outputs), then the
    # blocks above for the rows the loss reads (KV cache of the columns before `cut`, initial KL logits).
    with torch.no_grad(), capture(model, inputs={"key": arch.w_out_path(cfg.layer)},
                                  outputs={"site": site_path, "block": arch.layer_path(cfg.layer)}) as got:
        with stop_after(model, arch.layer_path(cfg.layer)):
            lm.backbone(input_ids=ids, attention_mask=mask, position_ids=pos)
    upper = torch.arange(len(rows.encoded)) if fit is None else torch.tensor(fit)
    at = torch.full((len(rows.encoded),), -1, dtype=torch.long)  # row → its place among `upper`
    at[upper] = torch.arange(len(upper))
    final, prefix = _upper_pass(lm, cfg.layer, got["block"][upper.to(dev)], ids[upper.to(dev)],
                                mask[upper.to(dev)], pos[upper.to(dev)], cut)
    suffix = _Suffix(
        ids=ids[:, cut:], mask=mask, pos=pos[:, cut:], block=got["block"][:, cut:], site=got["site"][:, s].float(),
        prefix=[], row_fact=torch.tensor(rows.fact),
        loss=loss_index(rows, batch.offset, cut, None if fit is None else set(fit)),
        kl=KLIndex(kl_rows, torch.full((len(requests),), s - cut, dtype=torch.long), torch.arange(len(requests)),
                   torch.log_softmax(lm.logits(final[at[kl_rows].to(dev), s]), -1)),
        keep=keep_index(lm, rows, batch.offset, cut,
                        lambda r, c, h=final: lm.logits(h[at[r].to(dev), (c + cut).to(dev)]),
                        _answer_cols(rows, batch.offset, cut), cfg))
    keys = average_keys(got["key"][:, s].float().cpu(), rows, cfg.skip_first_token_keys)
    init = suffix.site[torch.tensor(rows.bare)].cpu()
    del final, got
    suffix = suffix.take(upper)  # the rows the loss does not read leave every per-step pass
    suffix.prefix = prefix
    init_norm = init.norm(dim=1)
    selected: dict[tuple[bool, ...], tuple[_Suffix, _Suffix, _Suffix | None]] = {}

    a = s - cut  # the subject's last token's column in the suffix
    amp = SOLVERS[cfg.solver].autocast

    def forward(part: _Suffix, delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[rows, width, d_model]`` of ``part`` with δ added at the anchor."""
        d = delta[part.row_fact].to(dev, part.block.dtype)
        if post is not None:  # the FFN output is normalised before the residual add
            anchor = part.block[:, a] - post(part.site.to(d.dtype)) + post(part.site.to(d.dtype) + d)
        else:
            anchor = part.block[:, a] + d
        hidden = torch.cat([part.block[:, :a], anchor.unsqueeze(1), part.block[:, a + 1:]], 1)
        with start_at_layer(model, arch.spec.layers, cfg.layer, lambda: hidden), _autocast(dev, amp):
            return lm.backbone(input_ids=part.ids, attention_mask=part.mask, position_ids=part.pos,
                               cache=cache_from(part.prefix, model.config) if cut else None,
                               use_cache=bool(cut)).last_hidden_state.to(part.block.dtype)

    def loss_fn(delta: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(live.tolist())
        if key not in selected:  # facts that stopped early leave the batch
            selected.clear()
            selected[key] = suffix.split(live, a)
        rewrite, kl, keep = selected[key]
        out, out_kl = forward(rewrite, delta), forward(kl, delta)
        out_keep = forward(keep, delta) if keep is not None else None
        loss, nll, _ = fact_losses(lambda r, c: lm.logits(out[r.to(dev), c.to(dev)]), rewrite.loss, kl.kl,
                                   delta, init_norm, cfg, lambda r, c: lm.logits(out_kl[r.to(dev), c.to(dev)]),
                                   None if keep is None else keep.keep,
                                   lambda r, c: lm.logits(out_keep[r.to(dev), c.to(dev)]))
        return loss, nll

    delta, loss, nll, steps = _run(loss_fn, len(requests), arch.d_model, init_norm, cfg)
    return Targets(delta, keys, init, loss, nll, steps)


def _autocast(dev: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``dev`` with ``dtype`` (a torch dtype's name), or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=getattr(torch, dtype))


def _upper_pass(lm: LoadedModel, layer: int, block: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor, cut: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Blocks above ``layer`` over whole rows whose block-``layer`` outputs are ``block``
    ``[rows, T, d_model]``: the final hidden states ``[rows, T, d_model]`` and the keys/values of the
    first ``cut`` columns (:func:`neuraldb.hooks.prefix_cache`; zeros for the blocks ≤ ``layer``)."""
    model = lm.model
    cache = cache_from([], model.config)
    with torch.no_grad(), start_at_layer(model, lm.arch.spec.layers, layer, lambda: block):
        final = lm.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=True).last_hidden_state
    return final, (prefix_cache(cache, cut, start=layer + 1) if cut else [])


def _fit_rows(rows: Rows, n_templates: int | None) -> list[int] | None:
    """The rows the loss reads when it uses only the first ``n_templates`` context templates:
    every row but the later templated ones, in order (None: every row)."""
    if n_templates is None:
        return None
    dropped = {r for templated in rows.templated for r in templated[n_templates:]}
    return [r for r in range(len(rows.encoded)) if r not in dropped]


def _answer_cols(rows: Rows, offsets: torch.Tensor, first_col: int) -> torch.Tensor:
    """``[facts]``: the column (minus ``first_col``) predicting the first target token of each bare row."""
    return torch.tensor([int(offsets[b]) + rows.encoded[b].n_prompt - 1 - first_col for b in rows.bare])


@dataclass
class _Suffix:
    """Everything the per-step pass needs, for the rows from the subject's last token on.

    ``ids``/``pos``: ``[rows, T - cut]``; ``mask``: ``[rows, T]`` (whole rows: the cache holds
    the first ``cut`` columns); ``block``: block-l outputs ``[rows, T - cut, d_model]``; ``site``:
    the site's value at the subject's last token ``[rows, d_model]``; ``prefix``: per-layer keys
    and values of the first ``cut`` columns.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    block: torch.Tensor
    site: torch.Tensor
    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    row_fact: torch.Tensor
    loss: LossIndex
    kl: KLIndex
    keep: KLIndex | None = None

    def take(self, rows: torch.Tensor, width: int | None = None) -> _Suffix:
        """Rows ``rows`` (indices, in order) and the first ``width`` suffix columns, with the loss
        and KL indices remapped to them (entries of other rows dropped)."""
        remap = torch.full((len(self.row_fact),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        li = self.loss
        e = remap[li.row] >= 0
        loss = LossIndex(remap[li.row[e]], li.col[e], li.token[e], li.fact[e], li.weight[e])
        r = rows.to(self.ids.device)
        w = self.ids.shape[1] if width is None else width
        cut = self.mask.shape[1] - self.ids.shape[1]
        return _Suffix(self.ids[r, :w], self.mask[r, : cut + w], self.pos[r, :w], self.block[r, :w], self.site[r],
                       [(k_[r], v_[r]) for k_, v_ in self.prefix], self.row_fact[rows], loss, self.kl.take(remap),
                       None if self.keep is None else self.keep.take(remap))

    def split(self, live: torch.Tensor, anchor: int) -> tuple[_Suffix, _Suffix, _Suffix | None]:
        """The rows of the facts marked in ``live`` (``[F]`` bool) as up to three passes: the
        rewriting rows, whole; the KL rows up to column ``anchor`` only, the one their loss reads
        (attention is causal, so their later columns need not be computed); the keep rows up to
        their last token (None without keep rows)."""
        kind = torch.zeros(len(self.row_fact), dtype=torch.long)  # 0 rewrite, 1 KL, 2 keep
        kind[self.kl.rows] = 1
        if self.keep is not None:
            kind[self.keep.rows] = 2
        mine = live[self.row_fact]
        keep = None
        if self.keep is not None and bool((mine & (kind == 2)).any()):
            chosen = (mine & (kind == 2)).nonzero().squeeze(1)
            width = int(self.keep.cols[mine[self.keep.rows]].max()) + 1
            keep = self.take(chosen, width)
        return (self.take((mine & (kind == 0)).nonzero().squeeze(1)),
                self.take((mine & (kind == 1)).nonzero().squeeze(1), anchor + 1), keep)


def optimize(
    lm: LoadedModel, requests: list[EditRequest], templates: list[str], cfg: TargetConfig,
    batch_size: int = 32, progress: Progress | None = None,
) -> Targets:
    """Optimise the residuals of ``requests`` in batches of ``batch_size`` facts (fast path).

    Facts are independent, so they are grouped by the shape their rows pad to (longest prefix
    before and suffix after the subject) to waste little compute on padding; results come back
    in the order of ``requests``. Under ``torchrun`` the batches are dealt out to the processes
    and gathered on every one (:mod:`neuraldb.distributed`).
    """
    cfg.validate()
    lm.arch.check_layer(cfg.layer)
    if not SOLVERS[cfg.solver].batched:
        return optimize_full_forward(lm, requests, templates, cfg, progress)
    order = sorted(range(len(requests)), key=lambda i: _padded_shape(lm, requests[i], templates, cfg.position))
    chunks = [[requests[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    parts = distributed.gather(len(chunks), lambda c: _optimize_batch(lm, chunks[c], templates, cfg),
                               (lambda c: progress(len(chunks[c]))) if progress else None)
    merged = Targets.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return Targets(*(getattr(merged, f)[inverse] for f in ("delta", "keys", "init", "loss", "nll", "steps")))


def _padded_shape(lm: LoadedModel, request: EditRequest, templates: list[str],
                  cfg_position: Literal["subject", "last"] = "subject") -> tuple[int, int]:
    """(longest suffix, longest prefix) over the rows of one fact."""
    rows = build_rows(lm, [request], templates, position=cfg_position)
    return (max(len(e.ids) - e.subject_last for e in rows.encoded), max(e.subject_last for e in rows.encoded))


# ----------------------------------------------------------------------------------------------
# reference protocol


def optimize_full_forward(
    lm: LoadedModel, requests: list[EditRequest], templates: list[str], cfg: TargetConfig,
    progress: Progress | None = None,
) -> Targets:
    """The reference protocol: one fact at a time, a full forward (all layers, all logits) per step,
    δ added by a hook at the site. Same loss and stopping rule as :func:`optimize` (the solver's
    ``stop_on`` and ``lr_scale`` apply; ``batched`` is what this function is not)."""
    cfg.validate()
    parts = distributed.gather(len(requests), lambda i: _full_forward_one(lm, requests[i], templates, cfg),
                               (lambda _i: progress(1)) if progress else None)
    return Targets.cat(parts)


def _full_forward_one(lm: LoadedModel, req: EditRequest, templates: list[str], cfg: TargetConfig) -> Targets:
    model, arch, dev = lm.model, lm.arch, lm.device
    site_path, _ = _site_modules(lm, cfg)
    rows = build_rows(lm, [req], templates, keep=cfg.keep, position=cfg.position)
    batch = aligned_batch(rows.encoded, lm.tokenizer.pad_token_id)
    s = batch.anchor
    kw = dict(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
              position_ids=batch.position_ids.to(dev))
    probes = {"inputs": {"key": arch.w_out_path(cfg.layer)}, "outputs": {"site": site_path}}
    with torch.no_grad(), capture(model, **probes) as got:
        logits0 = model(**kw).logits
    keep = keep_index(lm, rows, batch.offset, 0, lambda r, c, x=logits0: x[r.to(dev), c.to(dev)].float(),
                      _answer_cols(rows, batch.offset, 0), cfg)
    del logits0
    init = got["site"][rows.bare, s].float().cpu()
    keys = average_keys(got["key"][:, s].float().cpu(), rows, cfg.skip_first_token_keys)
    idx = loss_index(rows, batch.offset, 0)
    kl = KLIndex(torch.tensor(rows.kl), torch.full((1,), s, dtype=torch.long), torch.zeros(1, dtype=torch.long))

    def loss_fn(delta: torch.Tensor, _live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def add(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, s] = h[:, s] + delta[0].to(h.device, h.dtype)
            return like(out, h)

        with hooks([get_module(model, site_path).register_forward_hook(add)]):
            logits = model(**kw).logits  # full logits, every position: the reference protocol
        loss, nll, kl_logp = fact_losses(lambda r, c: logits[r.to(dev), c.to(dev)].float(), idx, kl,
                                         delta, init.norm(dim=1), cfg, keep=keep)
        if kl.init is None:  # the first pass has δ = 0: its distribution is the reference
            kl.init = kl_logp
        return loss, nll

    delta, loss, nll, steps = _run(loss_fn, 1, arch.d_model, init.norm(dim=1), cfg)
    return Targets(delta, keys, init, loss, nll, steps)
