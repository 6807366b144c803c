"""Evaluation of a run's parameters: validation loss and perplexity, generation scores."""

from __future__ import annotations

import itertools
import math

from lora_jax import data as _data
from lora_jax import paths as _paths
from lora_jax import train as _train
from lora_jax.runner.build import RunContext, chat_format, loss_fn


def val_batches(ctx: RunContext):
    """The validation batches a loss evaluation reads (at most ``train.eval_batches`` of them)."""
    batches = _data.eval_batches(ctx.val_data, ctx.cfg.train.batch_size)
    return itertools.islice(batches, ctx.cfg.train.eval_batches) if ctx.cfg.train.eval_batches else batches


def loss_metrics(total: float, n: float) -> dict[str, float]:
    """``val_loss`` and ``val_ppl`` from a token-weighted loss sum over ``n`` tokens."""
    loss = total / max(n, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def generation_prompts(ctx: RunContext) -> tuple[list, list[list[int]]]:
    """The validation examples decoded for generation metrics and their prompt ids (none without a task score)."""
    k = ctx.cfg.task.n_eval_generate
    if not k or not hasattr(ctx.task, "score"):
        return [], []
    tok = ctx.model.tokenizer
    fmt = chat_format(tok)
    split = "val" if "val" in ctx.task.splits() else ctx.task.splits()[-1]
    examples = ctx.task.examples(split)[:k]
    prompts = []
    for ex in examples:
        tz = ctx.task.tokenize(ex, tok, fmt, ctx.cfg.task.max_len)
        prompts.append(list(tz.ids[: tz.prompt_len]))
    return examples, prompts


def generation_scores(ctx: RunContext, examples: list, preds: list[str]) -> dict:
    """ROUGE / exact match of the predictions, and the first five as ``samples``."""
    scores = ctx.task.score(preds, [ctx.task.reference(ex) for ex in examples])
    out = {k: float(v) for k, v in scores.items() if k != "n"}
    out["samples"] = [{"reference": ctx.task.reference(ex), "prediction": p} for ex, p in zip(examples[:5], preds)]
    return out


def evaluate(ctx: RunContext, params, *, quiet: bool = True) -> dict[str, float]:
    """Validation loss and perplexity; ROUGE / exact match from greedy generations."""
    eval_step = _train.make_eval_step(loss_fn(ctx.model.config, ctx.cfg))
    t, f = _paths.split(params)
    total = n = 0.0
    for batch in val_batches(ctx):
        m = eval_step(t, f, batch)
        total += float(m["loss"]) * float(m["n_tokens"])
        n += float(m["n_tokens"])
    out = loss_metrics(total, n)
    examples, prompts = generation_prompts(ctx)
    if examples:
        from lora_jax import generate

        tok = ctx.model.tokenizer
        preds = []
        bs = max(1, ctx.cfg.train.batch_size * 2)
        for s in range(0, len(prompts), bs):
            g = generate.generate(params, ctx.model.config, prompts[s : s + bs],
                                  max_new_tokens=ctx.cfg.task.max_new_tokens, stop_ids=tok.stop_ids,
                                  pad_id=getattr(tok, "pad_id", None) or 0)
            preds += [tok.decode(r, skip_special_tokens=True).strip() for r in g.rows()]
        out.update(generation_scores(ctx, examples, preds))
    return out
