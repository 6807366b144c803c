"""The runner's evaluation (lora_jax.runner.evaluate): validation loss of the adapted model, token-weighted."""

import dataclasses

import jax
import numpy as np
import pytest

from lora_jax import config as C
from lora_jax import lora
from lora_jax.models import llama
from lora_jax.runner import build, evaluate

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
LENGTHS = [12, 3, 7, 12, 2]  # real tokens per example: the batches of 2 hold 15, 19 and 2 of them


def val_data() -> dict:
    rng = np.random.default_rng(0)
    n, t = len(LENGTHS), max(LENGTHS)
    tokens = rng.integers(0, CFG.vocab_size, size=(n, t)).astype(np.int32)
    attention = (np.arange(t)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    tokens *= attention
    loss_mask = attention.astype(np.float32)
    loss_mask[:, 0] = 0  # the first token is no target
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention}


def reference_nll(dense_params, data) -> tuple[np.ndarray, np.ndarray]:
    """Next-token NLL of every position and its weight (the target's loss_mask), in numpy (float64)."""
    apply = jax.jit(lambda p, t, m: llama.apply(p, t, CFG, attention_mask_BT=m))
    logits = np.asarray(apply(dense_params, data["tokens"], data["attention_mask"]), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, data["tokens"][:, 1:, None], -1)[..., 0]
    return nll, data["loss_mask"][:, 1:]


def mean_nll(nll: np.ndarray, w: np.ndarray) -> float:
    return float((nll * w).sum() / w.sum())


@pytest.fixture(scope="module")
def adapted():
    base = llama.init(jax.random.key(0), CFG)
    p = lora.init(jax.random.key(1), base, [lora.LoraRule.all_linear(4, alpha=8)])
    p = jax.tree.map(  # non-zero B: the adapters change the loss
        lambda x: dataclasses.replace(x, lora_b=0.3 * jax.random.normal(jax.random.key(2), x.lora_b.shape))
        if lora.is_lora(x) else x,
        p, is_leaf=lora.is_lora)  # fmt: skip
    return base, p


def context(params) -> build.RunContext:
    cfg = C.ExperimentConfig(task=C.TaskConfig(n_eval_generate=0), train=C.TrainConfig(batch_size=2, eval_batches=8))
    model = build.LoadedModel("tiny", params, CFG, tokenizer=None)
    return build.RunContext(cfg, model, task=None, train_data=None, val_data=val_data(), params=params)


def test_val_loss_is_the_token_weighted_mean_of_the_adapted_model(adapted):
    base, params = adapted
    data = val_data()
    out = evaluate.evaluate(context(params), params)
    nll, w = reference_nll(lora.merge(params), data)
    want = mean_nll(nll, w)
    assert out["val_loss"] == pytest.approx(want, rel=1e-5)
    assert out["val_ppl"] == pytest.approx(np.exp(want), rel=1e-5)
    # The adapters matter, and the mean of the batches' own means is another number.
    assert abs(want - mean_nll(*reference_nll(base, data))) > 1e-2
    assert abs(float(np.mean([mean_nll(nll[s:s + 2], w[s:s + 2]) for s in (0, 2, 4)])) - want) > 1e-2


def test_eval_batches_limits_the_batches_evaluated(adapted):
    _, params = adapted
    ctx = context(params)
    ctx.cfg = dataclasses.replace(ctx.cfg, train=dataclasses.replace(ctx.cfg.train, eval_batches=1))
    nll, w = reference_nll(lora.merge(params), val_data())
    assert evaluate.evaluate(ctx, params)["val_loss"] == pytest.approx(mean_nll(nll[:2], w[:2]), rel=1e-5)
