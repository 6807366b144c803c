"""The built-in BERT encoder: shared path names, padding, pooling, LoRA composition, errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, paths
from lora_jax.models import bert, llama

CFG = bert.BertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_positions=16)


@pytest.fixture(scope="module")
def params():
    # Non-trivial norms and biases, so that a wrong use of any of them shows (numpy: no compiles).
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: bert.init(k, CFG), jax.random.key(0))
    return paths.map_with_path(
        lambda p, s: jnp.asarray(p.endswith("scale") + 0.1 * rng.normal(size=s.shape), jnp.float32), shapes
    )


apply = jax.jit(bert.apply, static_argnames="config")
embed_sentences = jax.jit(bert.embed_sentences, static_argnames=("config", "normalize"))

IDS = jnp.array([[3, 7, 9, 11, 2], [4, 8, 2, 0, 0]])
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def test_paths_share_role_names_with_llama():
    b = {p for p, _ in paths.leaves_with_paths(jax.eval_shape(lambda k: bert.init(k, CFG), jax.random.key(0)))}
    lcfg = llama.LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48)
    ll = {p for p, _ in paths.leaves_with_paths(jax.eval_shape(lambda k: llama.init(k, lcfg), jax.random.key(0)))}
    shared = {"embed", "layers/1/attn/q_proj/kernel", "layers/0/attn/o_proj/kernel", "layers/1/mlp/up_proj/kernel"}
    shared |= {"layers/0/mlp/down_proj/kernel", "layers/0/attn_norm/scale", "layers/1/mlp_norm/scale"}
    assert shared <= b & ll
    assert {"pos_embed", "type_embed", "embed_norm/scale", "embed_norm/bias", "layers/0/attn/k_proj/bias"} <= b


def test_padding_does_not_change_real_tokens(params):
    full = apply(params, IDS, MASK, config=CFG)
    short = apply(params, IDS[1:, :3], MASK[1:, :3], config=CFG)
    np.testing.assert_allclose(np.asarray(full[1, :3]), np.asarray(short[0]), atol=1e-5)
    e_full = embed_sentences(params, IDS, MASK, config=CFG)
    e_short = embed_sentences(params, IDS[1:, :3], MASK[1:, :3], config=CFG)
    np.testing.assert_allclose(np.asarray(e_full[1]), np.asarray(e_short[0]), atol=1e-5)


def test_token_types_matter(params):
    a = apply(params, IDS, MASK, config=CFG)
    b = apply(params, IDS, MASK, jnp.ones_like(IDS), config=CFG)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_mean_pool_and_normalize(params):
    h = apply(params, IDS, MASK, config=CFG)
    pooled = bert.mean_pool(h, MASK)
    np.testing.assert_allclose(np.asarray(pooled[1]), np.asarray(h[1, :3].mean(0)), atol=1e-6)
    e = embed_sentences(params, IDS, MASK, config=CFG)
    np.testing.assert_allclose(np.asarray(e), np.asarray(pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)))
    raw = embed_sentences(params, IDS, MASK, config=CFG, normalize=False)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(pooled))
    assert np.all(np.isfinite(np.asarray(bert.mean_pool(h, jnp.zeros_like(MASK)))))  # an all-padding row


def test_exact_gelu():
    x = jnp.linspace(-4.0, 4.0, 9)
    want = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.asarray(x)])
    np.testing.assert_allclose(np.asarray(bert.ACTIVATIONS["gelu"](x)), want, atol=1e-6)


def test_jit_agrees_with_eager(params):
    np.testing.assert_allclose(
        np.asarray(embed_sentences(params, IDS, MASK, config=CFG)),
        np.asarray(bert.embed_sentences(params, IDS, MASK, config=CFG)),
        atol=1e-6,
    )


def test_bfloat16_params(params):
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    h = apply(p16, IDS, MASK, config=CFG)
    assert h.dtype == jnp.bfloat16
    e = embed_sentences(p16, IDS, MASK, config=CFG)
    ref = embed_sentences(params, IDS, MASK, config=CFG)
    assert e.dtype == jnp.float32 and np.max(np.abs(np.asarray(e - ref))) < 0.05


RULE = lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4)


def test_lora_at_init_equals_base(params):
    adapted = lora.init(jax.random.key(2), params, [RULE])
    assert len(lora.nodes(adapted)) == 2 * CFG.n_layers
    # B = 0: the same output (up to XLA's fusion choices in a different graph)
    np.testing.assert_allclose(
        np.asarray(apply(adapted, IDS, MASK, config=CFG)), np.asarray(apply(params, IDS, MASK, config=CFG)), atol=2e-6
    )


def test_lora_equals_merged_and_trains_only_factors(params):
    adapted = lora.init(jax.random.key(2), params, [RULE])
    adapted = jax.tree.map(
        lambda x: dataclasses.replace(x, lora_b=0.05 * jnp.ones_like(x.lora_b)) if lora.is_lora(x) else x,
        adapted,
        is_leaf=lora.is_lora,
    )
    out = apply(adapted, IDS, MASK, config=CFG)
    merged = apply(lora.merge(adapted), IDS, MASK, config=CFG)
    np.testing.assert_allclose(np.asarray(out), np.asarray(merged), atol=1e-5)
    assert not np.allclose(np.asarray(out), np.asarray(apply(params, IDS, MASK, config=CFG)))

    trainable, frozen = paths.split(adapted)

    def loss(t):
        e = embed_sentences(paths.combine(t, frozen), IDS, MASK, config=CFG)
        return -jnp.sum(e[0] * e[1])

    grads = jax.jit(jax.grad(loss))(trainable)
    leaves = paths.leaves_with_paths(grads)
    assert leaves and all(lora.is_factor_path(p) for p, _ in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for _, g in leaves)


def test_lora_on_embeddings(params):
    adapted = lora.init(jax.random.key(3), params, [lora.LoraRule(pattern="embed|pos_embed", rank=2)])
    # B = 0: the same output (up to XLA's fusion choices in a different graph)
    np.testing.assert_allclose(
        np.asarray(apply(adapted, IDS, MASK, config=CFG)), np.asarray(apply(params, IDS, MASK, config=CFG)), atol=2e-6
    )


def test_tokenize_trims_fixed_padding():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=12, pad_id=0, pad_token="[PAD]")
    batch = bert.tokenize(tok, ["a b", "b a b x"])
    assert batch["input_ids"].tolist() == [[2, 3, 0, 0], [3, 2, 3, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"].dtype == np.int32
    tok.enable_padding(length=6, pad_id=0, pad_token="[PAD]", direction="left")
    assert bert.tokenize(tok, ["a b", "b a b"])["input_ids"].tolist() == [[2, 3, 0], [3, 2, 3]]


def test_tokenize_rejects_a_single_string():
    with pytest.raises(TypeError, match="got one string 'hello'; wrap it in a list"):
        bert.tokenize(None, "hello")


def test_sequence_longer_than_positions(params):
    with pytest.raises(ValueError, match="sequence length 17 exceeds BertConfig.max_positions=16"):
        apply(params, jnp.zeros((1, 17), jnp.int32), config=CFG)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "BertConfig.dim must be a positive int, got 0"),
        ({"n_layers": True}, "BertConfig.n_layers must be a positive int, got True"),
        ({"n_heads": 5}, "dim=32 is not divisible by n_heads=5"),
        ({"act": "tanh"}, r"BertConfig.act='tanh' is not supported; choose one of \['gelu'"),
    ],
)
def test_config_errors(kwargs, match):
    base = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=48)
    with pytest.raises(ValueError, match=match):
        bert.BertConfig(**(base | kwargs))
