"""EVA: PCA against PEFT's IncrementalPCA, the rank redistribution, inputs gathered from a real forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.errors import LoraError
from lora_jax.methods import eva
from lora_jax.models import llama


def test_pca_matches_peft_incremental_pca_on_one_batch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.utils.incremental_pca import IncrementalPCA

    x = np.random.default_rng(0).normal(size=(200, 12)) * np.linspace(3, 0.5, 12)
    ref = IncrementalPCA(n_components=6).partial_fit(torch.tensor(x, dtype=torch.float64))  # one batch, as a hook
    comps, ratio = eva.pca(x)
    np.testing.assert_allclose(ratio[:6], ref.explained_variance_ratio_.numpy(), rtol=1e-8)
    signs = np.sign(np.sum(comps[:6] * ref.components_.numpy(), axis=1))
    np.testing.assert_allclose(comps[:6] * signs[:, None], ref.components_.numpy(), atol=1e-8)


def test_rank_distribution_takes_the_largest_ratios():
    ratios = {"a": np.array([0.5, 0.3, 0.1]), "b": np.array([0.4, 0.35, 0.05]), "c": np.array([0.2, 0.01])}
    assert eva.rank_distribution(ratios, 4) == {"a": 2, "b": 2, "c": 0}
    assert eva.rank_distribution(ratios, 5) == {"a": 2, "b": 2, "c": 1}


def test_init_from_a_forward_pass():
    cfg = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), cfg)
    rules = [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=2, alpha=4)]
    paths = [f"layers/{i}/attn/{m}_proj/kernel" for i in range(2) for m in "qv"]
    batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, 64) for i in range(2)]
    inputs = eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg), params, batches, paths)
    assert {k: v.shape for k, v in inputs.items()} == {p: (32, 16) for p in paths}  # 2 batches x 2 x 8 tokens
    np.testing.assert_array_equal(inputs["layers/0/attn/q_proj/kernel"], inputs["layers/0/attn/v_proj/kernel"])
    p = eva.init(params, rules, inputs)
    nodes = dict(lora.nodes(p))
    assert sum(n.rank for n in nodes.values()) <= 8 and all(n.scale == 2.0 for n in nodes.values())
    tokens = batches[0]
    np.testing.assert_allclose(llama.apply(p, tokens, cfg), llama.apply(params, tokens, cfg), atol=1e-5)
    n = nodes["layers/1/attn/q_proj/kernel"]
    comps, _ = eva.pca(inputs["layers/1/attn/q_proj/kernel"])
    np.testing.assert_allclose(np.abs(np.asarray(n.lora_a).T), np.abs(comps[: n.rank]), atol=1e-5)


def test_bad_inputs():
    w = {"a": jnp.ones((8, 4))}
    with pytest.raises(LoraError, match="no inputs for 'a'"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {})
    with pytest.raises(LoraError, match="width 5"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {"a": np.ones((10, 5))})
    with pytest.raises(LoraError, match="rho must be >= 1"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {"a": np.ones((10, 8))}, rho=0.5)


def test_collect_inputs_drops_padding_with_the_attention_mask():
    cfg = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), cfg)
    path = "layers/0/mlp/down_proj/kernel"
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 1, 64))
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    padded = eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg, attention_mask_BT=mask), params, [tokens],
                                [path], masks=[mask])[path]
    alone = [eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg), params, [t], [path])[path]
             for t in (tokens[:1], tokens[1:, :5])]  # each example without padding
    assert padded.shape == (13, 32)
    np.testing.assert_allclose(padded, np.concatenate(alone), atol=1e-5)
