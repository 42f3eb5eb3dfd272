"""Does a residual written at the prompt's *last* token carry over to paraphrases? Per residual layer.

The relation gate (``gate=relation``) adds its residual at the prompt's last token, where the
relation has been read. This measures, on CounterFact **training** records, how far such a residual
moves the paraphrases: per fact, one δ is optimised at the FFN output of layer L at the last token of
the edit prompt behind the context templates (Adam, ``--steps``, ``--lr``, an L2 penalty), then added
at the last token of the edit prompt and of each paraphrase; a prompt counts when the new object's
mean token log-probability beats the true one's. Unedited counts (δ = 0) are reported beside.

Usage:  python benchmarks/last_token_transfer.py --layers 14,22 --n 12
        (writes benchmarks/results/last_token_transfer.json)
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from evals import datasets
from neuraldb import models
from neuraldb.files import write_json
from neuraldb.hooks import get_module, hooks
from neuraldb.models import LoadedModel
from neuraldb.templates import context_templates


class LastTokenDelta:
    """Forward hook adding ``delta`` ``[d_model]`` to the module output at per-row columns ``pos``."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None

    def __call__(self, _m, _a, out: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            return out
        out = out.clone()
        out[torch.arange(out.shape[0]), self.pos] += self.delta.to(out.dtype)
        return out


def mean_logp(lm: LoadedModel, add: LastTokenDelta, prompts: list[str], target: str,
              delta: torch.Tensor) -> torch.Tensor:
    """``[len(prompts)]`` mean log-probability of ``target``'s tokens after each prompt, δ at its last token."""
    tok = lm.tokenizer
    t = tok(target, add_special_tokens=False).input_ids
    seqs = [tok(p, add_special_tokens=False).input_ids + t for p in prompts]
    starts = [len(s) - len(t) for s in seqs]
    width, pad = max(map(len, seqs)), tok.eos_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    add.delta, add.pos = delta, torch.tensor(starts) - 1
    lp = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    return torch.stack([sum(lp[i, s - 1 + j, t[j]] for j in range(len(t))) / len(t) for i, s in enumerate(starts)])


def run_layer(lm: LoadedModel, layer: int, records: list, templates: list[str], steps: int,
              lr: float) -> dict[str, int]:
    add = LastTokenDelta()
    res = {"edit_base": 0, "edit": 0, "para_base": 0, "para": 0, "n_para": 0, "n": 0}
    with hooks([get_module(lm.model, lm.arch.w_out_path(layer)).register_forward_hook(add)]):
        for r in records:
            q = r.request
            prompt = q.template.format(q.subject)
            train = [c.replace("{}", prompt) for c in templates]
            delta = torch.zeros(lm.arch.d_model, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=lr)
            for _ in range(steps):
                loss = -mean_logp(lm, add, train, q.target_new, delta).mean() + 0.5 * delta.norm() ** 2 / 400
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for suffix, d in (("_base", torch.zeros_like(delta)), ("", delta.detach())):
                    new, true = (mean_logp(lm, add, [prompt], t, d)[0] for t in (q.target_new, q.target_true))
                    res["edit" + suffix] += int(new > true)
                    if q.paraphrases:
                        pn = mean_logp(lm, add, list(q.paraphrases), q.target_new, d)
                        pt = mean_logp(lm, add, list(q.paraphrases), q.target_true, d)
                        res["para" + suffix] += int((pn > pt).sum())
            res["n_para"] += len(q.paraphrases)
            res["n"] += 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layers", default="14,22")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/last_token_transfer.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = models.load(args.model)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    templates = context_templates(lm, 5, 10, 0)
    records = datasets.load("counterfact-train").records[: args.n]
    out = {"model": lm.name, "n": args.n, "steps": args.steps, "lr": args.lr, "layers": {}}
    for layer in (int(x) for x in args.layers.split(",")):
        t0 = time.time()
        out["layers"][str(layer)] = run_layer(lm, layer, records, templates, args.steps, args.lr) | {
            "seconds": round(time.time() - t0)}
        write_json(args.out, out)
    table = Table(title=f"residual at the prompt's last token: CounterFact-train, first {args.n} facts")
    for c in ("layer", "edit prompt (base)", "edit prompt", "paraphrases (base)", "paraphrases", "s"):
        table.add_column(c, justify="right")
    for layer, r in out["layers"].items():
        table.add_row(layer, f"{r['edit_base']}/{r['n']}", f"{r['edit']}/{r['n']}",
                      f"{r['para_base']}/{r['n_para']}", f"{r['para']}/{r['n_para']}", str(r["seconds"]))
    Console().print(table)


if __name__ == "__main__":
    main()
