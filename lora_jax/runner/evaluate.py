"""Evaluation of a run's parameters: validation loss and perplexity, generation scores."""

from __future__ import annotations

import math

from lora_jax import data as _data
from lora_jax import paths as _paths
from lora_jax import train as _train
from lora_jax.runner.build import RunContext, chat_format, loss_fn


def evaluate(ctx: RunContext, params, *, quiet: bool = True) -> dict[str, float]:
    """Validation loss and perplexity; ROUGE / exact match from greedy generations."""
    eval_step = _train.make_eval_step(loss_fn(ctx.model.config, ctx.cfg))
    t, f = _paths.split(params)
    total = n = 0.0
    for i, batch in enumerate(_data.eval_batches(ctx.val_data, ctx.cfg.train.batch_size)):
        if ctx.cfg.train.eval_batches and i >= ctx.cfg.train.eval_batches:
            break
        m = eval_step(t, f, batch)
        total += float(m["loss"]) * float(m["n_tokens"])
        n += float(m["n_tokens"])
    out = {"val_loss": total / max(n, 1.0)}
    out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
    k = ctx.cfg.task.n_eval_generate
    if k and hasattr(ctx.task, "score"):
        from lora_jax import generate

        tok = ctx.model.tokenizer
        fmt = chat_format(tok)
        split = "val" if "val" in ctx.task.splits() else ctx.task.splits()[-1]
        examples = ctx.task.examples(split)[:k]
        prompts = []
        for ex in examples:
            tz = ctx.task.tokenize(ex, tok, fmt, ctx.cfg.task.max_len)
            prompts.append(list(tz.ids[: tz.prompt_len]))
        preds = []
        bs = max(1, ctx.cfg.train.batch_size * 2)
        for s in range(0, len(prompts), bs):
            g = generate.generate(params, ctx.model.config, prompts[s : s + bs],
                                  max_new_tokens=ctx.cfg.task.max_new_tokens, stop_ids=tok.stop_ids,
                                  pad_id=getattr(tok, "pad_id", None) or 0)
            preds += [tok.decode(r, skip_special_tokens=True).strip() for r in g.rows()]
        scores = ctx.task.score(preds, [ctx.task.reference(ex) for ex in examples])
        out.update({k2: float(v) for k2, v in scores.items() if k2 != "n"})
        out["samples"] = [{"reference": ctx.task.reference(ex), "prediction": p} for ex, p in zip(examples[:5], preds)]
    return out
