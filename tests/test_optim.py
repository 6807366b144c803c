"""Optimizer state for A and B only; zero updates elsewhere; LoRA+."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import lora, optim
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


@pytest.fixture(scope="module")
def adapted():
    params = llama.init(jax.random.key(0), CFG)
    return lora.init(jax.random.key(1), params, [lj.LoraRule.all_linear(4, alpha=8)])


def test_adam_state_is_twice_the_trainable_count_on_the_trainable_half(adapted):
    trainable, _ = lj.split(adapted)
    state = optax.adamw(1e-3).init(trainable)
    assert optim.state_size(state) == 2 * lora.count(adapted).trainable


def test_masked_adam_over_the_whole_tree_keeps_state_for_a_and_b_only(adapted):
    tx = optim.masked(optax.adamw(1e-3))
    state = tx.init(adapted)
    n = lora.count(adapted)
    assert optim.state_size(state) == 2 * n.trainable
    assert n.frozen > 4 * n.trainable  # the frozen weights would dominate otherwise
    grads = jax.tree.map(jnp.ones_like, adapted)
    updates, _ = tx.update(grads, state, adapted)
    for path, u in lj.paths.leaves_with_paths(updates):
        if lora.is_factor_path(path):
            assert float(jnp.abs(u).max()) > 0, path
        else:
            assert not jnp.any(u), f"frozen leaf {path} got a non-zero update"


def test_lora_plus_scales_the_learning_rate_of_b():
    p = lora.init(jax.random.key(0), {"w": jnp.ones((6, 4))}, [lj.LoraRule(pattern="w", rank=2)])
    grads = jax.tree.map(jnp.ones_like, p)
    tx = optim.lora_plus(optax.sgd, 0.1, ratio=16.0)
    updates, _ = tx.update(grads, tx.init(p), p)
    np.testing.assert_allclose(updates["w"].lora_a, -0.1 * jnp.ones((6, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["w"].lora_b, -1.6 * jnp.ones((2, 4)), rtol=1e-6)
    assert not jnp.any(updates["w"].base)
    sched = optax.linear_schedule(0.1, 0.0, 10)
    tx = optim.lora_plus(optax.sgd, sched, ratio=4.0)
    updates, _ = tx.update(grads, tx.init(p), p)
    np.testing.assert_allclose(updates["w"].lora_b, -0.4 * jnp.ones((2, 4)), rtol=1e-6)
    adam_state = optim.lora_plus(optax.adam, 1e-3).init(p)
    assert optim.state_size(adam_state) == 2 * lora.count(p).trainable


def test_lora_plus_rejects_a_bad_ratio():
    with pytest.raises(ValueError, match="ratio must be > 0"):
        optim.lora_plus(optax.sgd, 0.1, ratio=0.0)
