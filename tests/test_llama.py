"""The Llama decoder's attention paths: block-causal and jax.nn.dot_product_attention agree; masks; the choice."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.errors import ConfigError
from lora_jax.models import attention, llama
from lora_jax.runner import build

# GQA: 4 query heads share 2 kv heads. 128 tokens = two query blocks of the blocked path.
CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
T = 128


@pytest.fixture(scope="module")
def params():
    p = llama.init(jax.random.key(0), CFG)
    p["embed"] = p["embed"] * 8  # larger activations: differences between the paths show
    return p


def padding(kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    mask = np.ones((2, T), np.int32)
    if kind == "left":
        mask[1, :41] = 0  # ends inside the first query block
    else:
        mask[0, 90:] = 0  # right padding: every query still sees key 0
    return mask


@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_dot_product_attention_equals_blocked_logits_and_gradients(params, pad):
    assert llama.causal_blocks(T) == 2
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, CFG.vocab_size)
    mask = padding(pad)
    am = None if mask is None else jnp.asarray(mask)
    apply = jax.jit(lambda p, a: llama.apply(p, tokens, CFG, attention_mask_BT=am, attention=a), static_argnums=1)
    logits = {a: np.asarray(apply(params, a)) for a in ("blocked", "dot_product")}
    real = np.ones((2, T), bool) if mask is None else mask.astype(bool)  # left padding's outputs are unspecified
    diff = np.max(np.abs(logits["dot_product"][real] - logits["blocked"][real])) / np.max(np.abs(logits["blocked"]))
    assert diff <= 1e-5, diff
    loss_mask = jnp.ones((2, T)) if mask is None else jnp.asarray(mask, jnp.float32)
    if pad == "left":
        loss_mask = loss_mask.at[1, 41].set(0)  # the first real token is no target
    batch = {"tokens": tokens, "loss_mask": loss_mask, **({} if am is None else {"attention_mask": am})}
    grad = jax.jit(jax.grad(lambda p, a: llama.loss(p, batch, CFG, attention=a)[0]), static_argnums=1)
    grads = {a: grad(params, a) for a in ("blocked", "dot_product")}
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6),
                 grads["dot_product"], grads["blocked"])


def numpy_attention(x, p, cfg, window, key_valid):
    """Grouped-query causal attention with RoPE and a sliding window, written from the definitions in numpy."""
    x = np.asarray(x, np.float64)
    B, T_, _ = x.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (x @ np.asarray(p["q_proj"]["kernel"], np.float64)).reshape(B, T_, N, H)
    k = (x @ np.asarray(p["k_proj"]["kernel"], np.float64)).reshape(B, T_, K, H)
    v = (x @ np.asarray(p["v_proj"]["kernel"], np.float64)).reshape(B, T_, K, H)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
    ang = np.arange(T_)[:, None] * inv[None]  # (T, H/2)
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rope(z):  # rotate-half: pairs (i, i + H/2)
        a, b = z[..., : H // 2], z[..., H // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    q, k = rope(q), rope(k)
    t, s = np.arange(T_)[:, None], np.arange(T_)[None, :]
    seen = (s <= t) & ((s > t - window) if window is not None else True)
    seen = seen[None] & key_valid[:, None, :]  # (B, T, S)
    kv = np.arange(N) // (N // K)  # query head n reads kv head n // G
    scores = np.einsum("btnh,bsnh->bnts", q, k[:, :, kv]) / math.sqrt(H)
    scores = np.where(seen[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # NaN where a query sees no key
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out = np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v[:, :, kv])
    return out.reshape(B, T_, N * H) @ np.asarray(p["o_proj"]["kernel"], np.float64)


@pytest.mark.parametrize("impl", ["blocked", "dot_product"])
def test_sliding_window_attention_matches_numpy_reference(params, impl):
    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48, sliding_window=5)
    x = jax.random.normal(jax.random.key(3), (2, T, cfg.dim))
    key_valid = np.ones((2, T), bool)
    key_valid[1, 100:] = False  # right padding
    masks = llama.make_masks(jnp.asarray(key_valid), T, cfg.sliding_window)
    cos, sin = llama.rope_tables(jnp.broadcast_to(jnp.arange(T), (2, T)), cfg.head_dim, cfg.rope_theta)
    ours = llama.self_attention(params["layers"][0]["attn"], x, cos, sin, masks, cfg, impl)
    ref = numpy_attention(x, params["layers"][0]["attn"], cfg, cfg.sliding_window, key_valid)
    seen = ~np.isnan(ref[..., 0])  # queries past the padding by more than the window see no key: unspecified
    assert seen.sum() == 2 * T - (T - 100 - 4)
    np.testing.assert_allclose(np.asarray(ours)[seen], ref[seen], rtol=1e-4, atol=1e-5)
    # ... and the window matters: without it the outputs differ.
    wide = llama.make_masks(jnp.asarray(key_valid), T, None)
    wide_out = np.asarray(llama.self_attention(params["layers"][0]["attn"], x, cos, sin, wide, cfg, impl))
    assert not np.allclose(wide_out[seen], ref[seen], atol=1e-3)


def test_sliding_window_kv_cache_decoding_equals_the_full_pass(params):
    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, sliding_window=4)
    tokens = jax.random.randint(jax.random.key(4), (1, 12), 0, cfg.vocab_size)
    full = llama.hidden_states(params, tokens, cfg)
    cache = llama.init_cache(cfg, 1, 12)
    kv = jnp.zeros((1, 12), bool).at[:, :6].set(True)
    h, cache = llama.hidden_states_cached(params, tokens[:, :6], cfg, cache, index=0,
                                          positions_BT=jnp.arange(6)[None], kv_mask_BS=kv)
    steps = [h]
    for t in range(6, 12):
        kv = kv.at[:, t].set(True)
        h, cache = llama.hidden_states_cached(params, tokens[:, t : t + 1], cfg, cache, index=t,
                                              positions_BT=jnp.array([[t]]), kv_mask_BS=kv)
        steps.append(h)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    unwindowed = llama.hidden_states(params, tokens, dataclasses.replace(cfg, sliding_window=None))
    assert not np.allclose(np.asarray(unwindowed[:, 5:]), np.asarray(full[:, 5:]), atol=1e-4)


def test_attention_choice_by_backend_dtype_and_head_dim():
    choose = attention.choose
    assert llama.attention_choice(CFG, backend="cpu") == "blocked"  # today's path stays the CPU default
    assert choose("auto", backend="gpu", dtype=jnp.bfloat16, head_dim=64) == "cudnn"
    assert choose("auto", backend="cuda", dtype=jnp.float16, head_dim=128) == "cudnn"
    assert choose("auto", backend="gpu", dtype=jnp.float32, head_dim=64) == "dot_product"
    assert choose("auto", backend="gpu", dtype=jnp.bfloat16, head_dim=36) == "dot_product"
    assert choose("auto", backend="gpu", dtype=jnp.bfloat16, head_dim=256) == "dot_product"
    assert choose("auto", backend="tpu", dtype=jnp.bfloat16, head_dim=64) == "dot_product"
    assert choose("blocked", backend="gpu", dtype=jnp.bfloat16, head_dim=64) == "blocked"
    assert choose("dot_product", backend="cpu", dtype=jnp.float32, head_dim=64) == "dot_product"
    with pytest.raises(ConfigError, match="'cudnn' cannot run here: cuDNN attention needs a CUDA GPU"):
        choose("cudnn", backend="cpu", dtype=jnp.bfloat16, head_dim=64)
    with pytest.raises(ConfigError, match="takes bfloat16 or float16, got float32"):
        choose("cudnn", backend="gpu", dtype=jnp.float32, head_dim=64)
    with pytest.raises(ConfigError, match="multiple of 8 and <= 128, got 36"):
        choose("cudnn", backend="gpu", dtype=jnp.bfloat16, head_dim=36)
    with pytest.raises(ConfigError, match="unknown value 'flash'; choose one of auto, blocked, dot_product, cudnn"):
        choose("flash", backend="cpu", dtype=jnp.float32, head_dim=64)


def test_the_run_records_the_attention_it_runs(params):
    from lora_jax.config import ExperimentConfig, ModelConfig

    model = build.LoadedModel("tiny", params, CFG, None)
    assert build.attention_used(ExperimentConfig(), model) == "blocked"
    assert build.attention_used(ExperimentConfig(model=ModelConfig(attention="dot_product")), model) == "dot_product"
    with pytest.raises(ConfigError, match="cuDNN attention needs a CUDA GPU"):
        build.attention_used(ExperimentConfig(model=ModelConfig(attention="cudnn", dtype="bfloat16")), model)


def test_the_run_loss_takes_remat_and_attention_from_the_config(params, monkeypatch):
    from lora_jax.config import ExperimentConfig, ModelConfig, TrainConfig

    seen = {}
    monkeypatch.setattr(llama, "loss", lambda p, b, c, **kw: seen.update(kw))
    cfg = ExperimentConfig(model=ModelConfig(attention="dot_product"), train=TrainConfig(remat=True))
    build.loss_fn(CFG, cfg)(params, {})
    assert seen == {"remat": "full", "attention": "dot_product"}
    build.loss_fn(CFG)(params, {})
    assert seen == {"remat": "none", "attention": "auto"}


def test_sliding_window_must_be_positive():
    with pytest.raises(ConfigError, match="sliding_window must be a positive int or None, got 0"):
        llama.LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, sliding_window=0)
